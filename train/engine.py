"""Training and evaluation: the one path from shards to a trained U-Net.

Read top to bottom: `Config` (every setting and its default), the learning-rate schedule, one
optimizer step, one epoch, evaluation, and `fit`, which wires the loader, model, optimizer,
checkpoints and the run directory together. One process or many (torchrun) run the same code.
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.loader import build_loader
from pipeline.shards import load_manifest
from train import distributed
from train.checkpoint import (
    check_arch,
    check_classes,
    load_checkpoint,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.losses import build_loss, class_weights_from_pixels, output_channels, predict_classes
from train.metrics import ConfusionMatrix
from train.model import UNet
from train.rundir import RunDir


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


def time_up(cfg: Config, run: dict) -> bool:
    return cfg.time_limit is not None and run["elapsed"] >= cfg.time_limit


@torch.inference_mode()
def evaluate(model: nn.Module, loader, criterion: nn.Module | None, *, num_classes: int,
             losstype: str, palette, device: torch.device, amp: str = "off",
             keep: int = 0) -> tuple[ConfusionMatrix, float | None, dict | None]:
    """Confusion matrix over the whole split (summed over ranks), mean loss per image, and the
    first `keep` images, labels and predictions of this rank (for the pictures)."""
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=loader.ignore_index, device=device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss * images, images
    kept = None
    for batch in loader:
        image, label = batch["image"], batch["label"]
        with autocast(device, amp):
            outputs = model(image)
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(cfg: Config) -> dict:
    """Train to `cfg`, writing the run directory; returns the last epoch's metrics row."""
    dist = distributed.setup(cfg.device)
    try:
        return _fit(cfg, dist)
    finally:
        distributed.cleanup()


class Interrupted(TrainingError):
    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _fit(cfg: Config, dist: distributed.Dist) -> dict:
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, not {cfg.amp!r}")
    out = Path(cfg.out)
    last_path, best_path = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"
    if cfg.resume and not last_path.is_file():
        raise TrainingError(f"{last_path}: no checkpoint to resume from")
    if not cfg.resume and last_path.is_file():
        raise TrainingError(f"{out} already holds a run ({last_path}); pass --resume to "
                            "continue it, or choose another --out")
    seed_everything(cfg.seed)

    # data: the manifest's mean/std normalise both splits
    common = dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.seed,
                  device=dist.device.type, workers=cfg.workers, channels_last=cfg.channels_last,
                  backend=cfg.backend)
    w, h = load_manifest(Path(cfg.data))["config"]["size"]
    train_loader = build_loader(cfg.data, "train", cfg.batch_size, train=True,
                                crop=cfg.crop or (h, w),
                                scale=cfg.scale, flip=cfg.flip, jitter=cfg.jitter, **common)
    if len(train_loader) == 0:
        raise TrainingError(f"{cfg.data}: the train split has {train_loader.num_samples} "
                            f"samples, fewer than one batch of {cfg.batch_size} per process "
                            f"x {dist.world_size} processes; lower --batch-size")
    manifest = train_loader.manifest
    mean, std = [float(v) for v in train_loader.mean], [float(v) for v in train_loader.std]
    val_loader = None
    if "val" in manifest["splits"]:
        val_loader = build_loader(cfg.data, "val", cfg.batch_size, train=False, mean=mean,
                                  std=std, **common)
    classes, categories = list(train_loader.classes), list(manifest["categories"])
    palette = np.asarray(train_loader.palette, dtype=np.uint8)

    # model, loss, optimizer
    model = UNet(output_channels(cfg.losstype, len(classes)), width=cfg.width, depth=cfg.depth,
                 upsample=cfg.upsample)
    arch = dict(model.config)
    if dist.distributed:
        model = distributed.convert_sync_batchnorm(model, dist.device)
    model.to(dist.device, memory_format=torch.channels_last if cfg.channels_last
             else torch.contiguous_format)
    weights = class_weights_from_pixels(manifest["class_pixels"]) if cfg.class_weights else None
    criterion = build_loss(cfg.losstype, palette=palette, ignore_index=train_loader.ignore_index,
                           class_weights=weights).to(dist.device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16")
    run = {"epoch": 0, "step": 0, "elapsed": 0.0, "stop": False,
           "total_steps": cfg.epochs * len(train_loader)}
    epoch_state, best = EpochState(), -1.0
    if cfg.resume:
        state = load_checkpoint(last_path)
        check_arch(state, arch, last_path)
        check_classes(state, classes, last_path, cfg.data)
        load_model_weights(model, state, last_path)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        train_loader.load_state_dict(state["loader"])
        run.update(epoch=state["epoch"], step=state["step"], elapsed=state["elapsed"])
        epoch_state, best = EpochState(**state["epoch_state"]), state["best_miou"]
        if dist.is_main:
            tqdm.write(f"resuming {last_path}: epoch {run['epoch']}, step {run['step']}")

    eval_model = torch.compile(model) if cfg.compile else model
    train_model = eval_model
    if dist.distributed:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(eval_model, device_ids=ids)

    rundir = RunDir(out, enabled=dist.is_main, resume_epoch=run["epoch"] if cfg.resume else None,
                    resume_step=run["step"] if cfg.resume else None)
    rundir.write_config({
        "config": asdict(cfg), "world_size": dist.world_size, "device": str(dist.device),
        "model": arch, "classes": classes, "mean": mean, "std": std,
        "data": {"manifest_config": manifest["config"],
                 "samples": {s: v["samples"] for s, v in manifest["splits"].items()}},
        "steps_per_epoch": len(train_loader), "resumed_from_step": run["step"] or None,
    })

    def checkpoint(row: dict | None) -> dict:
        return {
            "model": model.state_dict(), "arch": arch, "classes": classes,
            "categories": categories, "palette": palette.tolist(), "mean": mean, "std": std,
            "losstype": cfg.losstype, "ignore_index": int(train_loader.ignore_index),
            "size": list(manifest["config"]["size"]),
            "mapping": manifest["config"].get("mapping_def"),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "scheduler": {"name": "poly", "power": 0.9, "warmup": cfg.warmup,
                          "total_steps": run["total_steps"], "base_lr": cfg.resolved_lr(),
                          "time_limit": cfg.time_limit},
            "epoch": run["epoch"], "step": run["step"], "elapsed": run["elapsed"],
            "loader": dict(train_loader.state_dict()), "epoch_state": asdict(epoch_state),
            "rng": rng_state(), "best_miou": best, "metrics": row, "config": asdict(cfg),
        }

    row: dict = {}
    try:
        with Stopper().installed() as stopper:
            for epoch in range(run["epoch"], cfg.epochs):
                run["epoch"] = epoch
                why = train_one_epoch(train_model, train_loader, criterion, optimizer, scaler,
                                      cfg=cfg, dist=dist, run=run, stopper=stopper,
                                      epoch_state=epoch_state, writer=rundir.writer)
                if why == "signal":
                    if dist.is_main:
                        save_checkpoint(last_path, checkpoint(None))
                    name = signal.Signals(stopper.signum).name if stopper.signum else "signal"
                    raise Interrupted(f"stopped by {name} at epoch {epoch + 1}, step "
                                      f"{run['step']}; saved {last_path}; continue with "
                                      "--resume", stopper.signum or signal.SIGTERM)
                final = why == "time" or epoch + 1 == cfg.epochs or time_up(cfg, run)
                row = {"epoch": epoch + 1, "step": run["step"],
                       "lr": optimizer.param_groups[0]["lr"],
                       "train_loss": epoch_state.loss_sum / max(1, epoch_state.batches),
                       "images_per_s": epoch_state.images / max(epoch_state.seconds, 1e-9),
                       "data_wait_fraction": epoch_state.wait / max(epoch_state.seconds, 1e-9)}
                scores = None
                if val_loader is not None and (final or (epoch + 1) % cfg.eval_every == 0):
                    tick = time.perf_counter()
                    cm, val_loss, kept = evaluate(
                        eval_model, val_loader, criterion, num_classes=len(classes),
                        losstype=cfg.losstype, palette=palette, device=dist.device,
                        amp=cfg.amp, keep=cfg.grid_samples if dist.is_main else 0)
                    scores = cm.compute(classes, categories)
                    # evaluation counts against --time-limit too, the same on every rank
                    spent = torch.tensor([time.perf_counter() - tick], dtype=torch.float64,
                                         device=dist.device)
                    run["elapsed"] += float(distributed.all_reduce_sum(spent)) / dist.world_size
                    row.update(val_loss=val_loss, val_miou=scores["miou"],
                               pixel_acc=scores["pixel_acc"])
                    rundir.save_grid(epoch + 1, kept, mean=mean, std=std, palette=palette)
                miou = row.get("val_miou")
                is_best = miou is not None and miou > best
                best = max(best, miou) if miou is not None else best
                if why != "time":  # a cut-short epoch does not count as done
                    run["epoch"], epoch_state = epoch + 1, EpochState()
                if dist.is_main:
                    rundir.log_epoch(row, scores)
                    state = checkpoint(row)
                    save_checkpoint(last_path, state)
                    if is_best:
                        save_checkpoint(best_path, state)
                    tqdm.write(_summary(row, cfg.epochs))
                if final or time_up(cfg, run):
                    break
    finally:
        rundir.close()
    return row


def _summary(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']}/{epochs} step {row['step']}: loss {row['train_loss']:.4f}"
    if row.get("val_miou") is not None:
        text += f", val loss {row['val_loss']:.4f}, mIoU {row['val_miou']:.4f}, " \
                f"pixel acc {row['pixel_acc']:.4f}"
    return text + f" | {row['images_per_s']:.1f} img/s, data wait " \
                  f"{row['data_wait_fraction']:.1%}"
