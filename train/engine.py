"""The training machinery: one optimizer step, one epoch.

Read top to bottom: one step, the signal handler, what a run carries, the logs, one epoch
(evaluation is `train/evaluation/`'s). The optimizer and its schedule are `train/optim.py`'s,
precision (autocast, TF32, cuDNN) `train/precision.py`'s; settings and errors live in
`train/config.py`; `train/fit.py` wires these to the loader, model, checkpoints and run
directory. One process or many (torchrun) run the same code.

On a GPU the host must run ahead of the device: nothing in a step reads a value back. The
losses stay on the device and are read, with the stop flag and the clock, in one all-reduce
every `log_every` steps (`train_one_epoch`), which is also when the non-finite check runs.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn
from tqdm import tqdm

from pipeline import progress
from train import distributed
from train.config import Config, Interrupted, TrainingError
from train.optim import lr_factor
from train.precision import autocast

__all__ = ["Config", "Interrupted", "TrainingError"]  # re-exported for callers


def train_step(model: nn.Module, batch: dict, criterion: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
               amp: str, clip_grad: float | None = None) -> torch.Tensor:
    """Forward under autocast, loss in fp32, backward, clip, step. Returns the detached loss."""
    image, label = batch["image"], batch["label"]
    with autocast(image.device, amp):
        outputs = model(image)
    loss = criterion(outputs.float(), label)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


class Stopper:
    """SIGTERM/SIGINT ask the run to stop after the current step (a second SIGINT kills it).

    Another SIGTERM changes nothing: a scheduler and a launcher both send one (SLURM signals
    every process of the job step, and torchrun passes its own on to its workers), and the
    second must not kill the run in the middle of the save the first one asked for.

    With `announce` (rank 0) the first signal is acknowledged at once on stderr: a CPU step
    can take minutes, and a run that seems to ignore its signal gets killed outright.
    """

    def __init__(self, announce: bool = False) -> None:
        self.signum: int | None = None
        self.announce = announce

    def _handle(self, signum, frame) -> None:
        if self.announce and self.signum is None:
            again = " (Ctrl-C again quits at once, unsaved)" if signum == signal.SIGINT else ""
            # os.write: safe in a handler, even while tqdm holds its lock mid-line
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after the step in "
                        f"progress, then saving the checkpoint{again}\n".encode())
        self.signum = self.signum or signum
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous[signum])

    @contextmanager
    def installed(self):
        self._previous = {}
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay with whoever owns them
            pass
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)


@dataclass
class EpochState:
    """Running sums of the epoch in progress; saved in checkpoints so a resume continues them."""

    loss_sum: float = 0.0
    batches: int = 0
    images: int = 0
    seconds: float = 0.0
    wait: float = 0.0

    def summary(self) -> dict:
        """The epoch's row of metrics.csv so far: mean loss, images/s, data-wait share."""
        seconds = max(self.seconds, 1e-9)
        return {"train_loss": self.loss_sum / max(1, self.batches),
                "images_per_s": self.images / seconds, "data_wait_fraction": self.wait / seconds}


@dataclass
class RunState:
    """What a run carries across epochs and into its checkpoints, besides the weights.

    Every rank holds the same values: they change only through what all ranks agreed on at a
    sync (`StepLog.sync`) or measured together (evaluation time). Where the run stands in its
    data, the epoch and the step, is the train loader's `position` (one step a batch), asked
    and never copied: a checkpoint's epoch, step and loader state cannot disagree.
    """

    loader: object = None  # the train loader (pipeline/loader_base.py)
    session_steps: int = 0  # steps taken by this process (not saved: the next one starts at 0)
    elapsed: float = 0.0  # seconds of training and evaluation, for --time-limit
    total_steps: int = 0  # of the LR schedule
    best_miou: float = -1.0
    stop: bool = False  # some rank got SIGTERM/SIGINT
    epoch_sums: EpochState = field(default_factory=EpochState)

    @property
    def epoch(self) -> int:
        """Epochs trained through: the epoch of the next batch."""
        return self.loader.position.epoch

    @property
    def step(self) -> int:
        """Optimizer steps taken: batches handed out, in this run's global batches."""
        return self.loader.position.stream(len(self.loader))

    def time_up(self, cfg: Config) -> bool:
        return cfg.time_limit is not None and self.elapsed >= cfg.time_limit


class EpochEnd(Enum):
    """Why `train_one_epoch` returned."""

    DONE = "done"  # every batch of the epoch trained on
    SIGNAL = "signal"  # a rank got SIGTERM/SIGINT: save and stop
    TIME = "time"  # --time-limit reached inside the epoch


class TrainLog:
    """The progress bar and TensorBoard's per-step scalars, fed at each sync (rank 0 alone
    shows and writes), so that the epoch loop itself only trains. On a terminal the bar is
    redrawn; in a log file it is a line every pipeline.progress.LOG_INTERVAL_S seconds."""

    def __init__(self, cfg: Config, dist: distributed.Dist, state: RunState, done: int,
                 total: int, writer=None) -> None:
        self.writer = writer
        self.main = dist.is_main
        self.bar = progress.bar(total=total, initial=done,
                                disable=not (cfg.progress and dist.is_main),
                                desc=f"epoch {state.epoch + 1}/{cfg.epochs}", unit="step",
                                dynamic_ncols=True, leave=False)

    def startup(self, seconds: float) -> None:
        """Said once a session: the first batch's wait, the loader's workers starting up,
        which is left out of the data wait (it is no sign of a slow loader)."""
        if self.main:
            tqdm.write(f"loader: first batch after {seconds:.1f} s (its workers starting up; "
                       "left out of the data wait)")

    def steps(self, first: int, losses: list[float], lrs: list[float], images: int,
              seconds: float, sums: EpochState) -> None:
        """Steps first+1 ... first+len(losses) are done, in `seconds` for `images`."""
        if self.writer is not None:
            for i, (value, lr) in enumerate(zip(losses, lrs)):
                self.writer.add_scalar("train/loss", value, first + i + 1)
                self.writer.add_scalar("train/lr", lr, first + i + 1)
        if losses:  # set first, drawn by the update (a log file gets a line per interval)
            self.bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lrs[-1]:.2e}",
                                 img_s=f"{images / max(seconds, 1e-9):.3g}",
                                 wait=f"{sums.summary()['data_wait_fraction']:.0%}",
                                 refresh=False)
        self.bar.update(len(losses))

    def close(self) -> None:
        self.bar.close()


class StepLog:
    """The steps since the last host sync: their losses (on the device), lrs and images.

    `sync` reads them back together with this rank's stop flag and clock in one all-reduce,
    so every rank sees the same mean losses, stop flag and elapsed time and takes the same
    decisions, and the host waits for the GPU once per window instead of once per step.
    """

    def __init__(self, device: torch.device, elapsed: float) -> None:
        self.device, self.elapsed = device, elapsed
        self.losses: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.images = 0
        self.wait = 0.0  # seconds blocked on the loader in this window
        self.clock = self.start = time.perf_counter()

    def __len__(self) -> int:
        return len(self.losses)

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` just spent out of this window's step time (not of the clock)."""
        self.start += seconds

    def add(self, loss: torch.Tensor, lr: float, images: int, wait: float) -> None:
        self.losses.append(loss)
        self.lrs.append(lr)
        self.images += images
        self.wait += wait

    def local_elapsed(self) -> float:
        return self.elapsed + time.perf_counter() - self.clock

    def sync(self, stop: bool, world_size: int) -> tuple[list[float], bool, float, float]:
        """-> (mean loss of each step over ranks, any rank stopping, elapsed, window seconds)."""
        now = time.perf_counter()
        flags = torch.tensor([float(stop), self.elapsed + now - self.clock], dtype=torch.float64)
        local = torch.cat([torch.stack(self.losses).double(), flags.to(self.device)]) \
            if self.losses else flags.to(self.device)
        values = (distributed.all_reduce_sum(local) / world_size).tolist()
        after = time.perf_counter()  # the GPU has caught up: its work counts as step time
        seconds = after - self.start
        self.losses, self.lrs, self.images, self.wait = [], [], 0, 0.0
        self.elapsed, self.clock, self.start = values[-1], now, after
        return values[:-2], values[-2] > 0, values[-1], seconds


def step_marker(device: torch.device) -> torch.cuda.Event | None:
    """What says, without waiting, whether the device has run the steps launched so far: on
    CUDA an event the epoch loop records after each step; None elsewhere, where a step has
    run by the time it returns.

    Time blocked in `next(loader)` is data wait only once the device has run dry. While the
    last step is still running the host can block in there too, on launches: the loader's
    normalization kernels wait for room in CUDA's full launch queue. That costs the GPU
    nothing and is step time, not data wait.
    """
    return torch.cuda.Event() if device.type == "cuda" else None


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                    cfg: Config, dist: distributed.Dist, state: RunState, stopper: Stopper,
                    writer=None, save: Callable[[], None] | None = None) -> EpochEnd:
    """One pass over `loader` (or what is left of it); `state` moves on with every sync.

    Decisions (stop on a signal, stop when time is up) are taken only right after a sync, from
    values every rank shares; one process alone syncs as soon as it has a reason to stop.
    Every `cfg.save_every` steps every rank syncs and then `save` (rank 0's) writes a step
    checkpoint: the state right after that step, sums of the epoch so far included, so that
    a run resumed from it replays the same batches. Not at an epoch's last step or when
    stopping: those are saved by the caller.
    """
    model.train()
    lr0 = cfg.resolved_lr()
    epoch = loader.position.epoch  # the loader's position moves past it with the last batch
    log = TrainLog(cfg, dist, state, loader.position.batch, len(loader), writer)
    window = StepLog(dist.device, state.elapsed)
    solo = dist.world_size == 1
    marker = step_marker(dist.device)

    def sync() -> None:
        images, lrs, wait = window.images, window.lrs, window.wait
        losses, stop, elapsed, seconds = window.sync(stopper.signum is not None,
                                                     dist.world_size)
        first = state.step - len(losses)  # steps before losses[0]
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                raise TrainingError(
                    f"non-finite loss ({value}) at epoch {epoch + 1}, step "
                    f"{first + i + 1} (losses are read every --log-every {cfg.log_every} "
                    "steps); stopped without saving, the last checkpoint is the last good "
                    "one. Lower --lr, try --clip-grad, or --amp bf16 instead of fp16")
        state.elapsed, state.stop = elapsed, stop
        sums = state.epoch_sums
        sums.loss_sum += sum(losses)
        sums.batches += len(losses)
        sums.images += images
        sums.seconds += seconds
        sums.wait += wait
        log.steps(first, losses, lrs, images, seconds, sums)

    it = iter(loader)
    try:
        while True:
            # Stop only while batches remain: a finished epoch ends (and is saved) as such,
            # so a checkpoint's loader position and epoch count always agree.
            if loader.position.epoch == epoch and not len(window):
                if state.stop:
                    return EpochEnd.SIGNAL
                if state.time_up(cfg):
                    return EpochEnd.TIME
            step = state.step
            tick = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return EpochEnd.DONE
            waited = time.perf_counter() - tick
            if state.session_steps == 0:  # the loader's workers starting: not data wait
                window.exclude(waited)
                log.startup(waited)
                waited = 0.0
            elif marker is not None and not marker.query():
                waited = 0.0  # the last step still runs: blocked on launches, not on data
            time_fraction = state.elapsed / cfg.time_limit if cfg.time_limit else 0.0
            lr = lr0 * lr_factor(step, state.total_steps, cfg.warmup, time_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss = train_step(model, batch, criterion, optimizer, scaler, amp=cfg.amp,
                              clip_grad=cfg.clip_grad)
            if marker is not None:
                marker.record()
            state.session_steps += 1
            window.add(loss, lr, batch["label"].shape[0] * dist.world_size, waited)
            reason_to_stop = solo and (stopper.signum is not None or (
                cfg.time_limit is not None and window.local_elapsed() >= cfg.time_limit))
            # every rank knows when a step checkpoint is due, and syncs for it
            due = cfg.save_every > 0 and state.step % cfg.save_every == 0
            last = loader.position.epoch != epoch  # the epoch's last batch
            if len(window) >= cfg.log_every or last or reason_to_stop or due:
                sync()
                if due and save is not None and not last and not state.stop \
                        and not state.time_up(cfg):
                    save()
    finally:
        log.close()
