"""The shard schema (format_version 1): the one module that knows how shards and the manifest look.

    data_cache/<name>/manifest.json
    data_cache/<name>/{split}-{k:05d}.h5
        image  uint8 (N, H, W, 3), chunks (1, H, W, 3)   RGB, resized
        label  uint8 (N, H, W),    chunks (1, H, W)      class ids, 255 = ignore
        name   utf-8 str (N,)                            {city}_{seq:06d}_{frame:06d}
        attrs  format_version, split, classes, palette, ignore_index, mapping,
               source_size (the array [W, H] of the originals; manifest.json and every
               other file name a size's sides: {"height", "width"}, pipeline/sizes.py)

Every file is written under a temporary name in the same folder and renamed when complete,
so a reader never sees half a shard and a killed job leaves only temporaries to sweep.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from pipeline import sizes
from pipeline.archives import tree_parts
from pipeline.files import atomic_write_bytes, fsync_dir, sha256_file, tmp_path_for
from pipeline.labels import IGNORE_INDEX, Mapping

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
COMPRESSIONS = ("none", "lzf", "gzip")


class ShardError(RuntimeError):
    """A shard or manifest that is missing, corrupt or of another schema; the message names it."""


def shard_filename(split: str, k: int) -> str:
    return f"{split}-{k:05d}.h5"


def _compression_kwargs(compression: str) -> dict:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    if compression == "none":
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    return {"compression": "lzf"}


class ShardWriter:
    """Writes one shard sample by sample into a temporary file; `commit()` renames it in place.

    Used as a context manager: leaving the block by an exception deletes the temporary.
    """

    def __init__(
        self,
        path: Path,
        *,
        num_samples: int,
        size: tuple[int, int],
        split: str,
        mapping: Mapping,
        source_size: tuple[int, int],
        compression: str = "lzf",
    ) -> None:
        self.path = Path(path)
        self.tmp = tmp_path_for(self.path)
        self.num_samples = num_samples
        h, w = size  # (H, W), as everywhere in the code; files say [W, H] (pipeline/sizes.py)
        self._file = h5py.File(self.tmp, "w")
        comp = _compression_kwargs(compression)
        self._image = self._file.create_dataset(
            "image", (num_samples, h, w, 3), np.uint8, chunks=(1, h, w, 3), **comp
        )
        self._label = self._file.create_dataset(
            "label", (num_samples, h, w), np.uint8, chunks=(1, h, w), **comp
        )
        self._name = self._file.create_dataset(
            "name", (num_samples,), h5py.string_dtype("utf-8")
        )
        attrs = self._file.attrs
        attrs["format_version"] = FORMAT_VERSION
        attrs["split"] = split
        attrs["classes"] = mapping.classes
        attrs["palette"] = mapping.palette
        attrs["ignore_index"] = IGNORE_INDEX
        attrs["mapping"] = json.dumps(mapping.to_json())
        attrs["source_size"] = np.asarray(sizes.wh(source_size), dtype=np.int64)
        self._written = 0

    def add(self, image: np.ndarray, label: np.ndarray, name: str) -> None:
        i = self._written
        self._image[i] = image
        self._label[i] = label
        self._name[i] = name
        self._written += 1

    def commit(self) -> str:
        """Close, rename into place, return the file's sha256."""
        if self._written != self.num_samples:
            raise ShardError(
                f"{self.path}: {self._written} samples written, {self.num_samples} expected"
            )
        self._file.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(self.tmp)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return digest

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    split: str
    num_samples: int
    size: tuple[int, int]  # (H, W)
    classes: list[str]
    palette: np.ndarray
    ignore_index: int
    mapping: dict
    source_size: tuple[int, int]


@contextmanager
def open_shard(path: Path) -> Iterator[h5py.File]:
    """Open a shard read-only after checking its schema; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ShardError(f"{path}: a folder; a shard is one {{split}}-00000.h5 file in it "
                         f"(`cityprep verify {path}` checks them all)")
    if not path.is_file():
        raise ShardError(f"{path}: shard missing")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ShardError(
            f"{path}: not a readable HDF5 file ({e}); rerun cityprep preprocess"
        ) from None
    try:
        version = f.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise ShardError(
                f"{path}: shard format_version {version}, this code reads {FORMAT_VERSION}; "
                "preprocess the data again"
            )
        for key in ("image", "label", "name"):
            if key not in f:
                raise ShardError(f"{path}: dataset {key!r} missing")
        n = f["image"].shape[0]
        if f["label"].shape != f["image"].shape[:3] or f["name"].shape != (n,):
            raise ShardError(
                f"{path}: image {f['image'].shape}, label {f['label'].shape} and "
                f"name {f['name'].shape} disagree"
            )
        yield f
    finally:
        f.close()


def shard_info(path: Path) -> ShardInfo:
    with open_shard(path) as f:
        n, h, w, _ = f["image"].shape
        a = f.attrs
        return ShardInfo(
            path=Path(path),
            split=str(a["split"]),
            num_samples=int(n),
            size=(int(h), int(w)),
            classes=[str(c) for c in a["classes"]],
            palette=np.asarray(a["palette"], dtype=np.uint8),
            ignore_index=int(a["ignore_index"]),
            mapping=json.loads(a["mapping"]),
            source_size=sizes.from_wh(a["source_size"]),
        )


def read_names(f: h5py.File) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in f["name"][()]]


# -- manifest ----------------------------------------------------------------------------------
#
# {
#   "format_version": 1,
#   "config": {"size": [W, H], "mapping": name, "mapping_def": {...}, "compression": ...,
#              "shard_size": n, "mode": "fine", "source_root": path},
#   "classes": [...], "palette": [[r, g, b], ...], "categories": [...], "ignore_index": 255,
#   "splits": {split: {"samples": n, "shards": [{"file", "samples", "sha256", "stats"}]}},
#   "mean": [r, g, b], "std": [r, g, b],       # training images, 0-1 units
#   "class_pixels": [count per class]          # training labels
# }
# Each shard entry's "stats" holds {"sum": [3], "sumsq": [3], "pixels": n, "class_pixels": [K]}
# so parts written on different machines merge without reading a shard again.


def manifest_path(data_dir: Path) -> Path:
    return Path(data_dir) / MANIFEST_NAME


def _not_shards(data_dir: Path) -> str:
    """Why `data_dir` is no shard folder, and what to pass instead: the message for a
    Cityscapes tree, a shard file, an unfinished job or anything else given as --data."""
    made = "`cityprep preprocess --datadir CITYSCAPES --out DIR`"
    if data_dir.is_file():
        where = f"pass its folder {data_dir.parent}" if data_dir.suffix == ".h5" else \
            "pass the folder of shards"
        return f"{data_dir}: a file, not a shard folder; {where} (made by {made})"
    if not data_dir.is_dir():
        return f"{data_dir}: no such data folder; make shards there with {made}"
    parts = tree_parts(data_dir)
    if parts:
        out = "data_cache/cityscapes-1024x512"
        return (f"{data_dir}: a Cityscapes tree ({', '.join(parts)}), not shards; make shards "
                f"from it with `cityprep preprocess --datadir {data_dir} --out {out}` and use "
                f"{out} instead")
    if any(data_dir.glob("*.h5")):
        return (f"{data_dir}: shards but no {MANIFEST_NAME}: an unfinished `cityprep "
                "preprocess`; rerun the same command to finish it")
    return (f"{data_dir}: no {MANIFEST_NAME}, so not a shard folder (one holds "
            f"{MANIFEST_NAME} and {{split}}-00000.h5, made by {made})")


def load_manifest(data_dir: Path) -> dict:
    """Read and check `manifest.json`; errors say what to run."""
    path = manifest_path(data_dir)
    if not path.is_file():
        raise ShardError(_not_shards(Path(data_dir)))
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: unreadable ({e}); run `cityprep preprocess` again") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {version}, this code reads {FORMAT_VERSION}; "
            "preprocess the data again into a new folder"
        )
    return manifest


def write_manifest(data_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(manifest_path(data_dir), (json.dumps(manifest, indent=1) + "\n").encode())


def split_shards(data_dir: Path, manifest: dict, split: str) -> list[tuple[Path, int]]:
    """(path, samples) of each shard of `split`, in manifest order (which defines `index`).

    Splits joined with "+" read as one, in that order: "train+train_extra" is the coarse
    recipe's training set.
    """
    splits = manifest.get("splits", {})
    shards = []
    for name in split.split("+"):
        if name not in splits:
            raise ShardError(f"{manifest_path(data_dir)}: no split {name!r} (has: "
                             f"{', '.join(splits) or 'none'})")
        shards += [(Path(data_dir) / s["file"], int(s["samples"]))
                   for s in splits[name]["shards"]]
    return shards


def sample_stats(image: np.ndarray, label: np.ndarray, num_classes: int) -> dict:
    """Sums that merge by addition: per-channel sum and sum of squares (0-1 units), class counts."""
    # Histograms instead of float copies of the image: ~10x faster, and this runs per sample.
    # Pillow's (one pass in C over the uint8 RGB image) counts ~2.5x faster than np.bincount.
    hist = np.reshape(Image.fromarray(image).histogram(), (3, 256)).astype(np.float64)
    values = np.arange(256) / 255.0
    counts = np.bincount(label.ravel(), minlength=256)[:num_classes]
    return {
        "sum": (hist @ values).tolist(),
        "sumsq": (hist @ np.square(values)).tolist(),
        "pixels": int(image.shape[0] * image.shape[1]),
        "class_pixels": counts.astype(np.int64).tolist(),
    }


def add_stats(a: dict | None, b: dict) -> dict:
    if a is None:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in b.items()}
    return {
        "sum": [x + y for x, y in zip(a["sum"], b["sum"])],
        "sumsq": [x + y for x, y in zip(a["sumsq"], b["sumsq"])],
        "pixels": a["pixels"] + b["pixels"],
        "class_pixels": [x + y for x, y in zip(a["class_pixels"], b["class_pixels"])],
    }


def make_manifest(config: dict, mapping: Mapping, splits: dict[str, list[dict]]) -> dict:
    """Assemble the manifest from shard entries ({"file", "samples", "sha256", "stats"}).

    mean/std/class_pixels come from the `train` split when there is one, else from all splits.
    """
    source = splits.get("train") or [s for entries in splits.values() for s in entries]
    total = None
    for entry in source:
        total = add_stats(total, entry["stats"])
    if total is None or total["pixels"] == 0:
        mean, std, class_pixels = [0.5] * 3, [0.25] * 3, [0] * mapping.num_classes
    else:
        n = total["pixels"]
        mean = [s / n for s in total["sum"]]
        std = [max(q / n - m * m, 1e-12) ** 0.5 for q, m in zip(total["sumsq"], mean)]
        class_pixels = total["class_pixels"]
    return {
        "format_version": FORMAT_VERSION,
        "config": config,
        "classes": mapping.classes,
        "palette": mapping.palette.tolist(),
        "categories": mapping.categories,
        "ignore_index": IGNORE_INDEX,
        "splits": {
            split: {"samples": sum(int(e["samples"]) for e in entries), "shards": entries}
            for split, entries in splits.items()
        },
        "mean": mean,
        "std": std,
        "class_pixels": class_pixels,
    }


def write_arrays(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray, list[str]]],
                 mapping: Mapping, shard_size: int = 32, compression: str = "none") -> Path:
    """Shards + manifest straight from arrays (images N,H,W,3; labels N,H,W of class ids).

    For data that never was a Cityscapes tree: the tests' hand-made scenes and the
    synthetic shards of `citytrain gpu-report`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[dict]] = {}
    for split, (images, labels, names) in splits.items():
        n, h, w, _ = images.shape
        entries[split] = []
        for k, start in enumerate(range(0, n, shard_size)):
            stop = min(start + shard_size, n)
            path = folder / shard_filename(split, k)
            stats = None
            with ShardWriter(path, num_samples=stop - start, size=(h, w), split=split,
                             mapping=mapping, source_size=(h, w),
                             compression=compression) as writer:
                for i in range(start, stop):
                    writer.add(images[i], labels[i], names[i])
                    stats = add_stats(stats, sample_stats(images[i], labels[i],
                                                          mapping.num_classes))
                digest = writer.commit()
            entries[split].append({"file": path.name, "samples": stop - start,
                                   "sha256": digest, "stats": stats})
    config = {"size": sizes.to_file((h, w)), "mapping": mapping.name,
              "mapping_def": mapping.to_json(),
              "compression": compression, "shard_size": shard_size, "mode": "fine",
              "source_root": None}
    write_manifest(folder, make_manifest(config, mapping, entries))
    return folder
