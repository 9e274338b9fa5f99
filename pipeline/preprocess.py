"""`cityprep preprocess`: Cityscapes PNG pairs -> remapped, resized HDF5 shards + manifest.

The input is an extracted tree, the official zips, or some of each (pipeline/cityscapes.py);
the workers read the zips in place, each opening its own handles. Nothing in a shard names
where its pixels came from, and the manifest's `config.source_root` is the datadir either
way, so a job over the zips writes the same shard files as one over the extracted tree (and
either can resume the other).

The job is a fixed list of shards: the sorted pairs of each split cut into runs of
`shard_size`, so shard k of a split always holds the same samples and any process on any
machine writes the same bytes for it. `--part I/N` takes every N-th shard of that list.

Each sample is decoded once with libspng (pyspng: ~40% less CPU than Pillow on these PNGs,
pixel-identical to it, and corrupt data is an error, never a crash or wrong pixels; see
pipeline/pngs.py), remapped through the mapping's lookup table and resized: the image with an
area (box) average, the label with nearest. For an integer factor (2048x1024 -> 1024x512)
that is PIL's `Image.reduce` and strided slicing, the cheap path; any other size goes
through PIL's antialiased bilinear `resize` and NEAREST, which pick the same label pixels.

Resuming and merging: a shard is written to a temporary name and renamed (ShardWriter);
then its manifest entry (samples, sha256, stats) goes to `.cityprep/<file>.json`, also
atomically. A rerun keeps every shard whose entry matches the file's checksum and names,
and redoes the rest. Whichever process finds every shard of the job recorded writes
`manifest.json` from those entries, so parts may finish in any order, on any machine.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import sizes
from pipeline.cityscapes import IMAGE_DIR, MODES, DatasetError, Pair, Source, find_pairs
from pipeline.files import TMP_MARK, atomic_write_bytes, sha256_file
from pipeline.host import usable_cpus, worker_setup
from pipeline.labels import Mapping, get_mapping
from pipeline.pngs import image_size, read_image, read_label_ids
from pipeline.progress import bar as progress_bar
from pipeline.shards import (
    COMPRESSIONS,
    ShardError,
    ShardWriter,
    add_stats,
    load_manifest,
    make_manifest,
    manifest_path,
    open_shard,
    read_names,
    sample_stats,
    shard_filename,
    write_manifest,
)

DEFAULT_SHARD_SIZE = 32
DEFAULT_COMPRESSION = "none"  # fastest to write and to read; see README "Compression"
STATE_DIR = ".cityprep"
# The settings that decide a shard's bytes; a folder never mixes two of them.
CONFIG_KEYS = ("size", "mapping_def", "compression", "shard_size", "mode")


class PreprocessError(RuntimeError):
    """The job cannot go on (output folder of another config, disk full, worker died)."""


@dataclass(frozen=True)
class Task:
    split: str
    index: int
    pairs: tuple[Pair, ...]

    @property
    def file(self) -> str:
        return shard_filename(self.split, self.index)


def plan(pairs: dict[str, list[Pair]], shard_size: int) -> list[Task]:
    """Every shard of the job, in order; depends only on the sorted pairs and shard_size."""
    return [
        Task(split, k, tuple(items[start : start + shard_size]))
        for split, items in pairs.items()
        for k, start in enumerate(range(0, len(items), shard_size))
    ]


# -- one sample -------------------------------------------------------------------------------


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Image (H, W, 3) area-averaged to `size` (H, W): what the shards hold, and what
    evaluation and prediction feed the model, so it always sees the pixels it trained on."""
    h, w = size
    src_h, src_w = image.shape[:2]
    f = src_w // w
    if (src_h, src_w) == (h, w):
        return image
    if f >= 1 and (src_h, src_w) == (f * h, f * w):
        return np.asarray(Image.fromarray(image).reduce(f))
    return np.asarray(Image.fromarray(image).resize(sizes.wh(size), Image.BILINEAR))


def resize_pair(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) area-averaged, label (H, W) nearest, both to `size` (H, W)."""
    h, w = size
    src_h, src_w = label.shape
    f = src_w // w
    if (src_h, src_w) == (h, w):
        return image, label
    if f >= 1 and (src_h, src_w) == (f * h, f * w):
        # PIL's NEAREST samples source pixel f*i + f//2; slicing there keeps both paths equal.
        return resize_image(image, size), label[f // 2 :: f, f // 2 :: f]
    return resize_image(image, size), np.asarray(Image.fromarray(label).resize(
        sizes.wh(size), Image.NEAREST))


def _check_covered(label: np.ndarray, mapping: Mapping, source: Source) -> None:
    # Fast path: the usual mappings cover 0..n without gaps, so the maximum says enough.
    top = int(label.max())
    if not mapping.covered[: top + 1].all():
        mapping.remap(label, source)  # raises, naming the uncovered ids and the file


def load_pair(
    pair: Pair, size: tuple[int, int], mapping: Mapping
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Decode, check, remap and resize one pair -> (image, label, source size (H, W))."""
    image = read_image(pair.image)
    ids = read_label_ids(pair.label)
    if image.shape[:2] != ids.shape:
        (ih, iw), (lh, lw) = image.shape[:2], ids.shape
        raise DatasetError(f"{pair.image} is {iw}x{ih} but its label {pair.label} is {lw}x{lh} "
                           "(WxH)")
    _check_covered(ids, mapping, pair.label)
    small, small_ids = resize_pair(image, ids, size)
    return small, mapping.lut[small_ids], ids.shape


# -- one shard (runs in a worker process) ------------------------------------------------------


def _record_path(out: Path, file: str) -> Path:
    return out / STATE_DIR / f"{file}.json"


def _disk_full(e: OSError) -> bool:
    return e.errno == errno.ENOSPC or "No space left" in str(e)


def write_shard(task: Task, out: Path, size: tuple[int, int], mapping: Mapping,
                compression: str) -> dict:
    """Write one shard and its progress record; returns its manifest entry."""
    path = out / task.file
    try:
        stats = None
        image, label, source_size = load_pair(task.pairs[0], size, mapping)
        with ShardWriter(path, num_samples=len(task.pairs), size=size, split=task.split,
                         mapping=mapping, source_size=source_size,
                         compression=compression) as writer:
            for i, pair in enumerate(task.pairs):
                if i:
                    image, label, _ = load_pair(pair, size, mapping)
                writer.add(image, label, pair.name)
                stats = add_stats(stats, sample_stats(image, label, mapping.num_classes))
            digest = writer.commit()
        entry = {"file": task.file, "samples": len(task.pairs), "sha256": digest, "stats": stats}
        atomic_write_bytes(_record_path(out, task.file), json.dumps(entry).encode())
        return entry
    except OSError as e:
        if _disk_full(e):
            raise PreprocessError(
                f"{path}: disk full (no space left on device) in {out}; free space and rerun "
                "the same command, finished shards are kept"
            ) from None
        raise PreprocessError(f"{path}: cannot write ({e})") from None


# -- the job -------------------------------------------------------------------------------------


def _setting(config: dict, key: str) -> str:
    value = config.get(key)
    if key == "size" and value:
        return f"size {sizes.text(sizes.from_file(value), 'WxH')}"
    if key == "mapping_def" and value:
        return f"mapping {value.get('name')!r}"
    return f"{key} {value}"


def _same(key: str, a, b) -> bool:
    if key == "size" and a is not None:  # named, or the [W, H] of an older folder
        return sizes.from_file(a) == sizes.from_file(b)
    return a == b


def _check_config(out: Path, config: dict) -> dict:
    """Refuse a folder holding another config; returns the manifest already there, or {}."""
    manifest, stored = {}, None
    if manifest_path(out).is_file():
        try:
            manifest = load_manifest(out)
        except ShardError as e:
            raise PreprocessError(f"{e}; delete it (or the folder) and rerun") from None
        stored = manifest.get("config")
    elif (out / STATE_DIR / "config.json").is_file():
        stored = json.loads((out / STATE_DIR / "config.json").read_text())  # written atomically
    elif any(out.glob("*.h5")):
        raise PreprocessError(
            f"{out}: holds shards but no manifest.json, so their config is unknown; "
            "choose another --out or empty the folder"
        )
    differ = [k for k in CONFIG_KEYS if stored is not None and not _same(k, stored.get(k),
                                                                       config[k])]
    if differ:
        there = ", ".join(_setting(stored, k) for k in differ)
        asked = ", ".join(_setting(config, k) + (" with another definition" if
                          _setting(config, k) == _setting(stored, k) else "") for k in differ)
        raise PreprocessError(
            f"{out}: holds shards of another config ({there}; this run asks for {asked}); "
            "choose another --out, or delete the folder to start over"
        )
    return manifest


def _read_records(out: Path) -> dict[str, dict]:
    records = {}
    for p in (out / STATE_DIR).glob("*.h5.json"):
        try:
            entry = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # removed by a finishing part, or unreadable: the shard gets redone
        records[entry["file"]] = entry
    return records


def _is_done(out: Path, task: Task, entry: dict | None) -> bool:
    path = out / task.file
    if entry is None or entry.get("samples") != len(task.pairs) or not path.is_file():
        return False
    try:
        if sha256_file(path) != entry["sha256"]:
            return False
        with open_shard(path) as f:
            return read_names(f) == [p.name for p in task.pairs]
    except (OSError, ShardError):
        return False


def _sweep(out: Path, tasks: list[Task]) -> None:
    """Remove temporaries of these shards only: other parts may be writing theirs right now."""
    for t in tasks:
        for folder, stem in ((out, t.file), (out / STATE_DIR, f"{t.file}.json")):
            for p in folder.glob(f".{stem}{TMP_MARK}*"):
                p.unlink(missing_ok=True)


def _split_order(split: str) -> tuple[int, str]:
    known = ("train", "val", "test", "train_extra")
    return (known.index(split) if split in known else len(known), split)


def _finish(out: Path, config: dict, mapping: Mapping, tasks: list[Task],
            old: dict) -> dict | None:
    """Write manifest.json when every shard of the job is recorded; None while some are not."""
    records = _read_records(out)
    old_entries = {e["file"]: e for s in old.get("splits", {}).values() for e in s["shards"]}
    entries: dict[str, list[dict]] = {}
    for t in tasks:
        entry = records.get(t.file) or old_entries.get(t.file)
        if entry is None or not (out / t.file).is_file():
            return None
        entries.setdefault(t.split, []).append(entry)
    for split, info in old.get("splits", {}).items():
        entries.setdefault(split, info["shards"])  # splits this run did not touch stay listed
    ordered = {s: entries[s] for s in sorted(entries, key=_split_order)}
    manifest = make_manifest(config, mapping, ordered)
    write_manifest(out, manifest)
    for t in tasks:
        _record_path(out, t.file).unlink(missing_ok=True)
    if not any((out / STATE_DIR).glob("*.h5.json")):
        (out / STATE_DIR / "config.json").unlink(missing_ok=True)
        try:
            (out / STATE_DIR).rmdir()
        except OSError:
            pass  # another part is still using it
    return manifest


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop at once (error or Ctrl-C): a killed worker leaves only a temporary to sweep."""
    processes = list((pool._processes or {}).values())  # no public handle on the workers
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join()


def _run(todo: list[Task], out: Path, args: tuple, workers: int, bar: tqdm) -> None:
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker_setup)
    futures = {pool.submit(write_shard, t, out, *args): t for t in todo}
    order = {fut: i for i, fut in enumerate(futures)}
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            # several may fail at once (a full disk): report the first shard, not a random one
            for fut in sorted(done, key=order.__getitem__):
                fut.result()  # raises the worker's error here
                bar.update(len(futures[fut].pairs))
    except BrokenProcessPool:
        _stop(pool)
        raise PreprocessError(
            f"{out}: a worker process died while writing a shard (killed, or out of memory); "
            "rerun the same command to continue"
        ) from None
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()


def _check_out(datadir: Path, out: Path, size: tuple[int, int]) -> None:
    """Shards go to a folder of their own, never into the tree they are made from."""
    root, target = datadir.resolve(), out.resolve()
    tops = [root / top for top in (IMAGE_DIR, *MODES.values())]
    if target == root or any(target.is_relative_to(t) for t in tops):
        raise PreprocessError(
            f"--out {out} is inside the Cityscapes tree {datadir}: shards need a folder of "
            f"their own, e.g. --out data_cache/cityscapes-{sizes.text(size, 'WxH')}")


def _check_size(datadir: Path, pairs: dict[str, list[Pair]], size: tuple[int, int]) -> None:
    """Refuse a --size that turns the images on their side; say when it upsamples."""
    first = next((p[0] for p in pairs.values() if p), None)
    if first is None:
        return
    source = image_size(first.image)
    try:
        sizes.check_aspect("--size", size, "WxH", source, f"the images of {datadir}")
    except ValueError as e:
        raise PreprocessError(str(e)) from None
    if size[0] > source[0] or size[1] > source[1]:
        print(f"note: --size {sizes.text(size, 'WxH')} is larger than the images of {datadir} "
              f"({sizes.text(source, 'WxH')}, WxH): they are upsampled (bilinear, labels "
              "nearest), which adds pixels but no detail", file=sys.stderr)


def preprocess(
    datadir: Path,
    out: Path,
    *,
    splits: tuple[str, ...] | list[str] = ("train", "val"),
    size: tuple[int, int] = (512, 1024),
    mapping: str | Path | Mapping = "trainid",
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    compression: str = DEFAULT_COMPRESSION,
    part: tuple[int, int] = (1, 1),
    mode: str = "fine",
    progress: bool = True,
) -> dict | None:
    """Run (or resume) the job; returns the manifest, or None while other parts are unfinished.

    `size` is the shards' (H, W).
    """
    datadir, out = Path(datadir), Path(out)
    index, count = part
    if not 1 <= index <= count:
        raise PreprocessError(f"part {index}/{count}: expected I/N with 1 <= I <= N")
    if shard_size < 1 or min(size) < 1:
        raise PreprocessError("shard_size and both sides of size must be positive")
    if compression not in COMPRESSIONS:
        raise PreprocessError(f"compression must be one of {', '.join(COMPRESSIONS)}")
    mapping = mapping if isinstance(mapping, Mapping) else get_mapping(mapping)
    splits = tuple(dict.fromkeys(splits))
    _check_out(datadir, out, size)
    pairs = {s: find_pairs(datadir, s, mode) for s in splits}  # every input error before any write
    _check_size(datadir, pairs, size)
    config = {"size": sizes.to_file(size), "mapping": mapping.name,
              "mapping_def": mapping.to_json(),
              "compression": compression, "shard_size": shard_size, "mode": mode,
              "source_root": str(datadir.resolve())}
    say = tqdm.write if progress else (lambda _msg: None)
    tasks = plan(pairs, shard_size)
    mine = tasks[index - 1 :: count]
    try:
        out.mkdir(parents=True, exist_ok=True)
        old = _check_config(out, config)
        (out / STATE_DIR).mkdir(exist_ok=True)
        atomic_write_bytes(out / STATE_DIR / "config.json", json.dumps(config).encode())
        known = {e["file"]: e for s in old.get("splits", {}).values() for e in s["shards"]}
        known.update(_read_records(out))
        todo = [t for t in mine if not _is_done(out, t, known.get(t.file))]
        _sweep(out, todo)
        workers = max(1, min(workers or usable_cpus(), len(todo) or 1))
        total = sum(len(t.pairs) for t in todo)
        with progress_bar(total=total, unit="img", desc=f"preprocess {out.name}",
                  disable=not progress or not total, dynamic_ncols=True) as bar:
            try:
                if todo:
                    _run(todo, out, (tuple(size), mapping, compression), workers, bar)
            except BaseException:
                _sweep(out, todo)
                raise
        manifest = _finish(out, config, mapping, tasks, old)
    except OSError as e:
        if _disk_full(e):
            raise PreprocessError(f"{out}: disk full (no space left on device); free space "
                                  "and rerun the same command, finished shards are kept") from None
        raise
    part_note = f" (part {index}/{count})" if count > 1 else ""
    say(f"{out}: {len(todo)} shard(s) written, {len(mine) - len(todo)} already complete"
        f"{part_note}")
    if manifest is None:
        say(f"{out}: other parts still have shards to write; the last part to finish writes "
            "manifest.json")
    return manifest
