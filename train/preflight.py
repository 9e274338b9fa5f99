"""Before training: will one step fit? Measured on a small probe, not learned from the OOM killer.

A U-Net step's memory is a fixed part (the process, weights, gradients, optimizer state) plus
activations that grow linearly with the images' pixels. Probe steps of the configured model
and precision on this device, at batch 1 and 2 on a crop of half the height and width, give
both parts; the configured batch follows by extrapolation. On a GPU the second of two steps
is measured (the first includes cuDNN's autotuning); on the CPU one step, the optimizer's
state (created after its peak) added from the parameter count. The probes take seconds where
the real step could take the whole host.

On CUDA it is measured with the allocator's peak (`max_memory_allocated`) against the GPU's
free memory; on the CPU with the process's peak resident size (reset through
/proc/self/clear_refs) against what the host and its cgroup have available, for all local
ranks together plus their loader workers (`GpuMemory` and `HostMemory`, the two counters; a
test hands the probe a GPU counter with made-up figures to run the GPU's protocol on the CPU).
Every rank takes the same decision; where the step won't fit, the run stops with one message
giving both figures and settings that would fit.
"""

from __future__ import annotations

import ctypes
import gc
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.host import available_memory
from train import distributed
from train.config import AgreedError, Config
from train.engine import train_step
from train.losses import build_loss, output_channels
from train.models import model_from_config, settings_taken
from train.optim import build_optimizer

GB = 1e9
# Resident memory of one loader worker process (measured: a DALI reader ~200 MB; a torch
# DataLoader worker holds torch itself, most of it shared library pages)
WORKER_BYTES = {"dali": 0.25 * GB, "torch": 0.6 * GB}
MARGIN = 1.1  # allocator fragmentation, cuDNN workspaces, the loader's own batches


@dataclass(frozen=True)
class Estimate:
    fixed: float  # bytes: the process, weights, gradients, optimizer state
    per_pixel: float  # bytes per pixel of the batch (images x H x W)
    multiple: int = 1  # the model pads its input to a multiple of this

    def need(self, batch: int, pixels: int) -> float:
        return MARGIN * (self.fixed + self.per_pixel * batch * pixels)


def _status(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def _peak_rss() -> float:
    peak = _status("VmHWM")
    return peak if peak is not None else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc; elsewhere there is nothing to trim
    except (OSError, AttributeError):
        pass


class HostMemory:
    """The CPU's counter: the process's peak resident size, against what the host and its
    cgroup have for all local ranks. One probe step is measured (they are slow here)."""

    gpu = False

    def budget(self, dist: distributed.Dist) -> tuple[float, str, int]:
        """(bytes, where, ranks sharing them). What the ranks already hold counts in their
        need, so it counts in the budget too (with --preflight-only one process stands for
        all LOCAL_WORLD_SIZE of them)."""
        held = torch.tensor([_status("VmRSS") or 0.0], dtype=torch.float64)
        budget = float(available_memory()) + float(distributed.all_reduce_sum(held))
        return budget, ("on this host (available memory within any cgroup limit, plus what "
                        "these processes hold)"), dist.local_world_size

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        except OSError:
            pass  # the peak only grows then; the probes run smallest first

    def peak(self) -> float:
        return _peak_rss()

    def release(self) -> None:  # freed memory back, or the next probe's peak starts from this
        _malloc_trim()


class GpuMemory:
    """CUDA's counter: the caching allocator's peak, against the GPU's free memory. Steps are
    cheap there: two per probe, the second measured, past cuDNN's autotuning (its trial
    workspaces) and with the optimizer state held."""

    gpu = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def budget(self, dist: distributed.Dist) -> tuple[float, str, int]:
        return float(torch.cuda.mem_get_info(self.device)[0]), f"free on {self.device}", 1

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> float:
        torch.cuda.synchronize(self.device)
        return float(torch.cuda.max_memory_allocated(self.device))

    def release(self) -> None:
        torch.cuda.empty_cache()


def memory_of(device: torch.device) -> HostMemory | GpuMemory:
    return GpuMemory(device) if device.type == "cuda" else HostMemory()


def probe(cfg: Config, num_classes: int, crop: tuple[int, int], device: torch.device,
          memory: HostMemory | GpuMemory | None = None) -> Estimate:
    """Real training steps of a throwaway copy of the model at batch 1 and at batch 2 (two
    each on a GPU, the second measured), on a crop of half the height and width; returns the
    fitted fixed and per-pixel memory. `memory`: the device's counter (`memory_of`)."""
    memory = memory or memory_of(device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    peaks = []
    gpu = memory.gpu
    _malloc_trim()
    for batch in (1, 2):
        memory.reset()
        model = model_from_config(cfg, output_channels(cfg.losstype, num_classes),
                                  pretrained=False)
        m = model.size_multiple
        h, w = (max(m, crop[0] // 2 // m * m), max(m, crop[1] // 2 // m * m))
        model = model.to(device, memory_format=fmt).train()
        optimizer = build_optimizer(model, cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        criterion = build_loss(cfg.losstype, palette=[[0, 0, 0]] * num_classes).to(device)
        data = {"image": torch.randn(batch, 3, h, w, device=device).contiguous(
                    memory_format=fmt),
                "label": torch.zeros(batch, h, w, dtype=torch.long, device=device)}
        train_step(model, data, criterion, optimizer, scaler, amp=cfg.amp)
        if gpu:  # measure the second step
            memory.reset()
            train_step(model, data, criterion, optimizer, scaler, amp=cfg.amp)
        peaks.append(memory.peak())
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        del model, optimizer, scaler, criterion, data
        gc.collect()
        memory.release()
    per_pixel = max(0.0, (peaks[1] - peaks[0]) / (h * w))
    # On the CPU the one step measured made the optimizer's buffers after its peak; from the
    # second step on they stay through every peak (on a GPU the second step held them).
    buffers = 0 if gpu else {"sgd": 1 if cfg.momentum else 0, "adamw": 2}.get(cfg.optimizer, 2)
    return Estimate(fixed=max(0.0, peaks[0] - per_pixel * h * w) + buffers * params,
                    per_pixel=per_pixel, multiple=m)


def _crop_that_fits(estimate: Estimate, budget: float, batch: int, crop: tuple[int, int],
                    multiple: int) -> tuple[int, int] | None:
    pixels = (budget / MARGIN - estimate.fixed) / max(estimate.per_pixel * batch, 1e-9)
    if pixels <= 0:
        return None
    f = min(1.0, math.sqrt(pixels / (crop[0] * crop[1])))
    h, w = (int(crop[0] * f) // multiple * multiple, int(crop[1] * f) // multiple * multiple)
    return (h, w) if h >= multiple and w >= multiple else None


SLOW_STEP_S = 1.0  # a CPU step this slow gets its run's duration estimated before it starts


def step_seconds(cfg: Config, num_classes: int, crop: tuple[int, int],
                 device: torch.device) -> float:
    """How long one training step of `cfg` takes on the CPU: a step of a throwaway model at
    the configured batch and crop, timed. A model's first step carries a second or two of
    fixed costs (memory, kernel choices); where that would weigh, a second step is timed."""
    model = model_from_config(cfg, output_channels(cfg.losstype, num_classes),
                              pretrained=False).to(device).train()
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    criterion = build_loss(cfg.losstype, palette=[[0, 0, 0]] * num_classes).to(device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    data = {"image": torch.randn(cfg.batch_size, 3, *crop, device=device).contiguous(
                memory_format=fmt),
            "label": torch.zeros(cfg.batch_size, *crop, dtype=torch.long, device=device)}
    for _ in range(2):
        tick = time.perf_counter()
        train_step(model, data, criterion, optimizer, scaler, amp=cfg.amp)
        seconds = time.perf_counter() - tick
        if seconds >= 10 * SLOW_STEP_S:  # the fixed costs are noise at this scale
            break
    del model, optimizer, data
    gc.collect()
    _malloc_trim()
    return seconds


def time_estimate(step_s: float, steps_per_epoch: int, cfg: Config) -> str:
    """What a slow CPU run will take, from `step_seconds` (`check_fits`' step_s)."""
    from train.rundir import duration

    epoch = step_s * steps_per_epoch
    text = (f"preflight: on the CPU one step (batch {cfg.batch_size}) takes about "
            f"{duration(step_s)} (timed): about {duration(epoch)} per epoch of "
            f"{steps_per_epoch} steps, {duration(epoch * cfg.epochs)} for {cfg.epochs} epochs")
    if cfg.time_limit is not None:
        steps = max(1, int(cfg.time_limit // step_s))
        text += (f"; --time-limit {cfg.time_limit:g} s stops it after about {steps} "
                 f"step{'s' if steps > 1 else ''}")
    faster = ["a GPU", *(["--amp bf16"] if cfg.amp == "off" else []),
              "a smaller --crop, --batch-size or model"]
    return f"{text}. Faster: {', '.join(faster)}"


def check_fits(cfg: Config, dist: distributed.Dist, num_classes: int, crop: tuple[int, int],
               workers: int, backend: str, memory: HostMemory | GpuMemory | None = None) \
        -> dict:
    """Stop (TrainingError) when one step at the configured size will not fit; returns the
    figures (for config.json). Every rank calls this, and all agree on the verdict."""
    memory = memory or memory_of(dist.device)
    gpu = memory.gpu
    distributed.barrier()
    budget, where, ranks = memory.budget(dist)
    distributed.barrier()  # every rank has looked before any probe allocates
    tick = time.perf_counter()
    estimate = probe(cfg, num_classes, crop, dist.device, memory)
    probe_s = time.perf_counter() - tick
    # the ranks agree on one set of figures (the largest need, the smallest budget), so they
    # take one decision and rank 0's message is every rank's
    agreed = torch.tensor([estimate.fixed, estimate.per_pixel, -budget], dtype=torch.float64)
    fixed, per_pixel, budget = distributed.all_reduce_max(agreed.to(dist.device)).tolist()
    estimate, budget = Estimate(fixed, per_pixel, estimate.multiple), -budget
    pixels = crop[0] * crop[1]
    step = estimate.need(cfg.batch_size, pixels)
    workers_bytes = 0.0 if gpu else 2 * workers * WORKER_BYTES.get(backend, GB) * ranks
    total = step * ranks + workers_bytes
    figures = {"step_gb": step / GB, "total_gb": total / GB, "budget_gb": budget / GB,
               "per_pixel_bytes": estimate.per_pixel, "fixed_gb": estimate.fixed / GB}
    if total <= budget:
        if not gpu and probe_s * cfg.batch_size * 4 / 3 >= SLOW_STEP_S:
            # The probes ran 3/4 of an image's pixels; scaled to the batch their time bounds
            # a step's from above (small steps are mostly fixed costs). A run whose step may
            # be this slow is worth one real step, timed: it fits, as just measured.
            figures["step_s"] = step_seconds(cfg, num_classes, crop, dist.device)
        return figures
    per_rank = (budget - workers_bytes) / ranks
    hints = []
    batch = int((per_rank / MARGIN - estimate.fixed) // max(estimate.per_pixel * pixels, 1e-9))
    if batch >= 1:
        hints.append(f"--batch-size {min(batch, cfg.batch_size - 1)}")
    small = _crop_that_fits(estimate, per_rank, cfg.batch_size, crop, estimate.multiple)
    if small:
        hints.append(f"--crop {small[0]}x{small[1]}")
    plain = "width" in settings_taken(cfg.encoder)
    width = cfg.width // 2
    while plain and width >= 1 and \
            estimate.need(cfg.batch_size, pixels) * width / cfg.width > per_rank:
        width //= 2
    if plain and width >= 1:
        hints.append(f"--width {width} (about)")
    if cfg.amp == "off":
        hints.append("--amp bf16 (about half the activations)")
    who = f"{ranks} processes on this host" if ranks > 1 else "this process"
    raise AgreedError(
        f"not enough memory: one training step at batch {cfg.batch_size}, crop "
        f"{crop[0]}x{crop[1]} (HxW), " + (f"width {cfg.width}" if plain else cfg.encoder)
        + f", --amp {cfg.amp} needs about {step / GB:.1f} "
        f"GB per process, {total / GB:.1f} GB for {who}"
        + (" with their loader workers" if workers_bytes else "")
        + f", against {budget / GB:.1f} GB {where}. It would fit with "
        + (", or ".join(hints) if hints else "a smaller model")
        + " (measured on a small probe step; --no-preflight skips this check)")
