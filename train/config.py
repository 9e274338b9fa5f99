"""Every setting of a training run, with its default, and the errors a run raises; which
settings are the run's own and which one session of it may change (ARCH_FIELDS,
SESSION_FIELDS), a resumed session's settings, and settings read from a JSON file.

Kept free of torch on purpose: `train/cli.py` imports it at start-up, and so does every loader
worker process that `spawn` starts, since spawn re-imports the main module (`train.cli` under
torchrun or `python -m`): a worker that only reads shards should not pay ~500 MB for torch.
"""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from pipeline import sizes

AMP_MODES = ("bf16", "fp16", "off")
RESUME_MODES = (False, True, "auto")


@dataclass
class Config:
    # data (pipeline/loader.py)
    data: str = ""
    train_split: str = "train"  # "+" joins several: train+train_extra
    out: str = "runs/unet"
    crop: tuple[int, int] | None = (512, 1024)  # H, W of training crops; None = whole images
    scale: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: float = 0.2
    workers: int | None = None
    backend: str = "auto"
    # model (train/models: `citytrain models` lists them) and loss
    encoder: str = "plain"  # the U-Net from scratch, or a torchvision backbone
    weights: str = "imagenet"  # imagenet | none | PATH: a torchvision encoder's start
    decoder: tuple[int, ...] | None = None  # an encoder's decoder widths; None: its default
    encoder_lr_mult: float = 1.0  # the encoder's LR is the peak LR times this
    width: int = 64  # plain only
    depth: int = 4  # plain only
    upsample: str = "bilinear"  # plain only
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
    tf32: bool = True  # TF32 for fp32 matmuls and convolutions on CUDA (Ampere and later)
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = True  # SyncBatchNorm across processes (DDP)
    device: str = "auto"
    # the evaluation after the last epoch (train/evaluation/evaluate.py, inference.py)
    eval_mode: str = "whole"  # whole | slide
    eval_window: tuple[int, int] | None = None  # H, W of the sliding windows
    eval_stride: tuple[int, int] | None = None  # H, W; None: 2/3 of the window
    eval_scales: tuple[float, ...] = (1.0,)
    eval_flip: bool = False
    # bookkeeping
    log_every: int = 20  # steps between host syncs: loss, stop flag and clock across ranks
    eval_every: int = 1
    save_every: int = 500  # steps between mid-epoch checkpoints (0: epoch ends and signals only)
    grid_samples: int = 4
    seed: int = 0
    resume: bool | str = False  # True: continue the run; "auto": continue if it has a checkpoint
    init: str | None = None  # fine-tune: start from this checkpoint's weights (only)
    init_head: str = "keep"  # keep | reset: the last layer from the checkpoint, or fresh
    progress: bool = True
    preflight: bool = True  # measure one step's memory before training, stop if it won't fit
    preflight_only: bool = False  # only that: `make train` checks once, before torchrun

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


class AgreedError(TrainingError):
    """Raised on every rank with the same message (the ranks agreed on it): rank 0 alone
    prints it."""


# -- which settings belong to the run, which to one session of it ---------------------------

# What the model is. `--init CKPT` takes these from the checkpoint unless they are given;
# `--resume` refuses another value with "checkpoint is another architecture".
ARCH_FIELDS = ("encoder", "decoder", "width", "depth", "upsample", "losstype")
# fit's last evaluation (--eval-*): given together or taken together, as one choice.
EVAL_FIELDS = ("eval_mode", "eval_window", "eval_stride", "eval_scales", "eval_flip")
# What may change from one session of a run to the next: how long it trains, where its data
# is (the shards' identity is checked against the checkpoint), how it runs on this machine
# (processes, precision-neutral speed settings), what it reports and its final evaluation.
# Every other setting is the run's own: a resume reads it from the checkpoint and refuses
# another value, naming both.
SESSION_FIELDS = ("data", "out", "epochs", "time_limit", "batch_size", "workers", "backend",
                  "device", "tf32", "channels_last", "compile", "sync_bn", "log_every",
                  "eval_every", "save_every", "grid_samples", "progress", "preflight",
                  "preflight_only", "resume", *EVAL_FIELDS)
# what one command line asks for, never carried from a saved config into another session
# (`make train` checks memory once, then runs torchrun with --no-preflight)
INVOCATION_FIELDS = ("resume", "preflight", "preflight_only")
SIZE_FIELDS = ("crop", "eval_window", "eval_stride")  # (H, W); typed HxW
PATH_FIELDS = ("data", "out", "init")

_HINTS = typing.get_type_hints(Config)


def option(name: str) -> str:
    """A setting's command-line spelling: eval_window -> --eval-window."""
    return "--" + name.replace("_", "-")


def shown(name: str, value) -> str:
    """A setting's value as the user would type it (what `citytrain fit --help` shows)."""
    if name in SIZE_FIELDS and value is not None:
        return sizes.text(value)
    if name == "crop" and value is None:
        return "full"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def effective(cfg: Config) -> Config:
    """The values the run uses, as config.json and checkpoints record them: the learning
    rate and weight decay of its optimizer, absolute paths."""
    paths = {k: os.path.abspath(getattr(cfg, k)) for k in PATH_FIELDS if getattr(cfg, k)}
    return replace(cfg, lr=cfg.resolved_lr(), weight_decay=cfg.resolved_weight_decay(), **paths)


def _coerce(name: str, value, hint, where: str):
    """`value` read from a file as the setting `name` of type `hint`; ValueError if not."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        if name == "crop" and isinstance(value, str) and value.lower() in ("full", "none"):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if typing.get_origin(hint) is tuple:
        if name in SIZE_FIELDS and isinstance(value, str):
            return sizes.parse(value, "HxW")
        if name in SIZE_FIELDS and isinstance(value, dict) and set(value) == {"height", "width"}:
            value = [value["height"], value["width"]]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise ValueError(f"expected {len(kinds)} values, got {list(value)}")
        return tuple(_coerce(name, v, k, where) for v, k in zip(value, kinds))
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise ValueError(f"expected {getattr(hint, '__name__', hint)}, got {value!r}")


def settings_from(values: dict, where: str, *, strict: bool = True) -> dict:
    """Config fields from a dict read from JSON or a checkpoint (lists become tuples, sizes
    may be "HxW"). `strict`: an unknown name or a bad value is a TrainingError naming it;
    otherwise unknown names (a setting of another version) are skipped."""
    known = {f.name for f in fields(Config)}
    out = {}
    for name, value in values.items():
        if name not in known:
            if strict:
                close = difflib.get_close_matches(name, sorted(known), n=3)
                raise TrainingError(f"{where}: no setting {name!r}"
                                    + (f" (did you mean {', '.join(close)}?)" if close else ""))
            continue
        try:
            out[name] = _coerce(name, value, _HINTS[name], where)
        except ValueError as e:
            raise TrainingError(f"{where}: {name}: {e}") from None
    return out


def read_config_file(path: Path) -> dict:
    """The settings in `path`: a run's config.json (its "config") or a small JSON file of
    settings, e.g. {"width": 32, "crop": "512x1024", "lr": 0.02}. Of a run's config.json
    what its command line asked for (INVOCATION_FIELDS: --resume, --preflight...) is left
    out: it describes the run; a file the user wrote says what it says."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainingError(f"{path}: no such config file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"{path}: not a readable JSON config ({e})") from None
    saved = isinstance(values, dict) and isinstance(values.get("config"), dict)
    if saved:
        values = values["config"]  # a run's config.json
    if not isinstance(values, dict):
        raise TrainingError(f"{path}: expected a JSON object of settings, e.g. "
                            '{"width": 32, "epochs": 50}')
    settings = settings_from(values, str(path))
    return {k: v for k, v in settings.items() if not (saved and k in INVOCATION_FIELDS)}


def resumed(saved: dict, cfg: Config, given: Iterable[str], path: Path | str) -> Config:
    """The settings of a resumed session: the run's own (`saved`, the checkpoint's config),
    and of `cfg` only what was `given` among SESSION_FIELDS (EVAL_FIELDS as one group).

    A given setting outside SESSION_FIELDS that differs from the run's is a TrainingError
    naming both values: a run trained on with another recipe would not be this run.
    """
    given = set(given)
    run = settings_from(saved, str(path), strict=False)
    merged = {**asdict(cfg), **run}
    take = set(SESSION_FIELDS) & given
    if take & set(EVAL_FIELDS):
        take |= set(EVAL_FIELDS)
    take |= set(INVOCATION_FIELDS) | {"out"}  # where the run is, and how this command acts
    merged.update({k: getattr(cfg, k) for k in take})
    mine, theirs = effective(cfg), effective(Config(**merged))
    differ = [k for k in sorted(given - set(SESSION_FIELDS))
              if getattr(mine, k) != getattr(theirs, k)]
    if differ:
        arch = [k for k in differ if k in ARCH_FIELDS]
        other = [k for k in differ if k not in ARCH_FIELDS]
        said = []
        if arch:
            have = ", ".join(f"{k}={shown(k, getattr(theirs, k))}" for k in arch)
            want = ", ".join(f"{k}={shown(k, getattr(mine, k))}" for k in arch)
            said.append(f"checkpoint is another architecture ({have}); this run builds {want}")
        if other:
            have = " ".join(f"{option(k)} {shown(k, getattr(theirs, k))}" for k in other)
            want = " ".join(f"{option(k)} {shown(k, getattr(mine, k))}" for k in other)
            said.append(f"the run was trained with {have}; this command gives {want}")
        raise TrainingError(
            f"{path}: {'; '.join(said)}. A resumed run takes its settings from its "
            "checkpoint and only how long, where and how it runs may change (--epochs "
            "--time-limit --data --batch-size --workers --device, logging, --eval-*): leave "
            f"{'it' if len(differ) == 1 else 'them'} out, or start a new run from its "
            f"weights with --init {path} --out NEW_RUN")
    return Config(**merged)


def with_arch(saved: dict | None, cfg: Config, given: Iterable[str]) -> tuple[Config, dict]:
    """`--init`: the architecture (ARCH_FIELDS) of the checkpoint's config where the
    command gave none; returns the settings and those taken."""
    run = settings_from(saved or {}, "checkpoint", strict=False)
    if "encoder" in set(given) and run.get("encoder", "plain") != cfg.encoder:
        return cfg, {}  # another model: none of the checkpoint's shape applies (refused later)
    taken = {k: run[k] for k in ARCH_FIELDS if k in run and k not in set(given)}
    return replace(cfg, **taken), taken
