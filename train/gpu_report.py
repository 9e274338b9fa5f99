"""`citytrain gpu-report`: what only a GPU can show, measured in one run of a few minutes.

    citytrain gpu-report --out runs/gpu-report        (make gpu-report: this, then pytest -rs)

1. synthetic shards at 1024x512 whose pixels encode their labels (written once, reused);
2. the loader on the GPU with `fit`'s own number of readers: samples/s and MB/s read, every
   augmentation on, 512x1024 crops, and image/label alignment checked on the GPU's output
   (the DALI GPU graph; without DALI the torch backend, and the report says so);
3. the peak of a square matmul in each dtype, measured here (the denominator of MFU);
4. training steps of the U-Net (width 64, depth 4, 512x1024, batch 8) under bf16, fp16 and
   off (TF32 off), channels_last off and on: images/s, MFU against the measured peak, peak
   GPU memory; then the pretrained encoder `make train` trains (ResNet-50 U-Net) under bf16,
   channels_last off and on;
5. the data-wait share over ~100 steps of a real `citytrain fit` at its defaults;
6. the bf16 steps again under torch.compile.

The whole report keeps to a time budget: a phase starts only while the time left covers what
it is expected to take (the longest of its kind so far, or a guess), the loader's timing
and the fit stop at the budget's end, and the report lists what it skipped (the shards and
the matmul peaks, seconds, always run). It prints the
table last and writes report.md and report.json into --out. Every stage is a function of
(device, sizes), so the tests run the same code on the CPU at toy sizes.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import platform
import shutil
import time
from contextlib import contextmanager
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
from train.precision import set_tf32

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
    encoder: str | None = "resnet50"  # the `make train` default, timed beside the U-Net
    workers: tuple[int | None, ...] = (None,)  # loader readers; None: what `fit` takes
    loader_batches: int = 30
    steps: int = 15
    fit_steps: int = 100
    amps: tuple[str, ...] = ("bf16", "fp16", "off")
    compile: bool = True
    budget_s: float = 210.0  # the whole report; `make gpu-report` runs the suite after it
    compile_s: float = 90.0  # expected seconds of a compiled row until one is measured
    fit_startup_s: float = 30.0  # the fit's start: loader workers, pre-flight, autotuning


class Budget:
    """The report's seconds. A phase starts only while the time left covers what it is
    expected to take, the longest phase of its kind so far or `guess`; what does not start
    is listed in `skipped`, with why."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.longest: dict[str, float] = {}
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, phase: str, kind: str, guess: float = 0.0) -> bool:
        need = self.longest.get(kind, guess)
        if self.left() > need:
            return True
        self.skipped.append(f"{phase} (needs about {need:.0f} s, {max(0.0, self.left()):.0f} s "
                            "left)")
        return False

    @contextmanager
    def phase(self, kind: str):
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.longest[kind] = max(self.longest.get(kind, 0.0), took)


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


def measure_loader(data: Path, device: torch.device, sizes: Sizes, workers: int | None,
                   until: float = math.inf) -> dict:
    """Samples/s of `loader_batches` batches (fewer when the clock passes `until`)."""
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
    samples = 0
    for batch in itertools.islice(batches, sizes.loader_batches):
        samples += len(batch["label"])
        if time.perf_counter() > until:
            break
    _sync(device)
    seconds = time.perf_counter() - start
    loader.close()
    h, w = sizes.shard
    return {"backend": backend, "workers": loader.workers, "samples_per_s": samples / seconds,
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


def measure_training(device: torch.device, sizes: Sizes, peaks: dict, budget: Budget, *,
                     compile: bool = False) -> list:
    """One row per precision and layout (compiled: bf16 only); a row the budget does not
    allow says so."""
    configs = [("plain", "bf16", True, cl) for cl in (False, True)] if compile else \
        [("plain", amp, False, cl) for amp in sizes.amps for cl in (False, True)]
    if sizes.encoder and not compile:
        configs += [(sizes.encoder, "bf16", False, cl) for cl in (False, True)]
    rows = []
    for encoder, amp, compile_, channels_last in configs:
        row = {"encoder": encoder, "amp": amp, "compile": compile_,
               "channels_last": channels_last}
        name = f"training {encoder} {amp}{' compiled' if compile_ else ''}" \
               f"{' channels_last' if channels_last else ''}"
        if not budget.allows(name, "compile" if compile_ else "train",
                             sizes.compile_s if compile_ else 0.0):
            rows.append({**row, "skipped": "time budget"})
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with budget.phase("compile" if compile_ else "train"):
            r = run_bench(crop=sizes.crop, batch_size=sizes.batch_size, amp=amp,
                          encoder=encoder, width=sizes.width, depth=sizes.depth, steps=sizes.steps,
                          warmup_steps=3, compile=compile_, channels_last=channels_last,
                          device=device, tf32=False,
                          peak_tflops=peaks["fp32" if amp == "off" else amp])
        rows.append({k: r[k] for k in ("encoder", "amp", "compile", "channels_last",
                                       "images_per_s",
                                       "step_time_s", "achieved_tflops", "peak_tflops", "mfu",
                                       "peak_memory_mb", "memory_kind", "gflops_per_image")})
    return rows


def measure_data_wait(data: Path, device: torch.device, sizes: Sizes, out: Path,
                      time_limit: float | None = None) -> dict:
    """~fit_steps steps of a real `fit` at its defaults (bf16, its number of loader readers),
    stopped by `time_limit` if that comes first; the share of step time spent waiting."""
    from train.fit import fit

    per_epoch = sizes.samples // sizes.batch_size
    epochs = max(2, -(-sizes.fit_steps // per_epoch))
    run = out / "fit"
    shutil.rmtree(run, ignore_errors=True)
    cfg = Config(data=str(data), out=str(run), epochs=epochs, batch_size=sizes.batch_size,
                 crop=sizes.crop, width=sizes.width, depth=sizes.depth, amp="bf16",
                 device=str(device), progress=False, grid_samples=0, eval_every=epochs,
                 time_limit=time_limit)
    fit(cfg)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steady = rows[1:]  # the first epoch starts the workers and cuDNN's autotuner
    if not steady:
        return {"skipped": "the time budget ended the fit in its first epoch"}
    steps = [int(r["step"]) - int(p["step"]) for p, r in zip(rows, steady)]
    seconds = [n * sizes.batch_size / float(r["images_per_s"]) for n, r in zip(steps, steady)]
    waited = sum(float(r["data_wait_fraction"]) * t for r, t in zip(steady, seconds))
    return {"steps": int(rows[-1]["step"]), "epochs": len(rows),
            "data_wait_fraction": waited / sum(seconds),
            "first_epoch_data_wait_fraction": float(rows[0]["data_wait_fraction"]),
            "images_per_s": sum(steps) * sizes.batch_size / sum(seconds)}


def _data_wait_phase(data: Path, device: torch.device, sizes: Sizes, out: Path,
                     budget: Budget, training: list) -> dict:
    """The fit, planned from the bf16 step time measured: its start-up and two epochs (the
    first is left out of the figure) must fit in what is left; it stops at the budget's end."""
    step = next((t["step_time_s"] for t in training
                 if t["amp"] == "bf16" and "skipped" not in t), None)
    if step is None:
        budget.skipped.append("data wait (no bf16 step time to plan the fit by)")
        return {"skipped": "time budget"}
    per_epoch = sizes.samples // sizes.batch_size
    if not budget.allows("data wait", "fit", sizes.fit_startup_s + 2 * per_epoch * step):
        return {"skipped": "time budget"}
    with budget.phase("fit"):
        return measure_data_wait(data, device, sizes, out,
                                 time_limit=budget.left() - sizes.fit_startup_s)


def run_report(out: Path, device: torch.device, sizes: Sizes | None = None) -> dict:
    sizes = sizes or Sizes()
    budget = Budget(sizes.budget_s)
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = synthetic_shards(out / "shards", sizes)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "dali": _dali_version()},
        "sizes": asdict(sizes), "loader": [],
    }
    for workers in sizes.workers:
        readers = "fit's number of" if workers is None else workers
        if budget.allows(f"loader with {readers} readers", "loader"):
            with budget.phase("loader"):
                report["loader"].append(measure_loader(data, device, sizes, workers,
                                                       until=budget.end))
    report["peaks_tflops"] = measure_peaks(device, sizes.amps)
    training = measure_training(device, sizes, report["peaks_tflops"], budget)
    report["data_wait"] = _data_wait_phase(data, device, sizes, out, budget, training)
    if sizes.compile:
        training += measure_training(device, sizes, report["peaks_tflops"], budget, compile=True)
    report["training"] = training
    report["skipped"] = budget.skipped
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
    """The targets: loader > 2x training, bf16 >= 2.5x fp32, MFU >= 45%, data wait < 2%;
    None for what the budget left unmeasured."""
    done = [t for t in r["training"] if "skipped" not in t and t["encoder"] == "plain"]
    encoder = max((t["images_per_s"] for t in r["training"]
                   if "skipped" not in t and t["encoder"] != "plain"), default=None)
    best = max((t for t in done if t["amp"] == "bf16"), key=lambda t: t["images_per_s"],
               default=None)
    fp32 = max((t for t in done if t["amp"] == "off"), key=lambda t: t["images_per_s"],
               default=None)
    loader = min((x["samples_per_s"] for x in r["loader"]), default=None)
    wait = r["data_wait"].get("data_wait_fraction")

    def ratio(a, b):
        return None if a is None or b is None else a / b

    speed = best and best["images_per_s"]
    figures = {"loader_over_training": ratio(loader, speed),
               "bf16_over_fp32": ratio(speed, fp32 and fp32["images_per_s"]),
               "best_bf16_mfu": best and best["mfu"], "data_wait_fraction": wait,
               "encoder_images_per_s": encoder}

    def met(value, ok):
        return None if value is None else bool(ok(value))

    return {**figures, "met": {
        "loader > 2x training": met(figures["loader_over_training"], lambda v: v > 2),
        "bf16 >= 2.5x fp32": met(figures["bf16_over_fp32"], lambda v: v >= 2.5),
        "MFU >= 45%": met(figures["best_bf16_mfu"], lambda v: v >= 0.45),
        "data wait < 2%": met(wait, lambda v: v < 0.02),
        "encoder >= 700 img/s": met(encoder, lambda v: v >= 700)}}


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
        f"Training: U-Net w{s['width']} d{s['depth']} (plain) and the {s['encoder']} U-Net, "
        f"{s['crop'][0]}x{s['crop'][1]}, batch {s['batch_size']}, TF32 off", "",
        "| model | amp | compile | channels_last | images/s | ms/step | TFLOP/s | MFU | "
        "peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in r["training"]:
        if "skipped" in t:
            lines.append(f"| {t['encoder']} | {t['amp']} | {t['compile']} | "
                         f"{t['channels_last']} | skipped: {t['skipped']} | | | | |")
            continue
        lines.append(f"| {t['encoder']} | {t['amp']} | {t['compile']} | {t['channels_last']} | "
                     f"{t['images_per_s']:.1f} | {t['step_time_s'] * 1e3:.1f} | "
                     f"{t['achieved_tflops']:.1f} | {t['mfu']:.1%} of {t['peak_tflops']:.1f} | "
                     f"{t['peak_memory_mb'] / 1024:.2f} GiB |")
    d, g = r["data_wait"], r["goals"]
    if "skipped" in d:
        lines += ["", f"fit, bf16: skipped ({d['skipped']})"]
    else:
        lines += ["", f"fit at its defaults, bf16, {d['steps']} steps: data wait "
                  f"{d['data_wait_fraction']:.2%} of step time after the first epoch "
                  f"({d['first_epoch_data_wait_fraction']:.1%} in it), "
                  f"{d['images_per_s']:.1f} images/s"]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)  # unmeasured

    words = {True: "met", False: "NOT met", None: "not measured"}
    lines += ["", "Goals: " + ", ".join(f"{k}: {words[v]}" for k, v in g["met"].items()),
              f"(loader / training {fmt(g['loader_over_training'], '.1f')}, bf16 / fp32 "
              f"{fmt(g['bf16_over_fp32'], '.2f')}, best bf16 MFU "
              f"{fmt(g['best_bf16_mfu'], '.1%')})"]
    if r["skipped"]:
        lines += ["", f"Skipped to keep to the {r['sizes']['budget_s']:.0f} s budget: "
                  + "; ".join(r["skipped"])]
    return "\n".join(lines)
