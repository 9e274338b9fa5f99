"""The official Cityscapes zips as a source of files, read in place without extracting them.

The dataset's website hands out one zip per top folder and part, each holding that folder plus
a README and license.txt:

    leftImg8bit_trainvaltest.zip   leftImg8bit/{train,val,test}/{city}/*_leftImg8bit.png
    leftImg8bit_trainextra.zip     leftImg8bit/train_extra/{city}/*_leftImg8bit.png
    gtFine_trainvaltest.zip        gtFine/{train,val,test}/{city}/*_gtFine_*
    gtCoarse.zip                   gtCoarse/{train,train_extra,val}/{city}/*_gtCoarse_*

An archive is recognised by the top folders inside it, not by its name, so a renamed download
works; the names above are only used to say which download holds a missing split.

Opening an archive reads its central directory, which a truncated download lacks (zipfile:
BadZipFile); each member's CRC is checked as it is read (zipfile does so on a full read), so
a damaged download is found without reading 11 GB up front. Handles are opened lazily, one per
archive and process: a handle inherited across fork would share its file offset with the
parent's, and two processes seeking on it would read each other's bytes. This module is the
mechanics; pipeline/cityscapes.py turns its exceptions into messages.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

TOPS = ("leftImg8bit", "gtFine", "gtCoarse")
OFFICIAL = {  # (top folder, split) -> the official download holding it
    **{("leftImg8bit", s): "leftImg8bit_trainvaltest.zip" for s in ("train", "val", "test")},
    ("leftImg8bit", "train_extra"): "leftImg8bit_trainextra.zip",
    **{("gtFine", s): "gtFine_trainvaltest.zip" for s in ("train", "val", "test")},
    **{("gtCoarse", s): "gtCoarse.zip" for s in ("train", "val", "train_extra")},
}


@dataclass(frozen=True)
class Member:
    """A file inside a zip, path-like enough for the readers: `name`, `with_name`, str()."""

    archive: Path
    member: str  # the name inside the archive, e.g. gtFine/val/lindau/..._gtFine_labelIds.png

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    def with_name(self, name: str) -> Member:
        """The sibling member `name` in the same folder of the same archive."""
        return Member(self.archive, f"{self.member.rsplit('/', 1)[0]}/{name}")

    def __str__(self) -> str:
        return f"{self.archive}:{self.member}"


@dataclass(frozen=True)
class Archive:
    path: Path
    tops: tuple[str, ...]  # the Cityscapes top folders inside, in TOPS order
    # (top, split) -> {(city, file name): member}, for the files three folders down
    files: dict[tuple[str, str], dict[tuple[str, str], str]]

    def splits(self, top: str) -> list[str]:
        return sorted(s for t, s in self.files if t == top)


_index: dict[tuple[Path, int, int], Archive] = {}


def open_archive(path: Path) -> Archive:
    """Index one zip by its central directory; raises zipfile.BadZipFile or OSError.

    The index is kept per (path, size, mtime): a second split of the same job does not read the
    central directory again, a replaced download does.
    """
    path = Path(path)
    st = path.stat()
    key = (path, st.st_size, st.st_mtime_ns)  # as given: members name the path the user wrote
    if key not in _index:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        files: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
        for name in names:
            parts = name.split("/")
            if len(parts) == 4 and parts[0] in TOPS and parts[3]:
                files.setdefault((parts[0], parts[1]), {})[(parts[2], parts[3])] = name
        tops = tuple(t for t in TOPS if any(k[0] == t for k in files))
        _index[key] = Archive(path, tops, files)
    return _index[key]


def has_member(src: Member) -> bool:
    """Whether the archive holds `src` (from its index: no read)."""
    parts = src.member.split("/")
    files = open_archive(src.archive).files.get((parts[0], parts[1]), {}) if len(parts) == 4 \
        else {}
    return (parts[-2], parts[-1]) in files


def zips_in(folder: Path) -> list[Path]:
    """The zip files directly in `folder`, sorted (downloads sit side by side)."""
    return sorted(p for p in Path(folder).glob("*.zip") if p.is_file())


_handles: dict[Path, tuple[int, zipfile.ZipFile]] = {}


def read_member(src: Member) -> bytes:
    """The bytes of one member, its CRC checked; raises zipfile.BadZipFile, zlib.error,
    KeyError (no such member), EOFError or OSError, which cityscapes.read_bytes words."""
    pid = os.getpid()
    held = _handles.get(src.archive)
    if held is None or held[0] != pid:  # never a handle from before a fork
        held = _handles[src.archive] = (pid, zipfile.ZipFile(src.archive))
    return held[1].read(src.member)


def tree_parts(root: Path) -> list[str]:
    """What of a Cityscapes tree `root` holds ('leftImg8bit/', 'gtFine_trainvaltest.zip', ...),
    by name only: empty for any other folder. For messages that tell a tree from shards."""
    root = Path(root)
    if not root.is_dir():
        return []
    downloads = sorted(set(OFFICIAL.values()))
    return ([f"{top}/" for top in TOPS if (root / top).is_dir()]
            + [name for name in downloads if (root / name).is_file()])
