"""`fit`: wires the loader, model, loss, optimizer, checkpoints and run directory together.

Read top to bottom: the settings (a resumed run's from its checkpoint, `--init`'s
architecture from its checkpoint), the model (train/models), both loaders (normalised as the
model's weights expect), loss and optimizer, resume if asked, then the epoch loop: train
(with a step checkpoint every --save-every steps), evaluate, log, checkpoint, stop on a
signal or when time runs out; last, the final evaluation into OUT/eval-val. That loop is
`train/session.py`'s; the per-step and per-epoch machinery lives in `train/engine.py`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import sizes
from pipeline.files import sweep_temporaries
from pipeline.loader import build_loader
from pipeline.shards import MANIFEST_NAME, load_manifest
from train import distributed, preflight
from train.checkpoint import (
    check_arch,
    check_classes,
    check_data,
    init_from_checkpoint,
    load_checkpoint,
    load_model_weights,
    normalization_of,
    set_rng_state,
)
from train.config import RESUME_MODES, effective, resumed, with_arch
from train.engine import (
    Config,
    EpochState,
    RunState,
    TrainingError,
)
from train.evaluation.evaluate import final_inference
from train.evaluation.inference import Inference, InferenceError
from train.losses import build_loss, class_weights_from_pixels, output_channels
from train.models import ModelError, model_from_config
from train.optim import build_optimizer, load_optimizer_state
from train.precision import AMP_DTYPES, cuda_speed_settings
from train.rundir import RunDir
from train.session import Parts, Session, finished_text, where


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
    final_inference = _checked(cfg, dist)
    seed_everything(cfg.seed)
    speed = cuda_speed_settings(dist.device, tf32=cfg.tf32)

    # model: its weights from a checkpoint (resume, --init) or its own (pretrained or fresh)
    manifest = load_manifest(Path(cfg.data))
    final_inference = _against_shards(cfg, manifest, final_inference)
    model = _model(cfg, manifest, pretrained=saved is None and not cfg.init)
    last_path = Path(cfg.out) / "checkpoints" / "last.pt"
    if saved is not None and _finished(saved["epoch"], saved["elapsed"], cfg):
        check_arch(saved, dict(model.config), last_path)  # another model is refused all the same
        if dist.is_main:
            tqdm.write(finished_text(Path(cfg.out), saved["epoch"], cfg))
        return dict(saved.get("metrics") or {})
    init = _init(cfg, model, manifest, resuming=saved is not None)
    norm = _normalization(model, manifest, saved if saved is not None else init)

    # data, and whether a step fits (stop now, with a message, not in the OOM killer)
    train_loader, val_loader = _loaders(cfg, dist, manifest, norm)
    memory = _preflight(cfg, dist, train_loader) if cfg.preflight or cfg.preflight_only else None
    if cfg.preflight_only:
        return memory

    # loss, optimizer, resume
    parts, criterion = _parts(cfg, dist, model, train_loader, manifest, norm)
    state = RunState(train_loader, total_steps=cfg.epochs * len(train_loader))
    if saved is not None:
        _resume(parts, saved, state, cfg, dist, last_path)
    train_model, eval_model = _wrapped(parts.model, cfg, dist)

    rundir = _rundir(cfg, dist, state, resumed=saved is not None, about=parts.about)
    rundir.write_config({
        "config": asdict(cfg), "world_size": dist.world_size, "device": str(dist.device),
        "cuda_settings": speed, "preflight": memory, "model": parts.about["arch"],
        "classes": parts.about["classes"], "mean": norm["mean"], "std": norm["std"],
        "normalization": norm["normalization"],
        "data": {"manifest_config": manifest["config"],
                 "samples": {s: v["samples"] for s, v in manifest["splits"].items()}},
        "steps_per_epoch": len(train_loader), "resumed_from_step": state.step or None,
        "init": init,
    })
    run = Session(cfg, dist, parts, criterion, state, rundir, train_model, eval_model,
                  val_loader)
    try:
        return run.train(final_inference)
    finally:
        for loader in (train_loader, val_loader):
            if loader is not None:
                loader.close()


# -- the steps of _fit -------------------------------------------------------------------------

def _checked(cfg: Config, dist: distributed.Dist) -> Inference:
    """Settings refused before any work; the final evaluation's settings, checked."""
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, not {cfg.amp!r}")
    if cfg.compile and dist.distributed and cfg.sync_bn:
        raise TrainingError(
            "--compile with several processes needs --no-sync-bn: SyncBatchNorm all-reduces "
            "inside every BatchNorm layer, which breaks the compiled graph at each one (and "
            "has crashed torch.compile upstream); train with --no-sync-bn (BatchNorm per "
            "process, fine at 8 or more images per GPU) or without --compile")
    try:  # a bad setting fails now, not at the end
        return final_inference(cfg)
    except ValueError as e:  # the combination may come from the run's config
        raise TrainingError(str(e).replace("--", "--eval-")) from None


def _model(cfg: Config, manifest: dict, *, pretrained: bool) -> nn.Module:
    try:
        return model_from_config(cfg, output_channels(cfg.losstype, len(manifest["classes"])),
                                 pretrained=pretrained)
    except ModelError as e:
        raise TrainingError(str(e)) from None


def _init(cfg: Config, model: nn.Module, manifest: dict, *, resuming: bool) -> dict | None:
    """--init's checkpoint, loaded into `model`; resuming, the run's own weights follow and
    --init is its past (config.json's record of it)."""
    if not cfg.init:
        return None
    if resuming:
        return RunDir.recorded(Path(cfg.out), "init")
    # before SyncBatchNorm and DDP: every rank loads the same weights
    return init_from_checkpoint(model, Path(cfg.init), classes=list(manifest["classes"]),
                                losstype=cfg.losstype, data=cfg.data, head=cfg.init_head)


def _normalization(model: nn.Module, manifest: dict, checkpoint: dict | None) -> dict:
    """The images as the weights saw them: the checkpoint's, the pretrained weights' mean/std,
    or the train split's own (manifest) for a model from scratch."""
    if checkpoint is not None:
        norm = normalization_of(checkpoint)
    elif model.normalization is not None:
        norm = {**model.normalization, "normalization": model.normalization["weights"]}
    else:
        norm = {"mean": manifest["mean"], "std": manifest["std"], "normalization": "dataset"}
    return {**norm, "mean": [float(v) for v in norm["mean"]],
            "std": [float(v) for v in norm["std"]]}


def _loaders(cfg: Config, dist: distributed.Dist, manifest: dict, norm: dict) -> tuple:
    """The train loader (refused without one whole batch) and the val loader (or None)."""
    common = dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, mean=norm["mean"],
                  std=norm["std"], device=dist.device, workers=cfg.workers,
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
    return train_loader, val_loader


def _preflight(cfg: Config, dist: distributed.Dist, loader) -> dict:
    """Two probe steps' memory (and, on the CPU, time), refused on every rank when too much."""
    with torch.random.fork_rng(devices=[dist.device] if dist.device.type == "cuda" else []):
        memory = preflight.check_fits(cfg, dist, loader.num_classes, loader.aug.crop,
                                      loader.workers, loader.backend)
    if dist.is_main and memory.get("step_s", 0.0) >= preflight.SLOW_STEP_S:
        tqdm.write(preflight.time_estimate(memory["step_s"], len(loader), cfg))
    if cfg.preflight_only:
        tqdm.write(f"preflight: one step needs about {memory['step_gb']:.1f} GB per process, "
                   f"{memory['total_gb']:.1f} GB in all, of {memory['budget_gb']:.1f} GB: "
                   "it fits")
    return memory


def _parts(cfg: Config, dist: distributed.Dist, model: nn.Module, loader, manifest: dict,
           norm: dict) -> tuple[Parts, nn.Module]:
    """The model on its device (SyncBatchNorm under DDP unless --no-sync-bn), optimizer,
    scaler and what a checkpoint says of the model and data; and the loss."""
    arch = dict(model.config)
    if dist.distributed and cfg.sync_bn:
        model = distributed.convert_sync_batchnorm(model, dist.device)
    model.to(dist.device, memory_format=torch.channels_last if cfg.channels_last
             else torch.contiguous_format)
    palette = np.asarray(loader.palette, dtype=np.uint8)
    weights = class_weights_from_pixels(manifest["class_pixels"]) if cfg.class_weights else None
    criterion = build_loss(cfg.losstype, palette=palette, ignore_index=loader.ignore_index,
                           class_weights=weights).to(dist.device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16")
    about = {"arch": arch, "classes": list(loader.classes),  # the same all run long
             "categories": list(manifest["categories"]), "palette": palette.tolist(),
             "mean": norm["mean"], "std": norm["std"], "normalization": norm["normalization"],
             "shards_mean": list(manifest["mean"]), "shards_std": list(manifest["std"]),
             "losstype": cfg.losstype, "ignore_index": int(loader.ignore_index),
             "size": sizes.to_file(sizes.from_file(manifest["config"]["size"])),
             "mapping": manifest["config"].get("mapping_def")}
    return Parts(model, optimizer, scaler, loader, about), criterion


def _resume(parts: Parts, saved: dict, state: RunState, cfg: Config, dist: distributed.Dist,
            path: Path) -> None:
    """The checkpoint's weights, optimizer, scaler, RNG and loader position, checked first."""
    check_arch(saved, parts.about["arch"], path)
    check_classes(saved, parts.about["classes"], path, cfg.data)
    check_data(saved, parts.about, path, cfg.data)
    load_model_weights(parts.model, saved, path)
    load_optimizer_state(parts.optimizer, saved["optimizer"])
    parts.scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"], dist.device)
    state.elapsed, state.best_miou = saved["elapsed"], saved["best_miou"]
    state.epoch_sums = EpochState(**saved["epoch_state"])
    _resume_loader(parts.loader, saved["loader"], path)  # the epoch and step with it
    if dist.is_main:
        tqdm.write(f"resuming {path} at step {state.step}: "
                   + where(state, cfg, parts.loader) + _restarts(dist))


def _wrapped(model: nn.Module, cfg: Config, dist: distributed.Dist) -> tuple:
    """(the model as trained: DDP, compiled; the model as evaluated: compiled)."""
    train_model = model
    if dist.distributed:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:  # DDP first, then compile: the order torch.compile's DDP support expects
        return torch.compile(train_model), torch.compile(model)
    return train_model, model


def _rundir(cfg: Config, dist: distributed.Dist, state: RunState, *, resumed: bool,
            about: dict) -> RunDir:
    out = Path(cfg.out)
    if dist.is_main and (out / "checkpoints").is_dir():
        sweep_temporaries(out / "checkpoints")  # what a killed save left behind
    # a new run in a folder where one never got to its first checkpoint starts clean
    return RunDir(out, enabled=dist.is_main, resume_epoch=state.epoch if resumed else None,
                  resume_step=state.step, palette=np.asarray(about["palette"], dtype=np.uint8))


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


def _resume_loader(loader, position: dict, path: Path) -> None:
    """Put the train loader where the checkpoint stopped, with any number of processes.

    With another global batch an epoch has another number of steps, so the step count (the
    loader's position) is restated in this run's steps and the LR schedule keeps its place;
    a position inside an epoch that this run's global batch cannot reach exactly is refused,
    saying what would work.
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
        tqdm.write(f"note: {path} was saved with a global batch of {saved} "
                   f"({loader.num_samples // saved} steps per epoch), this run's is "
                   f"{loader.global_batch} ({len(loader)} steps per epoch); continuing at "
                   f"step {loader.position.stream(len(loader))}")


def _restarts(dist: distributed.Dist) -> str:
    """How often torchrun has restarted this group, for the log (README: restarts)."""
    if not dist.restart_count:
        return ""
    return f" (torchrun restart {dist.restart_count} of at most {dist.max_restarts})"


def _finished(epoch: int, elapsed: float, cfg: Config) -> bool:
    return epoch >= cfg.epochs or (cfg.time_limit is not None and elapsed >= cfg.time_limit)


