"""`cityprep inspect-shard` and `cityprep verify`: look into one shard, check a whole folder."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import sizes
from pipeline.files import TMP_MARK, atomic_write_bytes, sha256_file
from pipeline.labels import IGNORE_INDEX, colorize
from pipeline.shards import (
    MANIFEST_NAME,
    ShardError,
    load_manifest,
    open_shard,
    read_names,
    shard_info,
)


def _dataset_info(d) -> dict:
    return {"shape": list(d.shape), "dtype": str(d.dtype),
            "chunks": list(d.chunks) if d.chunks else None,
            "compression": d.compression or "none"}


def _label_counts(f) -> np.ndarray:
    counts = np.zeros(256, dtype=np.int64)
    for i in range(f["label"].shape[0]):  # one chunk at a time: shards can be large
        counts += np.bincount(f["label"][i].ravel(), minlength=256)
    return counts


def inspect_shard(path: Path, names: int = 5) -> dict:
    """Summary of one shard: schema, shapes, chunking, classes present with pixel shares."""
    path = Path(path)
    info = shard_info(path)
    with open_shard(path) as f:
        image, label = _dataset_info(f["image"]), _dataset_info(f["label"])
        counts = _label_counts(f)
        all_names = read_names(f)
    total = int(counts.sum())
    present = []
    for k in np.flatnonzero(counts):
        name = (info.classes[k] if k < len(info.classes)
                else "ignore" if k == info.ignore_index else f"<unknown {k}>")
        present.append({"id": int(k), "name": name, "pixels": int(counts[k]),
                        "share": counts[k] / total})
    present.sort(key=lambda c: -c["pixels"])
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "split": info.split,
        "samples": info.num_samples,
        "size": sizes.to_file(info.size),  # {"height", "width"}, as manifest.json has it
        "source_size": sizes.to_file(info.source_size),
        "mapping": info.mapping.get("name"),
        "num_classes": len(info.classes),
        "ignore_index": info.ignore_index,
        "image": image,
        "label": label,
        "classes_present": present,
        "names": all_names[:names],
    }


def format_summary(s: dict) -> str:
    def ds(d: dict) -> str:
        return (f"{d['dtype']} {tuple(d['shape'])}, chunks {tuple(d['chunks'] or ())}, "
                f"compression {d['compression']}")

    lines = [
        f"{s['file']}  ({s['bytes'] / 1e6:.1f} MB)",
        f"  split {s['split']}, {s['samples']} samples, "
        f"{sizes.text(sizes.from_file(s['size']), 'WxH')} (WxH) from "
        f"{sizes.text(sizes.from_file(s['source_size']), 'WxH')}, mapping {s['mapping']!r} "
        f"with {s['num_classes']} classes",
        f"  image  {ds(s['image'])}",
        f"  label  {ds(s['label'])}",
        "  classes present (share of pixels):",
    ]
    lines += [f"    {c['id']:>3}  {c['name']:<20} {100 * c['share']:6.2f}%"
              for c in s["classes_present"]]
    lines.append(f"  first names: {', '.join(s['names'])}")
    return "\n".join(lines)


def write_preview(path: Path, out_png: Path, samples: int = 6, width: int = 512) -> Path:
    """A PNG grid: one row per sample, the image beside its colorized label."""
    info = shard_info(path)
    with open_shard(path) as f:
        n = min(samples, info.num_samples)
        images, labels = f["image"][:n], f["label"][:n]
    rows = []
    for image, label in zip(images, labels):
        row = np.concatenate([image, colorize(label, info.palette)], axis=1)
        factor = max(1, row.shape[1] // (2 * width))
        rows.append(row[::factor, ::factor])  # a preview: plain subsampling is enough
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buf, format="PNG")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_shard(path: Path, entry: dict, split: str, manifest: dict) -> list[str]:
    problems = []
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{path}: checksum differs from the manifest (file changed or corrupt)")
    try:
        info = shard_info(path)
        if info.split != split:
            problems.append(f"{path}: holds split {info.split!r}, listed under {split!r}")
        if info.num_samples != entry["samples"]:
            problems.append(f"{path}: {info.num_samples} samples, manifest says {entry['samples']}")
        if info.size != sizes.from_file(manifest["config"]["size"]):
            problems.append(f"{path}: size {sizes.text(info.size, 'WxH')}, manifest says "
                            f"{sizes.text(sizes.from_file(manifest['config']['size']), 'WxH')}"
                            " (WxH)")
        if info.classes != manifest["classes"]:
            problems.append(f"{path}: classes differ from the manifest's")
        with open_shard(path) as f:
            read_names(f)
            for i in range(info.num_samples):
                f["image"][i]  # every chunk decompresses
            counts = _label_counts(f)
        bad = [k for k in np.flatnonzero(counts) if k >= len(info.classes) and k != IGNORE_INDEX]
        if bad:
            problems.append(f"{path}: label values {bad} are not classes of the mapping")
    except ShardError as e:
        problems.append(str(e))
    except (OSError, KeyError, ValueError) as e:
        problems.append(f"{path}: unreadable ({e})")
    return problems


def verify(data_dir: Path) -> VerifyReport:
    """Every shard against the manifest: present, sample counts, checksums, readable.

    Raises ShardError when there is no readable manifest to check against.
    """
    data_dir = Path(data_dir)
    report = VerifyReport()
    manifest = load_manifest(data_dir)
    listed = set()
    for split, info in manifest["splits"].items():
        counted = 0
        for entry in info["shards"]:
            path = data_dir / entry["file"]
            listed.add(entry["file"])
            report.shards += 1
            counted += int(entry["samples"])
            if not path.is_file():
                report.problems.append(f"{path}: missing (listed in {MANIFEST_NAME})")
                continue
            report.problems += _check_shard(path, entry, split, manifest)
        if counted != info["samples"]:
            report.problems.append(
                f"{data_dir / MANIFEST_NAME}: split {split!r} says {info['samples']} samples, "
                f"its shards hold {counted}"
            )
        report.samples += counted
    for p in sorted(data_dir.glob("*.h5")):
        if p.name not in listed:
            report.notes.append(f"{p}: not listed in the manifest (ignored by the loader)")
    leftovers = sorted(data_dir.glob(f".*{TMP_MARK}*"))
    if leftovers:
        report.notes.append(f"{data_dir}: {len(leftovers)} temporary file(s) of an interrupted "
                            "run; rerunning `cityprep preprocess` removes them")
    if (data_dir / ".cityprep").is_dir():
        report.notes.append(f"{data_dir / '.cityprep'}: records of an unfinished preprocessing "
                            "job (a part still running, or interrupted)")
    return report
