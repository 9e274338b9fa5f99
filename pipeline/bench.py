"""`cityprep bench`: preprocessing 2048x1024 -> 1024x512 against PIL merely decoding the PNGs.

Both sides run on the same files, with the same number of worker processes, on a warm page
cache, pool start-up included. The target: preprocessing (decode, check, remap, resize,
statistics, write, checksum) is no slower than PIL's decode alone, and near-linear in workers.
Besides wall-clock rates it reports CPU time per image (the processes' own and their
workers'), which other load on a shared machine does not distort.
A last pass reads the shards back the way the loader does (one image and one label chunk per
sample, in random order) to show what the compression setting costs on the reading side.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from pipeline.cityscapes import find_pairs
from pipeline.preprocess import DEFAULT_COMPRESSION, preprocess
from pipeline.shards import load_manifest, split_shards

SOURCE_SIZE = (2048, 1024)
TARGET_SIZE = (1024, 512)


def ensure_city(root: Path, frames: int, val: int) -> Path:
    """Synthesize the benchmark city once; a later run with the same counts reuses it."""
    from pipeline.synth import synthesize

    marker = root / "bench-city.json"
    want = {"train": frames, "val": val, "size": list(SOURCE_SIZE), "seed": 0}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    synthesize(root, train=frames, val=val, size=SOURCE_SIZE, seed=0, progress=True)
    marker.write_text(json.dumps(want))
    return root


def _pil_decode(paths: list[Path]) -> int:
    for path in paths:
        with Image.open(path) as im:
            im.load()
    return len(paths)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children: immune to other load."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def time_pil_decode(files: list[Path], workers: int, chunk: int) -> tuple[float, float]:
    """(wall, CPU) seconds for `workers` processes to decode every file with PIL."""
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    start, cpu = time.perf_counter(), _cpu_seconds()
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        assert sum(pool.map(_pil_decode, chunks)) == len(files)
    return time.perf_counter() - start, _cpu_seconds() - cpu


def time_reads(data_dir: Path, seed: int = 0) -> tuple[float, int]:
    """(seconds per sample, samples) reading one image and one label chunk per sample."""
    manifest = load_manifest(data_dir)
    index = [(p, i) for p, n in split_shards(data_dir, manifest, "train") for i in range(n)]
    order = np.random.default_rng(seed).permutation(len(index))
    files: dict[Path, h5py.File] = {}
    start = time.perf_counter()
    for k in order:
        path, i = index[k]
        f = files.get(path) or files.setdefault(path, h5py.File(path, "r"))
        f["image"][i], f["label"][i]
    elapsed = time.perf_counter() - start
    for f in files.values():
        f.close()
    return elapsed / len(index), len(index)


def time_preprocess(city: Path, target: Path, workers: int, shard_size: int,
                    compression: str) -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh preprocessing job (the workers are joined at its end)."""
    shutil.rmtree(target, ignore_errors=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    preprocess(city, target, size=TARGET_SIZE, workers=workers, shard_size=shard_size,
               compression=compression, progress=False)
    return time.perf_counter() - start, _cpu_seconds() - cpu


def run_bench(out: Path, *, frames: int = 64, workers: tuple[int, ...] = (1, 2),
              shard_size: int = 8, compression: str | None = None,
              repeat: int = 2) -> list[dict]:
    """Print the table (best of `repeat` runs each); leaves shards in <out>/shards."""
    out = Path(out)
    compression = compression or DEFAULT_COMPRESSION
    val = max(1, frames // 4)
    city = ensure_city(out / "city", frames, val)
    pairs = find_pairs(city, "train") + find_pairs(city, "val")
    files = [p for pair in pairs for p in (pair.image, pair.label)]
    for path in files:  # warm the page cache so both sides read from memory
        path.read_bytes()
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    n = len(pairs)
    print(f"cityprep bench: {n} pairs (train {frames}, val {val}) at "
          f"{SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} -> {TARGET_SIZE[0]}x{TARGET_SIZE[1]}, "
          f"{megabytes:.0f} MB of PNG, compression {compression}, shard size {shard_size}, "
          f"best of {repeat}")
    rows = []
    for w in sorted(set(workers)):
        pil, prep = (float("inf"),) * 2, (float("inf"),) * 2
        for _ in range(repeat):  # alternate the two sides so that load changes hit both
            pil = tuple(map(min, pil, time_pil_decode(files, w, 2 * shard_size)))
            prep = tuple(map(min, prep, time_preprocess(city, out / "shards", w, shard_size,
                                                        compression)))
        rows.append({"workers": w, "pil_s": pil[0], "preprocess_s": prep[0],
                     "pil_img_s": n / pil[0], "preprocess_img_s": n / prep[0],
                     "pil_mb_s": megabytes / pil[0], "preprocess_mb_s": megabytes / prep[0],
                     "pil_cpu_ms": 1000 * pil[1] / n, "preprocess_cpu_ms": 1000 * prep[1] / n,
                     "ratio": pil[0] / prep[0], "cpu_ratio": pil[1] / prep[1]})
    print(f"{'workers':>7} | {'PIL decode img/s':>16} {'MB/s':>6} {'CPU ms/img':>10} | "
          f"{'preprocess img/s':>16} {'MB/s':>6} {'CPU ms/img':>10} | "
          f"{'speed vs PIL':>12} {'by CPU':>6}")
    for r in rows:
        print(f"{r['workers']:>7} | {r['pil_img_s']:>16.2f} {r['pil_mb_s']:>6.1f} "
              f"{r['pil_cpu_ms']:>10.1f} | {r['preprocess_img_s']:>16.2f} "
              f"{r['preprocess_mb_s']:>6.1f} {r['preprocess_cpu_ms']:>10.1f} | "
              f"{r['ratio']:>11.2f}x {r['cpu_ratio']:>5.2f}x")
    base = rows[0]
    print(f"scaling (img/s relative to {base['workers']} worker(s)): preprocess "
          + ", ".join(f"{r['workers']} -> {r['preprocess_img_s'] / base['preprocess_img_s']:.2f}x"
                      for r in rows)
          + "; PIL decode "
          + ", ".join(f"{r['workers']} -> {r['pil_img_s'] / base['pil_img_s']:.2f}x" for r in rows))
    shards = out / "shards"
    size_mb = sum(p.stat().st_size for p in shards.glob("*.h5")) / 1e6
    per_sample, count = time_reads(shards)
    print(f"shards: {size_mb:.0f} MB in {shards} ({size_mb / n:.2f} MB/sample); reading one "
          f"image + label chunk per sample in random order: {1000 * per_sample:.2f} ms/sample "
          f"({count} samples, one process)")
    return rows
