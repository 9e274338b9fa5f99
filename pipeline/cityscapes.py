"""Finding the (image, label) pairs of a split in the official Cityscapes layout.

    leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png
    gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png     (mode "fine")
    gtCoarse/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtCoarse_labelIds.png (mode "coarse")

Only files that follow the naming pattern count, so `.DS_Store`, macOS `._*` twins, the
`_color`/`_instanceIds`/`_polygons` siblings and stray files never become samples. An image
without its label (or a label without its image) is an error naming both paths: silently
dropping half a split would train on less data than the user thinks.

The root may hold the extracted folders, the official zips as downloaded
(pipeline/archives.py: leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip, gtCoarse.zip,
leftImg8bit_trainextra.zip), or some of each; a top folder and split found in two places is
refused rather than guessed. A pair's image and label are then a `Source`: a Path, or an
archive `Member` whose str() reads `gtFine_trainvaltest.zip:gtFine/val/...png` in messages.
`read_bytes(src)` reads either; every reader goes through it (decoding the PNGs:
`pipeline/pngs.py`).
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pipeline import archives
from pipeline.archives import OFFICIAL, Member, tree_parts
from pipeline.shards import MANIFEST_NAME

MODES = {"fine": "gtFine", "coarse": "gtCoarse"}
IMAGE_DIR = "leftImg8bit"
_STEM = r"(?P<name>(?P<city>[A-Za-z][A-Za-z0-9_-]*?)_\d{6}_\d{6})"
IMAGE_RE = re.compile(rf"^{_STEM}_leftImg8bit\.png$")


class DatasetError(ValueError):
    """A Cityscapes tree that is missing, empty or inconsistent; the message names the paths."""


# Where a file's bytes come from: a path in an extracted tree, or a member of an official zip.
# Both have `.name`, `.with_name()` and a str() that names the file; read_bytes() reads either.
Source = Path | Member


class Pair(NamedTuple):
    image: Source
    label: Source
    name: str  # {city}_{seq:06d}_{frame:06d}
    city: str


def _gt_dir(mode: str) -> str:
    if mode not in MODES:
        raise DatasetError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    return MODES[mode]


def city_of(name: str) -> str:
    return name.rsplit("_", 2)[0]


def image_path_for(root: Path, split: str, name: str) -> Path:
    return Path(root) / IMAGE_DIR / split / city_of(name) / f"{name}_leftImg8bit.png"


def label_path_for(root: Path, split: str, name: str, mode: str = "fine") -> Path:
    """The original labelIds PNG of sample `name` in an extracted tree."""
    gt = _gt_dir(mode)
    return Path(root) / gt / split / city_of(name) / f"{name}_{gt}_labelIds.png"


def sibling(src: Source, suffix: str) -> Source:
    """Another file of the same frame in the same folder or archive, e.g.
    `sibling(pair.label, "instanceIds.png")` is the pair's `*_gtFine_instanceIds.png`."""
    stem = src.name.rsplit("_", 1)[0]
    return src.with_name(f"{stem}_{suffix}")


def exists(src: Source) -> bool:
    """Whether the file is there: in the tree, or in its archive's index."""
    return archives.has_member(src) if isinstance(src, Member) else Path(src).is_file()


def read_bytes(src: Source) -> bytes:
    """The bytes of a file in a tree or of a zip member; DatasetError naming it otherwise."""
    if isinstance(src, Member):
        try:
            return archives.read_member(src)
        except KeyError:
            raise DatasetError(f"{src}: no such file in the archive") from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise DatasetError(f"{src}: damaged archive member ({e}); "
                               f"{_download_again(src.archive)}") from None
        except OSError as e:
            raise DatasetError(f"{src}: cannot read ({e.strerror or e})") from None
    try:
        return Path(src).read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{src}: no such file") from None
    except OSError as e:
        raise DatasetError(f"{src}: cannot read ({e.strerror or e})") from None


def _download_again(archive: Path) -> str:
    return f"the download is incomplete or corrupt, download {Path(archive).name} again"


# -- discovery ---------------------------------------------------------------------------------


def check_root(root: Path) -> None:
    """`root` must be a folder, and not a shard folder given where the originals belong."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (expected a Cityscapes tree or the "
                           "official zips)")
    if (root / MANIFEST_NAME).is_file() and not tree_parts(root):
        raise DatasetError(
            f"{root}: holds shards ({MANIFEST_NAME} from `cityprep preprocess`), not the "
            f"Cityscapes originals: shards go to citytrain as --data {root}; --datadir takes "
            f"the tree with {IMAGE_DIR}/ and gtFine/ (or the official zips)")


def _open_archives(root: Path) -> tuple[list[archives.Archive], dict[str, DatasetError]]:
    """Every zip in `root`, indexed, and why each unreadable one is (a truncated download, say).

    An unreadable zip only matters when this split may need it (see find_pairs): a download
    still under way beside the ones in use (leftImg8bit_sequence is 324 GB) must not stop a job.
    """
    found: list[archives.Archive] = []
    broken: dict[str, DatasetError] = {}  # file name -> why it cannot be read
    for path in archives.zips_in(root):
        try:
            found.append(archives.open_archive(path))
        except zipfile.BadZipFile as e:
            why = ("truncated: it ends before its table of contents" if
                   "not a zip file" in str(e) else str(e))
            broken[path.name] = DatasetError(f"{path}: not a readable zip archive ({why}); "
                                             f"{_download_again(path)}")
        except OSError as e:
            broken[path.name] = DatasetError(f"{path}: cannot read ({e.strerror or e})")
    return found, broken


@dataclass
class _Files:
    """The files of one top folder and split, name -> source, and where they are (or would be):
    the split folder, or the archive holding them."""

    folder: Path
    archive: Path | None
    found: dict[str, Source]

    def where(self) -> str:
        return str(self.archive or self.folder)

    def expected(self, city: str, file: str) -> Source:
        if self.archive is None:
            return self.folder / city / file
        top_split = "/".join(self.folder.parts[-2:])
        return Member(self.archive, f"{top_split}/{city}/{file}")


def _scan(root: Path, zips: list[archives.Archive], top: str, split: str,
          pattern: re.Pattern) -> _Files:
    """The files of `top`/`split` that `pattern` names, from the extracted folder or from one
    archive; DatasetError when two places hold them (which copy would be meant?)."""
    folder = root / top / split
    holders = []
    if folder.is_dir():
        found: dict[str, Source] = {}
        for path in sorted(folder.glob("*/*")):
            m = pattern.match(path.name)
            if m and path.is_file():
                found[m["name"]] = path
        if found:
            holders.append(_Files(folder, None, found))
    for z in zips:
        found = {}
        for (_, file), member in sorted(z.files.get((top, split), {}).items()):
            m = pattern.match(file)
            if m:
                found[m["name"]] = Member(z.path, member)
        if found:
            holders.append(_Files(folder, z.path, found))
    if len(holders) > 1:
        raise DatasetError(f"{root}: {top}/{split} is both in {holders[0].where()} and in "
                           f"{holders[1].where()}; keep one of them (move the other away)")
    return holders[0] if holders else _Files(folder, None, {})


def _where_splits(root: Path, zips: list[archives.Archive], top: str) -> str:
    """What there is of `top`, for messages: 'leftImg8bit_trainvaltest.zip (test, train, val)'."""
    have = []
    if (root / top).is_dir():
        splits = sorted(p.name for p in (root / top).iterdir() if p.is_dir())
        have.append(f"{root / top}/ ({', '.join(splits) or 'empty'})")
    have += [f"{z.path.name} ({', '.join(z.splits(top))})" for z in zips if top in z.tops]
    return "; ".join(have) or "nothing"


def _no_images(root: Path, zips: list[archives.Archive], split: str, files: _Files) \
        -> DatasetError:
    folder, need = files.folder, OFFICIAL.get((IMAGE_DIR, split))
    if folder.is_dir():
        return DatasetError(f"{folder}: no images named {{city}}_{{seq}}_{{frame}}_{IMAGE_DIR}"
                            ".png in its city folders")
    hint = f"; split {split} comes in {need}" if need else ""
    if not any(IMAGE_DIR in z.tops for z in zips):
        have = sorted(p.name for p in (root / IMAGE_DIR).iterdir() if p.is_dir())
        return DatasetError(f"{folder}: no such split folder (has: {', '.join(have) or 'none'})"
                            f"{hint}")
    what = f"needs {need}" if need else "is not in Cityscapes"
    return DatasetError(f"{root}: split {split} {what} (found {IMAGE_DIR}: "
                        f"{_where_splits(root, zips, IMAGE_DIR)})")


def _no_labels(root: Path, zips: list[archives.Archive], gt: str, split: str) -> DatasetError:
    need = OFFICIAL.get((gt, split))
    if need is None:
        coarse = OFFICIAL.get((MODES["coarse"], split)) if gt == MODES["fine"] else None
        hint = f"; it has coarse ones: use mode coarse, with {coarse}" if coarse else ""
        return DatasetError(f"{root}: split {split} has no {gt} labels in Cityscapes{hint}")
    return DatasetError(f"{root}: split {split} needs {need} for its {gt} labels (found {gt}: "
                        f"{_where_splits(root, zips, gt)})")


def find_pairs(root: Path, split: str, mode: str = "fine") -> list[Pair]:
    """The (image, label) pairs of `split`, sorted by name; DatasetError when the tree is wrong.

    `root` holds the extracted folders and/or the official zips.
    """
    root = Path(root)
    gt = _gt_dir(mode)
    check_root(root)
    zips, broken = _open_archives(root)
    for needed in (OFFICIAL.get((IMAGE_DIR, split)), OFFICIAL.get((gt, split))):
        if needed in broken:  # the official download of this split is unreadable
            raise broken[needed]
    first_broken = None  # what to blame when something is missing: it may be in these
    if broken:
        (_, error), *rest = broken.items()
        also = f" (also unreadable: {', '.join(n for n, _ in rest)})" if rest else ""
        first_broken = DatasetError(f"{error}{also}")
    if not (root / IMAGE_DIR).is_dir() and not any(IMAGE_DIR in z.tops for z in zips):
        if first_broken:
            raise first_broken
        others = [z.path.name for z in zips]
        note = f" (its zips hold neither: {', '.join(others)})" if others else ""
        raise DatasetError(
            f"{root}: no {IMAGE_DIR}/ folder and no archive of it{note}; expected the "
            f"Cityscapes layout {IMAGE_DIR}/{{split}}/{{city}}/*_{IMAGE_DIR}.png and "
            f"{gt}/{{split}}/{{city}}/, or the official {OFFICIAL[(IMAGE_DIR, 'train')]} and "
            f"{OFFICIAL.get((gt, 'train'))}"
        )
    images = _scan(root, zips, IMAGE_DIR, split, IMAGE_RE)
    if not images.found:
        raise first_broken or _no_images(root, zips, split, images)
    labels = _scan(root, zips, gt, split, re.compile(rf"^{_STEM}_{gt}_labelIds\.png$"))
    if not labels.found and (zips or broken) and not labels.folder.is_dir():
        raise first_broken or _no_labels(root, zips, gt, split)

    _unpaired(images.found, labels, "image without label", "images lack labels",
              f"_{gt}_labelIds.png")
    _unpaired(labels.found, images, "label without image", "labels lack images",
              f"_{IMAGE_DIR}.png")
    return [Pair(images.found[n], labels.found[n], n, city_of(n)) for n in sorted(images.found)]


def _unpaired(these: dict[str, Source], those: _Files, problem: str, plural: str,
              other_suffix: str) -> None:
    """The first of `these` without a partner in `those` is an error naming both files."""
    lonely = sorted(these.keys() - those.found.keys())
    if lonely:
        name = lonely[0]
        more = f" ({len(lonely) - 1} more {plural})" if len(lonely) > 1 else ""
        expected = those.expected(city_of(name), f"{name}{other_suffix}")
        raise DatasetError(f"{these[name]}: {problem}; expected {expected}{more}")


# -- unlabelled splits (test-server submissions) ---------------------------------------------

def find_images(root: Path, split: str) -> list[tuple[str, Source]]:
    """(name, image) of every image of `split`, sorted by name, without looking for labels.

    For the test split, whose labels are not public; extracted or in the official zip.
    """
    root = Path(root)
    check_root(root)
    zips, broken = _open_archives(root)
    if OFFICIAL.get((IMAGE_DIR, split)) in broken:
        raise broken[OFFICIAL[(IMAGE_DIR, split)]]
    images = _scan(root, zips, IMAGE_DIR, split, IMAGE_RE)
    if not images.found:
        if not (root / IMAGE_DIR).is_dir() and not any(IMAGE_DIR in z.tops for z in zips):
            raise DatasetError(f"{root}: no {IMAGE_DIR}/ folder and no archive of it")
        raise _no_images(root, zips, split, images)
    return sorted(images.found.items())
