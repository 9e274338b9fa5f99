"""`citytrain bench`: training throughput, peak memory and model FLOPs utilisation.

A synthetic batch (no data, no loader) goes through the engine's own `train_step`, so the
figures are those of `citytrain fit` minus data loading. FLOPs are counted once, for a whole
training step (forward and backward), by `torch.utils.flop_counter.FlopCounterMode`; MFU is
achieved FLOP/s over a peak measured on the same device in the step's dtype (a large square
matmul: bf16 or fp16 under AMP, fp32 or TF32 without), unless --peak-tflops gives one. That
is no datasheet figure (an H100 SXM is rated 989 dense bf16 TFLOP/s, a matmul reaches ~800),
but it is what this device does, for this dtype, and it is printed beside the MFU.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import sizes
from train.distributed import local_device
from train.engine import Config, train_step
from train.losses import build_loss
from train.models import model_from_config, settings_taken
from train.optim import build_optimizer
from train.precision import AMP_DTYPES, cuda_speed_settings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_tflops(device: torch.device, amp: str, n: int | None = None,
                          seconds: float = 0.5) -> float:
    """Sustained square-matmul rate in the dtype the convolutions will use.

    8192 x 8192 on a GPU (big enough to fill an H100's tensor cores), 1024 on a CPU; with
    `--amp off` the result depends on TF32 (`precision.set_tf32`), as the convolutions do.
    """
    dtype = AMP_DTYPES[amp] or torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # first call pays for setup
    _sync(device)
    block = 10 if device.type == "cuda" else 1  # queued back to back: no launch gap per matmul
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(block):
            a @ b
        count += block
        _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def bench_model(encoder: str, num_classes: int, *, width: int, depth: int) -> torch.nn.Module:
    """Model `encoder` with random weights (speed only); `width`/`depth` where it takes them."""
    shape = {k: v for k, v in {"width": width, "depth": depth}.items()
             if k in settings_taken(encoder)}
    return model_from_config(Config(encoder=encoder, **shape), num_classes, pretrained=False)


def describe(model: torch.nn.Module) -> str:
    c = model.config
    if c["encoder"] == "plain":
        return f"U-Net width {c['width']} depth {c['depth']}"
    return f"{c['encoder']} U-Net"


def run_bench(*, crop: tuple[int, int] = (512, 1024), batch_size: int = 8, amp: str = "bf16",
              encoder: str = "plain", width: int = 64, depth: int = 4, num_classes: int = 19,
              steps: int = 20,
              warmup_steps: int = 3, optimizer: str = "sgd", compile: bool = False,
              channels_last: bool = False, device: str | torch.device = "auto",
              tf32: bool = False, peak_tflops: float | None = None) -> dict:
    """Time `steps` training steps after `warmup_steps`; returns the figures as a dict."""
    dev = local_device(device)
    cuda_speed_settings(dev, tf32=tf32)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = bench_model(encoder, num_classes, width=width, depth=depth)
    model = model.to(dev, memory_format=fmt).train()
    criterion = build_loss("segment", palette=np.zeros((num_classes, 3), np.uint8)).to(dev)
    opt = build_optimizer(model, Config(optimizer=optimizer))
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")
    h, w = crop
    batch = {"image": torch.randn(batch_size, 3, h, w, device=dev).contiguous(memory_format=fmt),
             "label": torch.randint(0, num_classes, (batch_size, h, w), device=dev)}

    with FlopCounterMode(display=False) as counter:
        train_step(model, batch, criterion, opt, scaler, amp=amp)
    flops = counter.get_total_flops()

    step_model = torch.compile(model) if compile else model
    for _ in range(warmup_steps):
        train_step(step_model, batch, criterion, opt, scaler, amp=amp)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(step_model, batch, criterion, opt, scaler, amp=amp)
    loss.item()
    _sync(dev)
    seconds = (time.perf_counter() - start) / steps

    if dev.type == "cuda":
        memory_mb, memory_kind = torch.cuda.max_memory_allocated(dev) / 2**20, "CUDA allocated"
    else:  # Linux reports kilobytes; the whole process, libraries included
        memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory_kind = "process RSS"
    if peak_tflops is not None:
        peak_source = "given"
    else:
        peak_tflops = measure_matmul_tflops(dev, amp)
        kind = str(AMP_DTYPES[amp] or ("tf32" if tf32 and dev.type == "cuda" else "fp32"))
        peak_source = f"measured {kind.removeprefix('torch.')} matmul on this " \
                      f"{'GPU' if dev.type == 'cuda' else 'CPU'}"
    achieved = flops / seconds / 1e12
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "crop": sizes.to_file(crop), "batch_size": batch_size, "amp": amp, "encoder": encoder,
        "model": describe(model), "width": width, "depth": depth,
        "compile": compile, "channels_last": channels_last, "tf32": tf32, "steps": steps,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_time_s": seconds, "images_per_s": batch_size / seconds,
        "gflops_per_image": flops / batch_size / 1e9, "achieved_tflops": achieved,
        "peak_tflops": peak_tflops, "peak_source": peak_source, "mfu": achieved / peak_tflops,
        "peak_memory_mb": memory_mb, "memory_kind": memory_kind,
    }


def _hw(size: dict) -> str:
    """A crop or window of a report, as typed: HxW."""
    return sizes.text(sizes.from_file(size), "HxW")


def format_report(r: dict) -> str:
    return "\n".join([
        f"{r['model']} ({r['params_m']:.2f} M params), crop "
        f"{_hw(r['crop'])} (HxW), batch {r['batch_size']}, amp {r['amp']}, compile "
        f"{r['compile']}, channels_last {r['channels_last']}, on {r['device']}",
        f"  images/s          {r['images_per_s']:.2f}  ({r['step_time_s'] * 1e3:.1f} ms/step)",
        f"  GFLOP per image   {r['gflops_per_image']:.2f}  (forward + backward)",
        f"  achieved TFLOP/s  {r['achieved_tflops']:.3f}",
        f"  MFU               {r['mfu']:.1%} of {r['peak_tflops']:.3f} TFLOP/s "
        f"({r['peak_source']})",
        f"  peak memory       {r['peak_memory_mb']:.0f} MiB ({r['memory_kind']})",
    ])


def format_table(reports: list[dict]) -> str:
    """One line per model, the first row's images/s the ratios' base."""
    base = reports[0]["images_per_s"]
    lines = [f"{'model':<28} {'params':>8} {'GFLOP/img':>10} {'images/s':>9} "
             f"{'vs first':>8} {'MFU':>6}"]
    for r in reports:
        lines.append(f"{r['model']:<28} {r['params_m']:>7.1f}M {r['gflops_per_image']:>10.1f} "
                     f"{r['images_per_s']:>9.2f} {r['images_per_s'] / base:>7.2f}x "
                     f"{r['mfu']:>6.1%}")
    r = reports[0]
    lines.append(f"(training steps, crop {_hw(r['crop'])} (HxW), batch "
                 f"{r['batch_size']}, amp {r['amp']}, on {r['device']}; GFLOP forward + "
                 "backward)")
    return "\n".join(lines)


# -- inference: whole, slide, slide + flip + scales; scoring against the official evaluator ---

def run_inference_bench(*, size: tuple[int, int] = (1024, 2048), encoder: str = "plain",
                        width: int = 16, depth: int = 4, num_classes: int = 19,
                        window: tuple[int, int] = (512, 1024),
                        stride: tuple[int, int] | None = None,
                        scales: tuple[float, ...] = (0.75, 1.0, 1.25), images: int = 2,
                        warmup: int = 1, max_windows: int = 4, amp: str = "off",
                        device: str = "auto") -> dict:
    """Images/s of train.evaluation.inference.infer on one (H, W) image for whole, slide, and
    slide with flip and `scales`, with model `encoder` (plain: of `width`/`depth`; random
    weights: speed only)."""
    from train.evaluation.inference import Inference, infer

    dev = local_device(device)
    torch.manual_seed(0)
    model = bench_model(encoder, num_classes, width=width, depth=depth).to(dev).eval()
    x = torch.randn(1, 3, *size, device=dev)
    settings = {
        "whole": Inference(max_windows=max_windows),
        "slide": Inference("slide", window, stride, max_windows=max_windows),
        f"slide+flip+{len(scales)} scales": Inference("slide", window, stride, tuple(scales),
                                                      True, max_windows),
    }
    rows = []
    for name, s in settings.items():
        kwargs = dict(mode=s.mode, window=s.window, stride=s.stride, scales=s.scales,
                      flip=s.flip, max_windows=s.max_windows, amp=amp)
        for _ in range(warmup):
            infer(model, x, **kwargs)
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        start = time.perf_counter()
        for _ in range(images):
            infer(model, x, **kwargs).sum().item()
        _sync(dev)
        seconds = (time.perf_counter() - start) / images
        row = {"setting": name, "inference": s.to_json(), "seconds_per_image": seconds,
               "images_per_s": 1 / seconds}
        if dev.type == "cuda":
            row["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        rows.append(row)
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "size": sizes.to_file(size), "encoder": encoder,
            "model": describe(model), "width": width, "depth": depth, "amp": amp,
            "images": images, "rows": rows}


def format_inference_report(r: dict) -> str:
    size = sizes.text(sizes.from_file(r["size"]), "WxH")
    lines = [f"inference on {size} (WxH), {r['model']}, amp "
             f"{r['amp']}, on {r['device']} ({r['threads']} threads), {r['images']} images"]
    base = r["rows"][0]["images_per_s"]
    for row in r["rows"]:
        s = row["inference"]
        detail = "" if s["mode"] == "whole" else \
            f"  window {_hw(s['window'])} stride {_hw(s['stride'])} (HxW)" \
            f", scales {','.join(map(str, s['scales']))}, flip {s['flip']}"
        mem = f", peak {row['peak_memory_mb']:.0f} MiB" if "peak_memory_mb" in row else ""
        lines.append(f"  {row['setting']:<24} {row['images_per_s']:8.3f} images/s "
                     f"({row['images_per_s'] / base:.2f}x whole{mem}){detail}")
    return "\n".join(lines)


def official_scores(datadir, predictions, split: str = "val") -> tuple[dict, float]:
    """cityscapesScripts' evalPixelLevelSemanticLabeling on `predictions` (instance scores
    on, quiet, no JSON file): its four scores and its seconds. Needs cityscapesscripts."""
    import importlib
    from pathlib import Path

    try:
        ev = importlib.import_module(
            "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    except ImportError:
        raise RuntimeError("the official evaluator is not installed: pip install "
                           "cityscapesscripts (or the project's [dev] extra)") from None
    if not hasattr(np, "in1d"):  # it still calls np.in1d, which numpy 2.4 removed
        np.in1d = lambda a, b, *args, **kw: np.isin(a, b, *args, **kw)
    settings = {"evalInstLevelScore": True, "evalPixelAccuracy": False, "JSONOutput": False,
                "quiet": True, "predictionPath": str(predictions), "predictionWalk": None}
    saved = {k: getattr(ev.args, k) for k in settings}
    try:
        for key, value in settings.items():
            setattr(ev.args, key, value)
        start = time.perf_counter()
        gts = sorted(str(p) for p in Path(datadir).glob(f"gtFine/{split}/*/*_gtFine_labelIds.png"))
        preds = [ev.getPrediction(ev.args, g) for g in gts]
        result = ev.evaluateImgLists(preds, gts, ev.args)
        seconds = time.perf_counter() - start
    finally:
        for key, value in saved.items():
            setattr(ev.args, key, value)

    def nan_none(v):
        return None if v != v else v

    return {"miou": nan_none(result["averageScoreClasses"]),
            "iiou": nan_none(result["averageScoreInstClasses"]),
            "category_miou": nan_none(result["averageScoreCategories"]),
            "category_iiou": nan_none(result["averageScoreInstCategories"]),
            "images": len(gts)}, seconds


def compare_official(datadir, predictions, split: str = "val", device: str = "cpu") -> dict:
    """Our scoring (train.evaluation.full_resolution.score_predictions) and the official
    evaluator on the same labelId PNGs: both sets of four scores, both times."""
    from train.evaluation.full_resolution import score_predictions

    start = time.perf_counter()
    ours = score_predictions(datadir, predictions, split, device=local_device(device))
    our_seconds = time.perf_counter() - start
    theirs, their_seconds = official_scores(datadir, predictions, split)
    keys = ("miou", "iiou", "category_miou", "category_iiou")
    diff = max((abs(ours[k] - theirs[k]) for k in keys
                if ours[k] is not None and theirs[k] is not None), default=0.0)
    return {"images": ours["images"], "ours": {k: ours[k] for k in keys},
            "official": {k: theirs[k] for k in keys}, "max_difference": diff,
            "our_seconds": our_seconds, "official_seconds": their_seconds,
            "speedup": their_seconds / max(our_seconds, 1e-9)}


def format_comparison(r: dict) -> str:
    def fmt(v):
        return "   n/a" if v is None else f"{v:.4f}"

    lines = [f"{r['images']} images          ours   official"]
    for k in ("miou", "iiou", "category_miou", "category_iiou"):
        lines.append(f"  {k:<16} {fmt(r['ours'][k])}   {fmt(r['official'][k])}")
    lines.append(f"  max difference   {r['max_difference']:.2e}")
    lines.append(f"  seconds          {r['our_seconds']:.2f}   {r['official_seconds']:.2f}   "
                 f"(official / ours: {r['speedup']:.2f}x)")
    return "\n".join(lines)
