"""What recovery costs: `citytrain bench-checkpoint` (a save, against the time between saves
at each --save-every) and `citytrain bench-restart` (the time one SIGKILLed rank costs a run
under torchrun, with step checkpoints and without).

A save holds the training loop for the copy of the state to host memory
(`checkpoint.snapshot`; on a GPU the device-to-host copy); serialising and writing happen in
`CheckpointWriter`'s thread while training goes on, and cost the loop nothing as long as
they end before the next save. Both are measured, and the synchronous save (everything in
the loop) beside them.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from train.bench import bench_model, describe
from train.checkpoint import CheckpointWriter, rng_state, save_checkpoint
from train.distributed import local_device
from train.engine import Config, train_step
from train.losses import build_loss
from train.optim import build_optimizer

EVERY = (50, 100, 200, 500, 1000)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_checkpoint_bench(*, encoder: str = "plain", width: int = 64, depth: int = 4,
                         crop: tuple[int, int] = (512, 1024),
                         batch_size: int = 8, amp: str = "bf16", optimizer: str = "sgd",
                         steps: int = 3, saves: int = 3, every: tuple[int, ...] = EVERY,
                         folder: Path | None = None, step_seconds: float | None = None,
                         device: str = "auto") -> dict:
    """Time `steps` training steps and `saves` saves of the run's whole checkpoint (weights,
    optimizer, RNG, loader position) into `folder` (the run's file system matters); returns
    the figures and, for each --save-every in `every`, the share of time a save takes."""
    dev = local_device(device)
    torch.manual_seed(0)
    model = bench_model(encoder, 19, width=width, depth=depth).to(dev).train()
    criterion = build_loss("segment", palette=np.zeros((19, 3), np.uint8)).to(dev)
    opt = build_optimizer(model, Config(optimizer=optimizer))
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")
    batch = {"image": torch.randn(batch_size, 3, *crop, device=dev),
             "label": torch.randint(0, 19, (batch_size, *crop), device=dev)}
    train_step(model, batch, criterion, opt, scaler, amp=amp)  # optimizer state exists
    _sync(dev)
    if step_seconds is None:
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, batch, criterion, opt, scaler, amp=amp)
        _sync(dev)
        step_seconds, step_source = (time.perf_counter() - start) / steps, "measured"
    else:
        step_source = "given"

    def state() -> dict:  # what fit's Parts.checkpoint holds
        return {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_state(dev), "epoch": 0, "step": 1,
                "loader": {"epoch": 0, "batch": 1, "global_batch": batch_size},
                "config": {"width": width, "depth": depth}}

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "last.pt"
        writer = CheckpointWriter()
        held, written, direct = [], [], []
        for _ in range(saves):
            held.append(writer.save(state(), path))
            writer.wait()
            written.append(writer.write_seconds)
            start = time.perf_counter()
            save_checkpoint(path, state())
            direct.append(time.perf_counter() - start)
        size_mb = path.stat().st_size / 1e6
    held_s, write_s, direct_s = (float(np.median(v)) for v in (held, written, direct))
    rows = []
    for n in every:
        between = n * step_seconds
        stall = held_s + max(0.0, write_s - between)  # a write still going holds the next
        rows.append({"save_every": n, "seconds_between": between,
                     "held_share": stall / (between + stall),
                     "sync_share": direct_s / (between + direct_s),
                     "write_fits": write_s < between})
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "model": describe(model), "width": width, "depth": depth, "crop": list(crop),
            "batch_size": batch_size,
            "amp": amp, "optimizer": optimizer, "checkpoint_mb": size_mb,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "step_seconds": step_seconds, "step_source": step_source, "held_seconds": held_s,
            "write_seconds": write_s, "sync_seconds": direct_s, "saves": saves, "rows": rows,
            "folder": str(folder or tempfile.gettempdir())}


def format_checkpoint_report(r: dict) -> str:
    lines = [
        f"checkpoint of {r['model']} ({r['params_m']:.1f} M "
        f"params, {r['optimizer']}): {r['checkpoint_mb']:.1f} MB, on {r['device']}, in "
        f"{r['folder']}",
        f"  step              {r['step_seconds'] * 1e3:.1f} ms ({r['step_source']}; crop "
        f"{r['crop'][0]}x{r['crop'][1]}, batch {r['batch_size']}, amp {r['amp']})",
        f"  save holds loop   {r['held_seconds'] * 1e3:.1f} ms (copy to host memory), median "
        f"of {r['saves']}",
        f"  write (thread)    {r['write_seconds'] * 1e3:.1f} ms (serialise, write, fsync, "
        "rename)",
        f"  synchronous save  {r['sync_seconds'] * 1e3:.1f} ms (all of it in the loop)",
        "  --save-every   time between saves   save's share (background)   (synchronous)",
    ]
    for row in r["rows"]:
        note = "" if row["write_fits"] else "   write longer than the interval"
        lines.append(f"  {row['save_every']:>12}   {row['seconds_between']:>15.1f} s   "
                     f"{row['held_share']:>24.2%}   {row['sync_share']:>12.2%}{note}")
    return "\n".join(lines)


# -- one SIGKILL under torchrun ----------------------------------------------------------------

def _shards(folder: Path, images: int, val: int, size: tuple[int, int]) -> Path:
    """Random frames of a few classes (speed only) as shards."""
    from pipeline.labels import get_mapping
    from pipeline.shards import write_arrays

    rng = np.random.default_rng(0)
    h, w = size

    def frames(n: int):
        labels = rng.choice(np.array([0, 2, 8, 10, 13], np.uint8), (n, h // 8, w // 8))
        labels = labels.repeat(8, 1).repeat(8, 2)
        images_ = rng.integers(0, 255, (n, h, w, 3), np.uint8)
        return images_, labels, [f"bench_{i:06d}_000019" for i in range(n)]

    return write_arrays(folder, {"train": frames(images), "val": frames(val)},
                        get_mapping("trainid"), 8, "none")


def _torchrun(data: Path, out: Path, *, nproc: int, epochs: int, batch_size: int, width: int,
              kill_after: int, save_every: int) -> tuple[float, str]:
    """One run under torchrun (one restart allowed); its wall seconds and output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "--max-restarts=1", "--monitor-interval=0.5",
               "-m", "train.faults", "--kill-rank", "1", "--after-step", str(kill_after),
               "fit", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
               "--batch-size", str(batch_size), "--crop", "full", "--width", str(width),
               "--amp", "off", "--workers", "0", "--device", "cpu", "--log-every", "1",
               "--save-every", str(save_every), "--eval-every", str(epochs), "--resume",
               "auto", "--no-progress", "--no-preflight"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"torchrun ended with {result.returncode}:\n{result.stdout[-2000:]}"
                           f"{result.stderr[-2000:]}")
    return seconds, result.stdout + result.stderr


def run_restart_bench(out: Path, *, nproc: int = 2, width: int = 16,
                      size: tuple[int, int] = (128, 256), batch_size: int = 2,
                      steps_per_epoch: int = 20, kill_at: float = 0.75, save_every: int = 5,
                      ) -> dict:
    """Three runs of 2 epochs under torchrun on CPU processes: uninterrupted; rank 1
    SIGKILLed `kill_at` through epoch 2 with --save-every `save_every`; the same kill with
    step checkpoints off.

    Time lost to the kill: from the kill until the restarted group is back at the step it
    was killed after (train/faults.py says when), of which the restart is the time to the
    restarted group's first step (torchrun noticing, stopping and starting the group, the
    processes' start-up, loading the checkpoint) and the rest the steps done again. Also the
    killed run's wall time minus the uninterrupted one's, which says the same where the
    machine is quiet."""
    out = Path(out)
    images = steps_per_epoch * batch_size * nproc
    data = _shards(out / "data", images, 2 * nproc, size)
    kill_after = steps_per_epoch + max(1, round(kill_at * steps_per_epoch))
    runs = [("uninterrupted", 0, save_every), ("SIGKILL, step checkpoints", kill_after,
                                               save_every),
            ("SIGKILL, epoch checkpoints only", kill_after, 0)]
    rows = []
    for k, (name, kill, every) in enumerate(runs):
        seconds, log = _torchrun(data, out / f"run{k}", nproc=nproc, epochs=2,
                                 batch_size=batch_size, width=width, kill_after=kill,
                                 save_every=every)
        found = re.search(r"resuming .*: epoch \d+, step (\d+)", log)
        resumed = int(found.group(1)) if found else None
        times = {what: float(t) for what, t in re.findall(
            r"train.faults: .*?(SIGKILLs itself|first step|is back).* at ([\d.]+)", log)}
        since = times.get("SIGKILLs itself")
        rows.append({"run": name, "save_every": every, "killed_after_step": kill or None,
                     "resumed_from_step": resumed,
                     "steps_redone": kill - resumed if resumed is not None else None,
                     "restart_seconds": times["first step"] - since if since else None,
                     "seconds_lost": times["is back"] - since if since else None,
                     "seconds": seconds})
    base = rows[0]["seconds"]
    # one step of the uninterrupted run's second epoch, from its images/s
    with open(out / "run0" / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    step = batch_size * nproc / float(last["images_per_s"])
    for row in rows:
        row["seconds_lost_wall"] = row["seconds"] - base
    return {"nproc": nproc, "width": width, "size": list(size), "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch, "seconds_per_step": step, "rows": rows}


def format_restart_report(r: dict) -> str:
    lines = [f"{r['nproc']} CPU processes under torchrun, U-Net width {r['width']}, "
             f"{r['size'][0]}x{r['size'][1]} images, batch {r['batch_size']} per process, "
             f"{r['steps_per_epoch']} steps an epoch, 2 epochs, "
             f"{r['seconds_per_step'] * 1e3:.0f} ms a step",
             "  run                              --save-every  killed after  resumed at  "
             "redone  restart s  lost s  wall s (lost)"]

    def show(v, fmt="{}"):
        return "-" if v is None else fmt.format(v)

    for row in r["rows"]:
        lines.append(f"  {row['run']:<33}{row['save_every']:>12}  "
                     f"{show(row['killed_after_step']):>12}  "
                     f"{show(row['resumed_from_step']):>10}  {show(row['steps_redone']):>6}  "
                     f"{show(row['restart_seconds'], '{:.1f}'):>9}  "
                     f"{show(row['seconds_lost'], '{:.1f}'):>6}  {row['seconds']:>6.1f} "
                     f"({row['seconds_lost_wall']:+.1f})")
    return "\n".join(lines)
