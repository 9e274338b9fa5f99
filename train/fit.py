"""`fit`: wires the loader, model, loss, optimizer, checkpoints and run directory together.

Read top to bottom: the settings (a resumed run's from its checkpoint, `--init`'s
architecture from its checkpoint), the model (train/models), both loaders (normalised as the
model's weights expect), loss and optimizer, resume if asked, then the epoch loop: train
(with a step checkpoint every --save-every steps), evaluate, log, checkpoint, stop on a
signal or when time runs out; last, the final evaluation into OUT/eval-val
(train/evaluation.py). The per-step and per-epoch machinery lives in `train/engine.py`.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import sizes
from pipeline.files import sweep_temporaries
from pipeline.loader import build_loader
from pipeline.shards import MANIFEST_NAME, load_manifest
from train import distributed, evaluation, preflight
from train.checkpoint import (
    CheckpointWriter,
    check_arch,
    check_classes,
    check_data,
    init_from_checkpoint,
    load_checkpoint,
    load_model_weights,
    normalization_of,
    rng_state,
    set_rng_state,
)
from train.config import RESUME_MODES, effective, resumed, with_arch
from train.engine import (
    AMP_DTYPES,
    Config,
    EpochEnd,
    EpochState,
    Interrupted,
    RunState,
    Stopper,
    TrainingError,
    build_optimizer,
    cuda_speed_settings,
    evaluate,
    load_optimizer_state,
    train_one_epoch,
)
from train.inference import Inference, InferenceError
from train.losses import build_loss, class_weights_from_pixels, output_channels
from train.models import ModelError, model_from_config
from train.rundir import RunDir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(cfg: Config, given: Iterable[str] | None = None) -> dict:
    """Train to `cfg`, writing the run directory; returns the last epoch's metrics row.

    `given` names the settings the user chose (the CLI: those typed or read from --config;
    None: every field of `cfg`). A resumed run takes all others from its checkpoint, and
    `--init` the architecture from its checkpoint.
    """
    given = {f.name for f in fields(Config)} if given is None else set(given)
    last_path = Path(cfg.out) / "checkpoints" / "last.pt"
    cfg, saved, taken = settings(cfg, given, last_path)  # a resumed run's device too
    dist = distributed.setup(cfg.device)
    try:
        if taken and dist.is_main and not cfg.preflight_only:
            tqdm.write(f"--init {cfg.init}: its architecture, "
                       + ", ".join(f"{k} {v}" for k, v in taken.items() if v is not None))
        return _fit(cfg, dist, saved)
    finally:
        distributed.cleanup()


def settings(cfg: Config, given: set[str], last_path: Path) -> tuple[Config, dict | None, dict]:
    """The effective settings of this session, the checkpoint it resumes (None: a new run)
    and what `--init` took from its checkpoint. Every rank decides the same: the files are
    read before any rank can write one (that needs all of them, in DDP)."""
    out = last_path.parents[1]
    if cfg.resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES}, not {cfg.resume!r}")
    if cfg.init and cfg.resume is True:
        raise TrainingError(f"--init and --resume together: --init starts a new run from a "
                            f"checkpoint's weights, --resume continues the run in {out} from "
                            f"its own {last_path.name}; pass one of them (--resume auto "
                            "takes both: the run's own checkpoint once it has one)")
    if cfg.resume is True and not last_path.is_file():
        raise TrainingError(f"{last_path}: no checkpoint to resume from (--resume auto starts "
                            "the run when there is none)")
    if not cfg.resume and last_path.is_file():
        raise TrainingError(f"{out} already holds a run ({last_path}); pass --resume to "
                            "continue it, or choose another --out")
    if cfg.resume and last_path.is_file():
        saved = load_checkpoint(last_path)
        cfg = effective(resumed(saved.get("config") or asdict(cfg), cfg, given, last_path))
        if "data" not in given and not Path(cfg.data).is_dir():
            raise TrainingError(f"{cfg.data}: the run's shards are not there; pass --data "
                                "where they are now (the same shards: they are checked)")
        return cfg, saved, {}
    taken = {}
    if cfg.init:
        cfg, taken = with_arch(load_checkpoint(Path(cfg.init)).get("config"), cfg, given)
    if not cfg.data:
        raise TrainingError(f"--data: no shard folder given, and {out} holds no run to "
                            "resume; pass --data (from `cityprep preprocess --out`)")
    return effective(cfg), None, taken


def _fit(cfg: Config, dist: distributed.Dist, saved: dict | None = None) -> dict:
    """Train the run `settings` prepared; `saved` is the checkpoint it resumes, or None."""
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, not {cfg.amp!r}")
    out = Path(cfg.out)
    last_path, best_path = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"
    if cfg.compile and dist.distributed and cfg.sync_bn:
        raise TrainingError(
            "--compile with several processes needs --no-sync-bn: SyncBatchNorm all-reduces "
            "inside every BatchNorm layer, which breaks the compiled graph at each one (and "
            "has crashed torch.compile upstream); train with --no-sync-bn (BatchNorm per "
            "process, fine at 8 or more images per GPU) or without --compile")
    try:  # a bad setting fails now, not at the end
        final_inference = evaluation.final_inference(cfg)
    except ValueError as e:  # the combination may come from the run's config
        raise TrainingError(str(e).replace("--", "--eval-")) from None
    seed_everything(cfg.seed)
    speed = cuda_speed_settings(dist.device, tf32=cfg.tf32)

    # model: its weights from a checkpoint (resume, --init) or its own (pretrained or fresh)
    manifest = load_manifest(Path(cfg.data))
    final_inference = _against_shards(cfg, manifest, final_inference)
    try:
        model = model_from_config(cfg, output_channels(cfg.losstype, len(manifest["classes"])),
                                  pretrained=saved is None and not cfg.init)
    except ModelError as e:
        raise TrainingError(str(e)) from None
    arch = dict(model.config)
    if saved is not None and _finished(RunState(epoch=saved["epoch"], elapsed=saved["elapsed"]),
                                       cfg):  # nothing to train: say so, and its best
        check_arch(saved, arch, last_path)  # (another model given is refused all the same)
        if dist.is_main:
            tqdm.write(_finished_text(out, saved["epoch"], cfg))
        return dict(saved.get("metrics") or {})
    init = None
    if cfg.init and saved is not None:  # the run's own weights follow; --init is its past
        init = RunDir.recorded(out, "init")
    elif cfg.init:  # before SyncBatchNorm and DDP: every rank loads the same weights
        init = init_from_checkpoint(model, Path(cfg.init), classes=list(manifest["classes"]),
                                    losstype=cfg.losstype, data=cfg.data, head=cfg.init_head)
    # the images as the weights saw them: the checkpoint's, the pretrained weights' mean/std,
    # or the train split's own (manifest) for a model from scratch
    if saved is not None or init is not None:
        norm = normalization_of(saved if saved is not None else init)
    elif model.normalization is not None:
        norm = {**model.normalization, "normalization": model.normalization["weights"]}
    else:
        norm = {"mean": manifest["mean"], "std": manifest["std"], "normalization": "dataset"}
    mean, std = [float(v) for v in norm["mean"]], [float(v) for v in norm["std"]]

    # data
    common = dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, mean=mean,
                  std=std, device=dist.device, workers=cfg.workers,
                  channels_last=cfg.channels_last, backend=cfg.backend)
    train_loader = build_loader(cfg.data, cfg.train_split, cfg.batch_size, train=True,
                                crop=cfg.crop or sizes.from_file(manifest["config"]["size"]),
                                scale=cfg.scale, flip=cfg.flip, jitter=cfg.jitter, **common)
    if len(train_loader) == 0:
        raise TrainingError(f"{cfg.data}: the {cfg.train_split} split has "
                            f"{train_loader.num_samples} "
                            f"samples, fewer than one batch of {cfg.batch_size} per process "
                            f"x {dist.world_size} processes; lower --batch-size")
    val_loader = None
    if "val" in manifest["splits"]:
        val_loader = build_loader(cfg.data, "val", cfg.batch_size, train=False, **common)
    classes, categories = list(train_loader.classes), list(manifest["categories"])
    palette = np.asarray(train_loader.palette, dtype=np.uint8)
    memory = None
    if cfg.preflight or cfg.preflight_only:  # stop now, with a message, not in the OOM killer
        with torch.random.fork_rng(devices=[dist.device] if dist.device.type == "cuda" else []):
            memory = preflight.check_fits(cfg, dist, len(classes), train_loader.aug.crop,
                                          train_loader.workers, train_loader.backend)
        if dist.is_main and memory.get("step_s", 0.0) >= preflight.SLOW_STEP_S:
            tqdm.write(preflight.time_estimate(memory["step_s"], len(train_loader), cfg))
        if cfg.preflight_only:
            tqdm.write(f"preflight: one step needs about {memory['step_gb']:.1f} GB per process, "
                       f"{memory['total_gb']:.1f} GB in all, of {memory['budget_gb']:.1f} GB: "
                       "it fits")
            return memory

    # loss, optimizer
    if dist.distributed and cfg.sync_bn:
        model = distributed.convert_sync_batchnorm(model, dist.device)
    model.to(dist.device, memory_format=torch.channels_last if cfg.channels_last
             else torch.contiguous_format)
    weights = class_weights_from_pixels(manifest["class_pixels"]) if cfg.class_weights else None
    criterion = build_loss(cfg.losstype, palette=palette, ignore_index=train_loader.ignore_index,
                           class_weights=weights).to(dist.device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16")
    # what a checkpoint says of the model and data: the same all run long
    about = {"arch": arch, "classes": classes, "categories": categories,
             "palette": palette.tolist(), "mean": mean, "std": std,
             "normalization": norm["normalization"], "shards_mean": list(manifest["mean"]),
             "shards_std": list(manifest["std"]), "losstype": cfg.losstype,
             "ignore_index": int(train_loader.ignore_index),
             "size": sizes.to_file(sizes.from_file(manifest["config"]["size"])),
             "mapping": manifest["config"].get("mapping_def")}
    state = RunState(total_steps=cfg.epochs * len(train_loader))
    if saved is not None:
        check_arch(saved, arch, last_path)
        check_classes(saved, classes, last_path, cfg.data)
        check_data(saved, about, last_path, cfg.data)
        load_model_weights(model, saved, last_path)
        load_optimizer_state(optimizer, saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"], dist.device)
        state.epoch, state.step, state.elapsed = saved["epoch"], saved["step"], saved["elapsed"]
        state.best_miou, state.epoch_sums = saved["best_miou"], EpochState(**saved["epoch_state"])
        _resume_loader(train_loader, saved["loader"], state, last_path)
        if dist.is_main:
            tqdm.write(f"resuming {last_path} at step {state.step}: "
                       + _where(state, cfg, train_loader) + _restarts(dist))

    train_model = model
    if dist.distributed:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    eval_model = model
    if cfg.compile:  # DDP first, then compile: the order torch.compile's DDP support expects
        train_model, eval_model = torch.compile(train_model), torch.compile(model)

    if dist.is_main and (out / "checkpoints").is_dir():
        sweep_temporaries(out / "checkpoints")  # what a killed save left behind
    # a new run in a folder where one never got to its first checkpoint starts clean
    rundir = RunDir(out, enabled=dist.is_main,
                    resume_epoch=state.epoch if saved is not None else None,
                    resume_step=state.step, palette=palette)
    rundir.write_config({
        "config": asdict(cfg), "world_size": dist.world_size, "device": str(dist.device),
        "cuda_settings": speed, "preflight": memory,
        "model": arch, "classes": classes, "mean": mean, "std": std,
        "normalization": norm["normalization"],
        "data": {"manifest_config": manifest["config"],
                 "samples": {s: v["samples"] for s, v in manifest["splits"].items()}},
        "steps_per_epoch": len(train_loader), "resumed_from_step": state.step or None,
        "init": init,
    })
    parts = Parts(model, optimizer, scaler, train_loader, about)
    rundir.set_status("running", None, state, cfg.epochs)
    writer = CheckpointWriter()

    def save_step() -> None:  # rank 0, every --save-every steps (train/engine.py)
        held = writer.save(parts.checkpoint(state, cfg, dist, None), last_path)
        rundir.writer.add_scalar("checkpoint/held_seconds", held, state.step)
        rundir.writer.add_scalar("checkpoint/write_seconds", writer.write_seconds, state.step)

    row: dict = {}
    loaders = [x for x in (train_loader, val_loader) if x is not None]
    scores = None
    outcome = ("stopped", "error")  # until the run says otherwise
    end = None
    try:
        with Stopper(announce=dist.is_main).installed() as stopper:
            for epoch in range(state.epoch, cfg.epochs):
                end = train_one_epoch(train_model, train_loader, criterion, optimizer, scaler,
                                      cfg=cfg, dist=dist, state=state, stopper=stopper,
                                      writer=rundir.writer,
                                      save=save_step if dist.is_main else None)
                if end is EpochEnd.SIGNAL:
                    if dist.is_main:
                        writer.save(parts.checkpoint(state, cfg, dist, None), last_path,
                                    wait=True)
                    outcome = ("stopped", _signal_name(stopper.signum))
                    raise Interrupted(_stopped_text(stopper.signum, state, cfg, train_loader,
                                                    last_path), stopper.signum or signal.SIGTERM)
                final = end is EpochEnd.TIME or epoch + 1 == cfg.epochs or state.time_up(cfg)
                row = {"epoch": epoch + 1, "step": state.step,
                       "lr": optimizer.param_groups[0]["lr"], **state.epoch_sums.summary()}
                scores = None
                if val_loader is not None and (final or (epoch + 1) % cfg.eval_every == 0):
                    tick = time.perf_counter()
                    cm, val_loss, kept = evaluate(
                        eval_model, val_loader, criterion, device=dist.device, amp=cfg.amp,
                        keep=cfg.grid_samples if dist.is_main else 0)
                    val_loader.close()  # its workers would idle until the next evaluation
                    scores = cm.compute(classes, categories)
                    # evaluation counts against --time-limit too, the same on every rank
                    spent = torch.tensor([time.perf_counter() - tick], dtype=torch.float64,
                                         device=dist.device)
                    state.elapsed += float(distributed.all_reduce_sum(spent)) / dist.world_size
                    row.update(val_loss=val_loss, val_miou=scores["miou"],
                               pixel_acc=scores["pixel_acc"])
                    rundir.save_grid(epoch + 1, kept, mean=mean, std=std, palette=palette)
                miou = row.get("val_miou")
                is_best = miou is not None and miou > state.best_miou
                state.best_miou = max(state.best_miou, miou) if miou is not None \
                    else state.best_miou
                if end is not EpochEnd.TIME:  # a cut-short epoch does not count as done
                    state.epoch, state.epoch_sums = epoch + 1, EpochState()
                if dist.is_main:
                    rundir.log_epoch(row, scores)
                    # best.pt first: killed between the two, the epoch is redone from the
                    # previous last.pt and best.pt written again, rather than never
                    paths = (best_path, last_path) if is_best else (last_path,)
                    writer.save(parts.checkpoint(state, cfg, dist, row), *paths)
                    tqdm.write(_summary(row, cfg.epochs))
                    rundir.set_status("running", None, state, cfg.epochs)
                # a signal during the epoch's last step or its validation: stop here, on
                # every rank, rather than a step (or the final evaluation) later
                signum = _agreed_signal(stopper, state, dist)
                if signum:
                    outcome = ("stopped", _signal_name(signum))
                    raise Interrupted(_stopped_text(signum, state, cfg, train_loader,
                                                    last_path), signum)
                if final or state.time_up(cfg):
                    break
        why = "time limit" if state.time_up(cfg) or end is EpochEnd.TIME else "epochs"
        final_metrics = None
        if val_loader is not None and row:
            with _stop_at_once(last_path, cfg.data):
                final_metrics = evaluation.final_evaluation(
                    eval_model, val_loader, criterion, cfg=cfg, dist=dist,
                    inference=final_inference, scores=scores, classes=classes,
                    categories=categories, checkpoint=last_path)
        outcome = ("done", why)
        if dist.is_main:
            if final_metrics is not None:
                tqdm.write(evaluation.said(final_metrics, Path(cfg.out) / "eval-val"))
            tqdm.write(_done_text(out, why, state, cfg, rundir.best))
    except BaseException as e:
        if outcome[1] == "error":
            outcome = ("stopped", _failure(e))
        raise
    finally:
        try:
            writer.close()  # the last checkpoint is on disk before fit returns or raises
        finally:
            rundir.set_status(*outcome, state, cfg.epochs)
            for loader in loaders:
                loader.close()
            rundir.close()
    return row


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


def _against_shards(cfg: Config, manifest: dict, final: Inference) -> Inference:
    """The run folder, the crop and the final evaluation's window against the shards, before
    any training: --out must not be the shards, a size turned on its side is refused, slide's
    window defaults to the crop."""
    if (Path(cfg.out) / MANIFEST_NAME).is_file():
        raise TrainingError(f"--out {cfg.out} holds shards ({MANIFEST_NAME}): a run needs a "
                            "folder of its own, e.g. --out runs/NAME")
    shards = sizes.from_file(manifest["config"]["size"])
    if cfg.crop:
        try:
            sizes.check_aspect("--crop", cfg.crop, "HxW", shards, f"the shards of {cfg.data}")
        except ValueError as e:
            raise TrainingError(str(e)) from None
    try:
        return final.for_model(shards, cfg.crop)
    except InferenceError as e:
        raise TrainingError(str(e).replace("--", "--eval-")) from None


def _resume_loader(loader, position: dict, state: RunState, path: Path) -> None:
    """Put the train loader where the checkpoint stopped, with any number of processes.

    With another global batch an epoch has another number of steps, so the step count is
    restated in this run's steps (the LR schedule keeps its place); a position inside an epoch
    that this run's global batch cannot reach exactly is refused, saying what would work.
    """
    saved = int(position.get("global_batch", loader.global_batch))
    try:
        loader.load_state_dict(position)
    except ValueError as e:
        hint = (f"--batch-size {saved // loader.plan.world_size} (the same global batch), or "
                if saved % loader.plan.world_size == 0 else "")
        raise TrainingError(f"{path}: cannot resume exactly: {e}; resume with {hint}the "
                            "number of processes and batch size it was saved with") from None
    if saved != loader.global_batch:
        state.step = loader.position.stream(len(loader))
        tqdm.write(f"note: {path} was saved with a global batch of {saved} "
                   f"({loader.num_samples // saved} steps per epoch), this run's is "
                   f"{loader.global_batch} ({len(loader)} steps per epoch); continuing at "
                   f"step {state.step}")


def _restarts(dist: distributed.Dist) -> str:
    """How often torchrun has restarted this group, for the log (README: restarts)."""
    if not dist.restart_count:
        return ""
    return f" (torchrun restart {dist.restart_count} of at most {dist.max_restarts})"


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


def _finished(state: RunState, cfg: Config) -> bool:
    return state.epoch >= cfg.epochs or state.time_up(cfg)


def _where(state: RunState, cfg: Config, loader) -> str:
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
    at = (f"in {_where(state, cfg, loader)}" if loader.position.batch % len(loader)
          else f"after epoch {state.epoch}/{cfg.epochs}")
    return (f"stopped by {_signal_name(signum)} {at}, step {state.step}, "
            f"{_duration(state.elapsed)} in; saved {last_path}; continue with --resume")


def _best_text(out: Path, best: tuple[float, int] | None) -> str:
    if best is None:
        return "no validation (no val split)"
    return (f"best val mIoU {best[0]:.4f} at epoch {best[1]} "
            f"({out / 'checkpoints' / 'best.pt'})")


def _finished_text(out: Path, epoch: int, cfg: Config) -> str:
    from train.rundir import best_of

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
            f"{_duration(state.elapsed)}; {_best_text(out, best)}")


def _duration(seconds: float) -> str:
    from train.rundir import duration

    return duration(seconds)


def _summary(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']}/{epochs} step {row['step']}: loss {row['train_loss']:.4f}"
    if row.get("val_miou") is not None:
        text += f", val loss {row['val_loss']:.4f}, mIoU {row['val_miou']:.4f}, " \
                f"pixel acc {row['pixel_acc']:.4f}"
    return text + f" | {row['images_per_s']:.1f} img/s, data wait " \
                  f"{row['data_wait_fraction']:.1%}"
