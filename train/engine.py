"""The training machinery: one optimizer step, one epoch, one evaluation.

Read top to bottom: `Config` (every setting and its default), the errors a run raises, the
learning-rate schedule, autocast, the optimizer, one step, the signal handler, one epoch and
evaluation. `train/fit.py` wires these to the loader, model, checkpoints and run directory.
One process or many (torchrun) run the same code.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from train import distributed
from train.losses import predict_classes
from train.metrics import ConfusionMatrix


@dataclass
class Config:
    # data (pipeline/loader.py)
    data: str = ""
    out: str = "runs/unet"
    crop: tuple[int, int] | None = (512, 1024)  # H, W of training crops; None = whole images
    scale: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: float = 0.2
    workers: int | None = None
    backend: str = "auto"
    # model and loss
    width: int = 64
    depth: int = 4
    upsample: str = "bilinear"
    losstype: str = "segment"
    class_weights: bool = False  # ENet weights from the manifest's class pixel counts
    # optimisation
    epochs: int = 100
    batch_size: int = 8  # per process
    optimizer: str = "sgd"  # sgd | adamw
    lr: float | None = None  # None: 0.01 for sgd, 1e-3 for adamw
    weight_decay: float | None = None  # None: 1e-4 for sgd, 1e-2 for adamw
    momentum: float = 0.9
    warmup: int = 0  # iterations of linear warmup before the poly decay
    clip_grad: float | None = None  # max global gradient norm
    time_limit: float | None = None  # seconds: the schedule ends and training stops by then
    # precision and speed
    amp: str = "bf16"  # bf16 | fp16 | off
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    # the evaluation after the last epoch (train/evaluation.py, train/inference.py)
    eval_mode: str = "whole"  # whole | slide
    eval_window: tuple[int, int] | None = None  # H, W of the sliding windows
    eval_stride: tuple[int, int] | None = None  # H, W; None: 2/3 of the window
    eval_scales: tuple[float, ...] = (1.0,)
    eval_flip: bool = False
    # bookkeeping
    eval_every: int = 1
    grid_samples: int = 4
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (0.01 if self.optimizer == "sgd" else 1e-3)

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.optimizer == "sgd" else 1e-2


class TrainingError(RuntimeError):
    """A run that cannot start or cannot go on; the message says why and what to do."""


class Interrupted(TrainingError):
    """Stopped by a signal after saving; `signum` lets the CLI exit as that signal would."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def lr_factor(step: int, total_steps: int, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warmup, then poly(0.9) decay to zero at the last step (or when time runs out)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 1.0 - max(progress, time_fraction)) ** 0.9


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """Autocast to the dtype named by `amp` ("bf16", "fp16"); "off" runs in fp32."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # Weight decay on conv kernels only: decaying BatchNorm scales and biases just hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.resolved_weight_decay()},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.resolved_lr(), momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.resolved_lr())
    raise ValueError(f"optimizer must be sgd or adamw, not {cfg.optimizer!r}")


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
    """SIGTERM/SIGINT ask the run to stop after the current step (a second SIGINT kills it)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum, frame) -> None:
        self.signum = signum
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


def time_up(cfg: Config, run: dict) -> bool:
    return cfg.time_limit is not None and run["elapsed"] >= cfg.time_limit


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                    cfg: Config, dist: distributed.Dist, run: dict, stopper: Stopper,
                    epoch_state: EpochState, writer=None) -> str | None:
    """One pass over `loader` (or what is left of it). Returns why it stopped early, if it did.

    `run` carries step, total_steps and elapsed seconds across epochs; every rank sees the
    same reduced loss, stop flag and clock, so all take the same decisions.
    """
    model.train()
    lr0 = cfg.resolved_lr()
    done = loader.state_dict().get("batch", 0)  # batches of this epoch already trained on
    bar = tqdm(total=len(loader), initial=done, disable=not (cfg.progress and dist.is_main),
               desc=f"epoch {run['epoch'] + 1}/{cfg.epochs}", dynamic_ncols=True, leave=False)
    it = iter(loader)
    tick = time.perf_counter()
    try:
        while True:
            # Stop only while batches remain: a finished epoch ends (and is saved) as such,
            # so a checkpoint's loader position and epoch count always agree.
            if done < len(loader):
                if run["stop"]:
                    return "signal"
                if time_up(cfg, run):
                    return "time"
            try:
                batch = next(it)
            except StopIteration:
                return None
            waited = time.perf_counter() - tick
            time_fraction = run["elapsed"] / cfg.time_limit if cfg.time_limit else 0.0
            lr = lr0 * lr_factor(run["step"], run["total_steps"], cfg.warmup, time_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(model, batch, criterion, optimizer, scaler, amp=cfg.amp,
                              clip_grad=cfg.clip_grad)
            now = time.perf_counter()
            shared = torch.tensor([loss.item(), float(stopper.signum is not None),
                                   run["elapsed"] + now - tick],
                                  dtype=torch.float64, device=dist.device)
            shared = distributed.all_reduce_sum(shared) / dist.world_size
            loss_value, stop, elapsed = shared.tolist()
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"non-finite loss ({loss_value}) at epoch {run['epoch'] + 1}, step "
                    f"{run['step'] + 1}; stopped without saving. Lower --lr, try --clip-grad, "
                    "or --amp bf16 instead of fp16"
                )
            images = batch["label"].shape[0] * dist.world_size
            done += 1
            run.update(step=run["step"] + 1, elapsed=elapsed, stop=stop > 0)
            epoch_state.loss_sum += loss_value
            epoch_state.batches += 1
            epoch_state.images += images
            epoch_state.seconds += now - tick
            epoch_state.wait += waited
            if writer is not None:
                writer.add_scalar("train/loss", loss_value, run["step"])
                writer.add_scalar("train/lr", lr, run["step"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                            img_s=f"{images / max(now - tick, 1e-9):.1f}",
                            wait=f"{epoch_state.wait / max(epoch_state.seconds, 1e-9):.0%}")
            tick = now
    finally:
        bar.close()


@torch.inference_mode()
def evaluate(model: nn.Module, loader, criterion: nn.Module | None, *, num_classes: int,
             losstype: str, palette, device: torch.device, amp: str = "off",
             keep: int = 0, forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
             ) -> tuple[ConfusionMatrix, float | None, dict | None]:
    """Confusion matrix over the whole split (summed over ranks), mean loss per image, and the
    first `keep` images, labels and predictions of this rank (for the pictures).

    `forward(images) -> outputs` replaces the plain `model(images)` under autocast, e.g. with
    sliding windows or test-time augmentation (train/inference.py)."""
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=loader.ignore_index, device=device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss * images, images
    kept = None
    for batch in loader:
        image, label = batch["image"], batch["label"]
        if forward is None:
            with autocast(device, amp):
                outputs = model(image)
        else:
            outputs = forward(image)
        outputs = outputs.float()
        pred = predict_classes(outputs, losstype, palette)
        cm.update(pred, label)
        if criterion is not None:
            totals += torch.stack([criterion(outputs, label).double() * len(label),
                                   torch.tensor(float(len(label)), dtype=torch.float64,
                                                device=device)])
        if keep > 0:
            new = {"image": image[:keep].cpu(), "label": label[:keep].cpu(),
                   "pred": pred[:keep].cpu()}
            kept = new if kept is None else {k: torch.cat([kept[k], v]) for k, v in new.items()}
            keep -= len(new["label"])
    cm.all_reduce()
    distributed.all_reduce_sum(totals)
    loss = float(totals[0] / totals[1]) if criterion is not None and totals[1] > 0 else None
    return cm, loss, kept
