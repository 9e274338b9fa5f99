"""One session of a run: the epoch loop `fit` hands over to, and what ends it.

`Session.train`: train an epoch (train/engine.py), validate, log, checkpoint (best.pt, then
last.pt), stop on a signal (every rank agreeing) or when time is up; last, the final
evaluation into OUT/eval-val. `Parts` is what a checkpoint is made of. The messages a run
prints as it stops or ends are here too, numbering epochs as the bar does (from 1).
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from train import distributed
from train.checkpoint import CheckpointWriter, rng_state
from train.engine import (
    Config,
    EpochEnd,
    EpochState,
    Interrupted,
    RunState,
    Stopper,
    train_one_epoch,
)
from train.evaluation.evaluate import final_evaluation
from train.evaluation.inference import Inference
from train.evaluation.results import said
from train.evaluation.shards import evaluate
from train.rundir import RunDir, best_of, duration


@dataclass
class Parts:
    """What a checkpoint is made of: the model, optimizer, scaler and train loader of the
    run, and `about` (the model and data's description, fixed for the run)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: object
    about: dict

    def checkpoint(self, state: RunState, cfg: Config, dist: distributed.Dist,
                   row: dict | None) -> dict:
        """The checkpoint of the run as it stands (train/checkpoint.py lists the keys)."""
        return {
            "model": self.model.state_dict(), **self.about,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "scheduler": {"name": "poly", "power": 0.9, "warmup": cfg.warmup,
                          "total_steps": state.total_steps, "base_lr": cfg.resolved_lr(),
                          "time_limit": cfg.time_limit},
            "epoch": state.epoch, "step": state.step, "elapsed": state.elapsed,
            "loader": dict(self.loader.state_dict()), "epoch_state": asdict(state.epoch_sums),
            "rng": rng_state(dist.device), "best_miou": state.best_miou, "metrics": row,
            "config": asdict(cfg), "world_size": dist.world_size,
        }


@dataclass
class Session:
    """The epoch loop of one session of a run, and what ends it: train, validate, log,
    checkpoint; stop on a signal or when time is up; last, the final evaluation."""

    cfg: Config
    dist: distributed.Dist
    parts: Parts
    criterion: nn.Module
    state: RunState
    rundir: RunDir
    train_model: nn.Module
    eval_model: nn.Module
    val_loader: object | None
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)

    @property
    def last_path(self) -> Path:
        return Path(self.cfg.out) / "checkpoints" / "last.pt"

    def train(self, final_inference: Inference) -> dict:
        """The epochs left, then the final evaluation; returns the last epoch's row."""
        cfg, dist, state = self.cfg, self.dist, self.state
        self.rundir.set_status("running", None, state, cfg.epochs)
        outcome, row, scores, end = ("stopped", "error"), {}, None, None  # until known
        try:
            with Stopper(announce=dist.is_main).installed() as stopper:
                for epoch in range(state.epoch, cfg.epochs):
                    end = train_one_epoch(
                        self.train_model, self.parts.loader, self.criterion,
                        self.parts.optimizer, self.parts.scaler, cfg=cfg, dist=dist,
                        state=state, stopper=stopper, writer=self.rundir.writer,
                        save=self.save_step if dist.is_main else None)
                    if end is EpochEnd.SIGNAL:
                        if dist.is_main:
                            self.save(None, self.last_path, wait=True)
                        outcome = ("stopped", _signal_name(stopper.signum))
                        raise self.interrupted(stopper.signum or signal.SIGTERM)
                    final = end is EpochEnd.TIME or epoch + 1 == cfg.epochs or state.time_up(cfg)
                    due = final or (epoch + 1) % cfg.eval_every == 0
                    row, scores = self.validate(epoch, due)
                    if end is not EpochEnd.TIME:  # a cut-short epoch's sums go on
                        state.epoch_sums = EpochState()
                    self.end_epoch(row, scores)
                    # a signal during the epoch's last step or its validation: stop here, on
                    # every rank, rather than a step (or the final evaluation) later
                    signum = _agreed_signal(stopper, state, dist)
                    if signum:
                        outcome = ("stopped", _signal_name(signum))
                        raise self.interrupted(signum)
                    if final or state.time_up(cfg):
                        break
            why = "time limit" if state.time_up(cfg) or end is EpochEnd.TIME else "epochs"
            final_metrics = None
            if self.val_loader is not None and row:
                with _stop_at_once(self.last_path, cfg.data):
                    final_metrics = final_evaluation(
                        self.eval_model, self.val_loader, self.criterion, cfg=cfg, dist=dist,
                        inference=final_inference, scores=scores,
                        classes=self.parts.about["classes"],
                        categories=self.parts.about["categories"], checkpoint=self.last_path)
            outcome = ("done", why)
            if dist.is_main:
                if final_metrics is not None:
                    tqdm.write(said(final_metrics, Path(cfg.out) / "eval-val"))
                tqdm.write(_done_text(Path(cfg.out), why, state, cfg, self.rundir.best))
        except BaseException as e:
            if outcome[1] == "error":
                outcome = ("stopped", _failure(e))
            raise
        finally:
            try:
                self.writer.close()  # the last checkpoint is on disk before fit ends
            finally:
                self.rundir.set_status(*outcome, state, cfg.epochs)
                self.rundir.close()
        return row

    def validate(self, epoch: int, due: bool) -> tuple[dict, dict | None]:
        """The epoch's metrics.csv row, with the val split's scores when one is `due`."""
        cfg, dist, state = self.cfg, self.dist, self.state
        row = {"epoch": epoch + 1, "step": state.step,
               "lr": self.parts.optimizer.param_groups[0]["lr"], **state.epoch_sums.summary()}
        if self.val_loader is None or not due:
            return row, None
        about = self.parts.about
        tick = time.perf_counter()
        cm, val_loss, kept = evaluate(self.eval_model, self.val_loader, self.criterion,
                                      device=dist.device, amp=cfg.amp,
                                      keep=cfg.grid_samples if dist.is_main else 0)
        self.val_loader.close()  # its workers would idle until the next evaluation
        scores = cm.compute(about["classes"], about["categories"])
        # evaluation counts against --time-limit too, the same on every rank
        spent = torch.tensor([time.perf_counter() - tick], dtype=torch.float64,
                             device=dist.device)
        state.elapsed += float(distributed.all_reduce_sum(spent)) / dist.world_size
        row.update(val_loss=val_loss, val_miou=scores["miou"], pixel_acc=scores["pixel_acc"])
        self.rundir.save_grid(epoch + 1, kept, mean=about["mean"], std=about["std"],
                              palette=np.asarray(about["palette"], dtype=np.uint8))
        return row, scores

    def end_epoch(self, row: dict, scores: dict | None) -> None:
        """best.pt and last.pt, metrics.csv, the summary line and status.json."""
        miou = row.get("val_miou")
        is_best = miou is not None and miou > self.state.best_miou
        if miou is not None:
            self.state.best_miou = max(self.state.best_miou, miou)
        if self.dist.is_main:
            self.rundir.log_epoch(row, scores)
            # best.pt first: killed between the two, the epoch is redone from the previous
            # last.pt and best.pt written again, rather than never
            best = self.last_path.with_name("best.pt")
            self.save(row, *((best, self.last_path) if is_best else (self.last_path,)))
            tqdm.write(_summary(row, self.cfg.epochs))
            self.rundir.set_status("running", None, self.state, self.cfg.epochs)

    def save(self, row: dict | None, *paths: Path, wait: bool = False) -> float:
        return self.writer.save(self.parts.checkpoint(self.state, self.cfg, self.dist, row),
                                *paths, wait=wait)

    def save_step(self) -> None:  # rank 0, every --save-every steps (train/engine.py)
        held = self.save(None, self.last_path)
        self.rundir.writer.add_scalar("checkpoint/held_seconds", held, self.state.step)
        self.rundir.writer.add_scalar("checkpoint/write_seconds", self.writer.write_seconds,
                                      self.state.step)

    def interrupted(self, signum: int | None) -> Interrupted:
        return Interrupted(_stopped_text(signum, self.state, self.cfg, self.parts.loader,
                                         self.last_path), signum)


def _failure(e: BaseException) -> str:
    """status.json's reason for a run that raised `e`."""
    if isinstance(e, Interrupted):
        return _signal_name(e.signum)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"error: {first}"


@contextmanager
def _stop_at_once(last_path: Path, data: str):
    """During the final evaluation, with training over and saved, SIGTERM or SIGINT stops at
    once, saying what was skipped and how to run it."""
    def stop(signum, frame):
        raise Interrupted(f"stopped by {_signal_name(signum)} during the final evaluation; "
                          f"training is over and saved in {last_path}: score it with "
                          f"`citytrain evaluate --checkpoint {last_path} --data {data}`", signum)

    try:
        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: signals stay with whoever owns them
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def where(state: RunState, cfg: Config, loader) -> str:
    """The epoch in progress, as the bar, metrics.csv and every message number it (from 1)."""
    batch = loader.position.batch
    inside = f", batch {batch}/{len(loader)}" if 0 < batch < len(loader) else ""
    return f"epoch {state.epoch + 1}/{cfg.epochs}{inside} ({state.epoch} done)"


def _signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a signal"


def _agreed_signal(stopper: Stopper, state: RunState, dist: distributed.Dist) -> int:
    """The signal some rank got (0: none), the same on every rank: one all-reduce."""
    mine = stopper.signum or (signal.SIGTERM if state.stop else 0)
    if not dist.distributed:
        return int(mine)
    flag = torch.tensor([float(mine)], dtype=torch.float64, device=dist.device)
    return int(distributed.all_reduce_max(flag).item())


def _stopped_text(signum: int | None, state: RunState, cfg: Config, loader,
                  last_path: Path) -> str:
    at = (f"in {where(state, cfg, loader)}" if loader.position.batch % len(loader)
          else f"after epoch {state.epoch}/{cfg.epochs}")
    return (f"stopped by {_signal_name(signum)} {at}, step {state.step}, "
            f"{duration(state.elapsed)} in; saved {last_path}; continue with --resume")


def _best_text(out: Path, best: tuple[float, int] | None) -> str:
    if best is None:
        return "no validation (no val split)"
    return (f"best val mIoU {best[0]:.4f} at epoch {best[1]} "
            f"({out / 'checkpoints' / 'best.pt'})")


def finished_text(out: Path, epoch: int, cfg: Config) -> str:
    by_time = epoch < cfg.epochs  # finished, and not by its epochs: by its time limit
    spent = f"its --time-limit {cfg.time_limit:g} s is spent" if by_time else \
        f"{epoch}/{cfg.epochs} epochs done"
    more = "a larger --time-limit" if by_time else f"--epochs above {epoch}"
    return (f"{out}: this run is finished ({spent}); {_best_text(out, best_of(out))}; "
            f"nothing to train: resume with {more} to train on")


def _done_text(out: Path, why: str, state: RunState, cfg: Config,
               best: tuple[float, int] | None) -> str:
    reason = f"--time-limit {cfg.time_limit:g} s reached" if why == "time limit" else \
        f"{cfg.epochs} epochs"
    return (f"done ({reason}): {state.epoch}/{cfg.epochs} epochs, step {state.step}, "
            f"{duration(state.elapsed)}; {_best_text(out, best)}")


def _summary(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']}/{epochs} step {row['step']}: loss {row['train_loss']:.4f}"
    if row.get("val_miou") is not None:
        text += f", val loss {row['val_loss']:.4f}, mIoU {row['val_miou']:.4f}, " \
                f"pixel acc {row['pixel_acc']:.4f}"
    return text + f" | {row['images_per_s']:.1f} img/s, data wait " \
                  f"{row['data_wait_fraction']:.1%}"
