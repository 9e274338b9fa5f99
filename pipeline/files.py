"""Files written whole or not at all: a temporary name beside the file, fsync, rename.

A reader never sees half a file, and a killed writer leaves only temporaries, which
`sweep_temporaries` recognizes by their mark. Shards, manifests, checkpoints, a run's
metrics and pictures, exports: every file the project writes goes through here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TMP_MARK = ".tmp-"


def tmp_path_for(path: Path) -> Path:
    """A sibling temporary name, unique per process, that `sweep_temporaries` recognizes."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def sweep_temporaries(folder: Path) -> list[Path]:
    """Delete leftovers of killed writers; returns what was removed."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
