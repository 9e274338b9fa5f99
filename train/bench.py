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

from train.distributed import local_device
from train.engine import AMP_DTYPES, Config, build_optimizer, cuda_speed_settings, train_step
from train.losses import build_loss
from train.model import UNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_tflops(device: torch.device, amp: str, n: int | None = None,
                          seconds: float = 0.5) -> float:
    """Sustained square-matmul rate in the dtype the convolutions will use.

    8192 x 8192 on a GPU (big enough to fill an H100's tensor cores), 1024 on a CPU; with
    `--amp off` the result depends on TF32 (`engine.set_tf32`), as the convolutions do.
    """
    dtype = AMP_DTYPES[amp] or torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # first call pays for setup
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def run_bench(*, crop: tuple[int, int] = (512, 1024), batch_size: int = 8, amp: str = "bf16",
              width: int = 64, depth: int = 4, num_classes: int = 19, steps: int = 20,
              warmup_steps: int = 3, optimizer: str = "sgd", compile: bool = False,
              channels_last: bool = False, device: str | torch.device = "auto",
              tf32: bool = False, peak_tflops: float | None = None) -> dict:
    """Time `steps` training steps after `warmup_steps`; returns the figures as a dict."""
    dev = local_device(device)
    cuda_speed_settings(dev, tf32=tf32)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(num_classes, width=width, depth=depth).to(dev, memory_format=fmt).train()
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
        "crop": [h, w], "batch_size": batch_size, "amp": amp, "width": width, "depth": depth,
        "compile": compile, "channels_last": channels_last, "tf32": tf32, "steps": steps,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_time_s": seconds, "images_per_s": batch_size / seconds,
        "gflops_per_image": flops / batch_size / 1e9, "achieved_tflops": achieved,
        "peak_tflops": peak_tflops, "peak_source": peak_source, "mfu": achieved / peak_tflops,
        "peak_memory_mb": memory_mb, "memory_kind": memory_kind,
    }


def format_report(r: dict) -> str:
    return "\n".join([
        f"U-Net width {r['width']} depth {r['depth']} ({r['params_m']:.2f} M params), crop "
        f"{r['crop'][0]}x{r['crop'][1]}, batch {r['batch_size']}, amp {r['amp']}, compile "
        f"{r['compile']}, channels_last {r['channels_last']}, on {r['device']}",
        f"  images/s          {r['images_per_s']:.2f}  ({r['step_time_s'] * 1e3:.1f} ms/step)",
        f"  GFLOP per image   {r['gflops_per_image']:.2f}  (forward + backward)",
        f"  achieved TFLOP/s  {r['achieved_tflops']:.3f}",
        f"  MFU               {r['mfu']:.1%} of {r['peak_tflops']:.3f} TFLOP/s "
        f"({r['peak_source']})",
        f"  peak memory       {r['peak_memory_mb']:.0f} MiB ({r['memory_kind']})",
    ])
