"""`citytrain gpu-report`: what only a GPU can show, measured in one run of a few minutes.

    citytrain gpu-report --out runs/gpu-report        (make gpu-report: this, then pytest -rs)

1. synthetic shards at 1024x512 whose pixels encode their labels (written once, reused);
2. the loader on the GPU: samples/s and MB/s read with 8 and 16 workers, every augmentation
   on, 512x1024 crops, and image/label alignment checked on the GPU's output (the DALI GPU
   graph; without DALI the torch backend, and the report says so);
3. the peak of a square matmul in each dtype, measured here (the denominator of MFU);
4. training steps of the U-Net (width 64, depth 4, 512x1024, batch 8) under bf16, fp16 and
   off (TF32 off), channels_last off and on, then torch.compile while time is left:
   images/s, MFU against the measured peak, peak GPU memory;
5. the data-wait share over ~100 steps of a real `citytrain fit` on the shards.

It prints the table last and writes report.md and report.json into --out. Every stage is a
function of (device, sizes), so the tests run the same code on the CPU at toy sizes.
"""

from __future__ import annotations

import csv
import itertools
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.labels import get_mapping
from pipeline.loader import build_loader, dali_available
from pipeline.shards import load_manifest, manifest_path, write_arrays
from pipeline.sizes import from_wh
from train.bench import measure_matmul_tflops, run_bench
from train.config import Config
from train.engine import set_tf32

PRIMARIES = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


@dataclass
class Sizes:
    """What the report measures; the defaults are the ones the README's table quotes."""

    shard: tuple[int, int] = (512, 1024)  # H, W of the synthetic shards
    crop: tuple[int, int] = (512, 1024)
    samples: int = 128
    batch_size: int = 8
    width: int = 64
    depth: int = 4
    workers: tuple[int, ...] = (8, 16)
    loader_batches: int = 30
    steps: int = 15
    fit_steps: int = 100
    amps: tuple[str, ...] = ("bf16", "fp16", "off")
    compile: bool = True
    budget_s: float = 330.0  # compile runs only while this much time is not yet spent


def synthetic_shards(folder: Path, sizes: Sizes) -> Path:
    """Shards whose image pixels are the primary colour of their label (classes 0-2).

    Labels come in 16x16 blocks, so after any scale, crop and flip a pixel's colour still
    names its label: that is the alignment check. Written once; a rerun reuses them.
    """
    h, w = sizes.shard
    if manifest_path(folder).is_file():
        manifest = load_manifest(folder)
        if from_wh(manifest["config"]["size"]) == (h, w) and \
                manifest["splits"]["train"]["samples"] == sizes.samples:
            return folder
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (sizes.samples, -(-h // 16), -(-w // 16)), dtype=np.uint8)
    labels = labels.repeat(16, 1).repeat(16, 2)[:, :h, :w]
    names = [f"report_{i:06d}_000019" for i in range(sizes.samples)]
    return write_arrays(folder, {"train": (PRIMARIES[labels], labels, names)},
                        get_mapping("trainid"))


def alignment(loader, batch: dict) -> float:
    """Share of the clearly coloured, unpadded pixels whose colour names their label."""
    mean = torch.tensor(loader.mean, device=batch["image"].device).view(1, 3, 1, 1)
    std = torch.tensor(loader.std, device=batch["image"].device).view(1, 3, 1, 1)
    rgb = batch["image"].float() * std + mean
    strength, colour = rgb.max(1)
    clear = (batch["label"] != 255) & (strength > 0.75)
    agree = (colour == batch["label"]) & clear
    return float(agree.sum() / clear.sum().clamp_min(1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_loader(data: Path, device: torch.device, sizes: Sizes, workers: int) -> dict:
    backend = "dali" if dali_available() else "torch"
    # alignment first, without colour jitter (it moves colours, never pixels)
    plain = build_loader(data, "train", sizes.batch_size, train=True, crop=sizes.crop,
                         jitter=0, device=device, workers=workers, backend=backend)
    shares = [alignment(plain, batch) for batch in itertools.islice(plain, 3)]
    plain.close()
    loader = build_loader(data, "train", sizes.batch_size, train=True, crop=sizes.crop,
                          device=device, workers=workers, backend=backend)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for _ in range(3):  # workers up, pipeline primed
        next(batches)
    _sync(device)
    start = time.perf_counter()
    samples = sum(len(b["label"]) for b in itertools.islice(batches, sizes.loader_batches))
    _sync(device)
    seconds = time.perf_counter() - start
    loader.close()
    h, w = sizes.shard
    return {"backend": backend, "workers": workers, "samples_per_s": samples / seconds,
            "mb_per_s": samples * h * w * 4 / seconds / 1e6, "alignment": min(shares)}


def measure_peaks(device: torch.device, amps: tuple[str, ...]) -> dict:
    """Square-matmul TFLOP/s for each `--amp` measured (fp32 without and with TF32)."""
    peaks = {}
    for amp in amps:
        for tf32 in (False, True) if amp == "off" and device.type == "cuda" else (False,):
            if device.type == "cuda":
                set_tf32(tf32)
            name = {"off": "tf32" if tf32 else "fp32"}.get(amp, amp)
            peaks[name] = measure_matmul_tflops(device, amp)
    if device.type == "cuda":
        set_tf32(False)
    return peaks


def measure_training(device: torch.device, sizes: Sizes, peaks: dict, start: float) -> list:
    configs = [(amp, False, cl) for amp in sizes.amps for cl in (False, True)]
    if sizes.compile:
        configs += [("bf16", True, False), ("bf16", True, True)]
    rows = []
    for amp, compile_, channels_last in configs:
        if compile_ and time.perf_counter() - start > sizes.budget_s:
            rows.append({"amp": amp, "compile": True, "channels_last": channels_last,
                         "skipped": "time budget spent"})
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = run_bench(crop=sizes.crop, batch_size=sizes.batch_size, amp=amp, width=sizes.width,
                      depth=sizes.depth, steps=sizes.steps, warmup_steps=3, compile=compile_,
                      channels_last=channels_last, device=device, tf32=False,
                      peak_tflops=peaks["fp32" if amp == "off" else amp])
        rows.append({k: r[k] for k in ("amp", "compile", "channels_last", "images_per_s",
                                       "step_time_s", "achieved_tflops", "peak_tflops", "mfu",
                                       "peak_memory_mb", "memory_kind", "gflops_per_image")})
    return rows


def measure_data_wait(data: Path, device: torch.device, sizes: Sizes, out: Path,
                      workers: int) -> dict:
    """~fit_steps steps of a real `fit` (bf16); the share of step time spent waiting."""
    from train.fit import fit

    per_epoch = sizes.samples // sizes.batch_size
    epochs = max(2, -(-sizes.fit_steps // per_epoch))
    run = out / "fit"
    shutil.rmtree(run, ignore_errors=True)
    cfg = Config(data=str(data), out=str(run), epochs=epochs, batch_size=sizes.batch_size,
                 crop=sizes.crop, width=sizes.width, depth=sizes.depth, amp="bf16",
                 workers=workers, device=str(device), progress=False, grid_samples=0,
                 eval_every=epochs)
    fit(cfg)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steady = rows[1:]  # the first epoch starts the workers and cuDNN's autotuner
    images = per_epoch * sizes.batch_size
    seconds = [images / float(r["images_per_s"]) for r in steady]
    waited = sum(float(r["data_wait_fraction"]) * t for r, t in zip(steady, seconds))
    return {"steps": int(rows[-1]["step"]), "epochs": len(rows),
            "data_wait_fraction": waited / sum(seconds),
            "first_epoch_data_wait_fraction": float(rows[0]["data_wait_fraction"]),
            "images_per_s": images * len(steady) / sum(seconds)}


def run_report(out: Path, device: torch.device, sizes: Sizes | None = None) -> dict:
    sizes = sizes or Sizes()
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = synthetic_shards(out / "shards", sizes)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "dali": _dali_version()},
        "sizes": {k: v for k, v in asdict(sizes).items() if k != "seen"},
        "loader": [measure_loader(data, device, sizes, w) for w in sizes.workers],
        "peaks_tflops": measure_peaks(device, sizes.amps),
    }
    report["training"] = measure_training(device, sizes, report["peaks_tflops"], start)
    report["data_wait"] = measure_data_wait(data, device, sizes, out, max(sizes.workers))
    report["seconds"] = time.perf_counter() - start
    report["goals"] = goals(report)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(format_report(report) + "\n")
    return report


def _dali_version() -> str | None:
    if not dali_available():
        return None
    import nvidia.dali

    return nvidia.dali.__version__


def goals(r: dict) -> dict:
    """The targets: loader > 2x training, bf16 >= 2.5x fp32, MFU >= 45%, data wait < 2%."""
    done = [t for t in r["training"] if "skipped" not in t]
    best = max((t for t in done if t["amp"] == "bf16"), key=lambda t: t["images_per_s"])
    fp32 = max((t for t in done if t["amp"] == "off"), key=lambda t: t["images_per_s"],
               default=None)
    loader = min(x["samples_per_s"] for x in r["loader"])
    return {
        "loader_over_training": loader / best["images_per_s"],
        "bf16_over_fp32": best["images_per_s"] / fp32["images_per_s"] if fp32 else None,
        "best_bf16_mfu": best["mfu"],
        "data_wait_fraction": r["data_wait"]["data_wait_fraction"],
        "met": {"loader > 2x training": loader > 2 * best["images_per_s"],
                "bf16 >= 2.5x fp32": bool(fp32) and best["images_per_s"]
                >= 2.5 * fp32["images_per_s"],
                "MFU >= 45%": best["mfu"] >= 0.45,
                "data wait < 2%": r["data_wait"]["data_wait_fraction"] < 0.02},
    }


def format_report(r: dict) -> str:
    s = r["sizes"]
    lines = [f"# gpu-report: {r['device']}, {r['date']}",
             f"torch {r['versions']['torch']} (CUDA {r['versions']['cuda']}), DALI "
             f"{r['versions']['dali'] or 'not installed: torch DataLoader backend'}; "
             f"{r['seconds']:.0f} s", "",
             f"Loader: {s['shard'][1]}x{s['shard'][0]} shards, {s['crop'][0]}x{s['crop'][1]} "
             f"crops, batch {s['batch_size']}, every augmentation on", "",
             "| backend | workers | samples/s | MB/s read | label alignment |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {x['backend']} | {x['workers']} | {x['samples_per_s']:.1f} | "
              f"{x['mb_per_s']:.0f} | {x['alignment']:.4f} |" for x in r["loader"]]
    lines += ["", "Matmul peak (TFLOP/s, measured): " + ", ".join(
        f"{k} {v:.1f}" for k, v in r["peaks_tflops"].items()), "",
        f"Training: U-Net w{s['width']} d{s['depth']}, {s['crop'][0]}x{s['crop'][1]}, batch "
        f"{s['batch_size']}, TF32 off", "",
        "| amp | compile | channels_last | images/s | ms/step | TFLOP/s | MFU | peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in r["training"]:
        if "skipped" in t:
            lines.append(f"| {t['amp']} | {t['compile']} | {t['channels_last']} | skipped: "
                         f"{t['skipped']} | | | | |")
            continue
        lines.append(f"| {t['amp']} | {t['compile']} | {t['channels_last']} | "
                     f"{t['images_per_s']:.1f} | {t['step_time_s'] * 1e3:.1f} | "
                     f"{t['achieved_tflops']:.1f} | {t['mfu']:.1%} of {t['peak_tflops']:.1f} | "
                     f"{t['peak_memory_mb'] / 1024:.2f} GiB |")
    d, g = r["data_wait"], r["goals"]
    lines += ["", f"fit, bf16, {d['steps']} steps: data wait {d['data_wait_fraction']:.2%} of "
              f"step time after the first epoch ({d['first_epoch_data_wait_fraction']:.1%} in "
              f"it), {d['images_per_s']:.1f} images/s", "",
              "Goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                    for k, v in g["met"].items()),
              f"(loader {g['loader_over_training']:.1f}x training, bf16 "
              + (f"{g['bf16_over_fp32']:.2f}x" if g["bf16_over_fp32"] else "n/a")
              + f" fp32, best bf16 MFU {g['best_bf16_mfu']:.1%})"]
    return "\n".join(lines)
