"""`cityprep bench`: preprocessing 2048x1024 -> 1024x512 against PIL merely decoding the PNGs.

Both sides run on the same files, with the same number of worker processes, on a warm page
cache, pool start-up included. The target: preprocessing (decode, check, remap, resize,
statistics, write, checksum) is no slower than PIL's decode alone, and near-linear in workers.
Besides wall-clock rates it reports CPU time per image (the processes' own and their
workers'), which other load on a shared machine does not distort.
A last pass reads the shards back the way the loader does (one image and one label chunk per
sample, in random order) to show what the compression setting costs on the reading side.

`run_archive_bench` (`cityprep bench-archives`) times the same job from zips of that city, laid
out as the official downloads (stored, and deflated), against the extracted files, in one run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from pipeline import sizes
from pipeline.cityscapes import find_pairs
from pipeline.host import cpu_seconds
from pipeline.preprocess import DEFAULT_COMPRESSION, preprocess
from pipeline.shards import load_manifest, split_shards

SOURCE_SIZE = (1024, 2048)  # H, W
TARGET_SIZE = (512, 1024)


def ensure_city(root: Path, frames: int, val: int) -> Path:
    """Synthesize the benchmark city once; a later run with the same counts reuses it."""
    from pipeline.synth import synthesize

    marker = root / "bench-city.json"
    want = {"train": frames, "val": val, "size": sizes.to_file(SOURCE_SIZE), "seed": 0}
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


def time_pil_decode(files: list[Path], workers: int, chunk: int) -> tuple[float, float]:
    """(wall, CPU) seconds for `workers` processes to decode every file with PIL."""
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    start, cpu = time.perf_counter(), cpu_seconds()
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        assert sum(pool.map(_pil_decode, chunks)) == len(files)
    return time.perf_counter() - start, cpu_seconds() - cpu


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
    start, cpu = time.perf_counter(), cpu_seconds()
    preprocess(city, target, size=TARGET_SIZE, workers=workers, shard_size=shard_size,
               compression=compression, progress=False)
    return time.perf_counter() - start, cpu_seconds() - cpu


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
          f"{sizes.text(SOURCE_SIZE, 'WxH')} -> {sizes.text(TARGET_SIZE, 'WxH')}, "
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


# -- from the official zips against the extracted tree -----------------------------------------

ZIP_COMPRESSIONS = {"stored": zipfile.ZIP_STORED, "deflated": zipfile.ZIP_DEFLATED}


def ensure_zips(city: Path, dest: Path, compression: str) -> Path:
    """leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip of `city` in `dest`, laid out
    as the downloads are; kept while the city is the same."""
    marker, want = dest / "bench-zips.json", (city / "bench-city.json").read_text()
    if marker.is_file() and marker.read_text() == want:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for top in ("leftImg8bit", "gtFine"):
        with zipfile.ZipFile(dest / f"{top}_trainvaltest.zip", "w",
                             ZIP_COMPRESSIONS[compression]) as z:
            z.writestr("README", f"{top} of the synthetic benchmark city\n")
            z.writestr("license.txt", "Synthetic data, no licence terms.\n")
            for path in sorted((city / top).rglob("*")):
                z.write(path, path.relative_to(city).as_posix() + "/" * path.is_dir())
    marker.write_text(want)
    return dest


def run_archive_bench(out: Path, *, frames: int = 64, workers: tuple[int, ...] = (1, 2),
                      shard_size: int = 8, repeat: int = 2) -> list[dict]:
    """Print preprocessing from the extracted tree against from zips of it (stored and
    deflated), in one run on one city, best of `repeat`; checks the shards are the same."""
    out = Path(out)
    val = max(1, frames // 4)
    city = ensure_city(out / "city", frames, val)
    sources = {"extracted": city}
    for kind in ZIP_COMPRESSIONS:
        sources[f"zip ({kind})"] = ensure_zips(city, out / f"zips-{kind}", kind)
    n = len(find_pairs(city, "train")) + len(find_pairs(city, "val"))
    for root in sources.values():  # warm the page cache so every side reads from memory
        for path in root.rglob("*.*"):
            path.read_bytes()
    input_mb = {name: sum(p.stat().st_size for p in root.rglob("*.png")) / 1e6 if name ==
                "extracted" else sum(p.stat().st_size for p in root.glob("*.zip")) / 1e6
                for name, root in sources.items()}
    print(f"cityprep bench-archives: {n} pairs (train {frames}, val {val}) at "
          f"{sizes.text(SOURCE_SIZE, 'WxH')} -> {sizes.text(TARGET_SIZE, 'WxH')}, "
          f"shard size {shard_size}, best of {repeat}; input MB: "
          + ", ".join(f"{k} {v:.0f}" for k, v in input_mb.items()))
    rows, digests = [], {}
    for w in sorted(set(workers)):
        best = {name: (float("inf"), float("inf")) for name in sources}
        for _ in range(repeat):  # interleave the sides so that load changes hit all of them
            for name, root in sources.items():
                target = out / "shards-archives"
                best[name] = tuple(map(min, best[name], time_preprocess(
                    root, target, w, shard_size, DEFAULT_COMPRESSION)))
                digests[name] = [e["sha256"] for s in load_manifest(target)["splits"].values()
                                 for e in s["shards"]]
        base = best["extracted"]
        for name, (wall, cpu) in best.items():
            rows.append({"source": name, "workers": w, "img_s": n / wall,
                         "cpu_ms": 1000 * cpu / n, "wall_ratio": base[0] / wall,
                         "cpu_ratio": cpu / base[1]})
    same = all(d == digests["extracted"] for d in digests.values())
    print(f"{'source':<16} {'workers':>7} | {'img/s':>7} {'CPU ms/img':>10} | "
          f"{'speed vs extracted':>18} {'CPU vs extracted':>16}")
    for r in rows:
        print(f"{r['source']:<16} {r['workers']:>7} | {r['img_s']:>7.2f} {r['cpu_ms']:>10.1f} | "
              f"{r['wall_ratio']:>17.2f}x {r['cpu_ratio']:>15.2f}x")
    print(f"shards from every source {'identical' if same else 'DIFFER'} (sha256 per shard)")
    if not same:
        raise RuntimeError("shards from the archives differ from the extracted tree's")
    return rows
