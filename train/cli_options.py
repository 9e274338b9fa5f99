"""What the `citytrain` commands share: choices read from their owners, defaults as typed,
sizes and inference options parsed, the project's errors as one line."""

from __future__ import annotations

import functools
import importlib
import os

import click

from pipeline import sizes
from train.config import (
    AMP_MODES,
    AgreedError,
    Config,
    Interrupted,
    TrainingError,
    shown,
)

DEFAULTS = Config()


class Owned(click.Choice):
    """The choices a module exports ("train.losses:LOSSTYPES"), read when click first needs
    them (help, a typed value): the owners import torch, which start-up, and every loader
    worker that spawn starts by re-importing this module, should not pay."""

    def __init__(self, where: str) -> None:
        self.where, self.case_sensitive = where, True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:
        module, name = self.where.split(":")
        return tuple(getattr(importlib.import_module(module), name))


BACKENDS = Owned("pipeline.loader:BACKENDS")
DEVICES = Owned("pipeline.devices:DEVICES")
OPTIMIZERS = Owned("train.optim:OPTIMIZERS")
AMPS = click.Choice(list(AMP_MODES))


def typed_default(name: str) -> str:
    """Config's default of a setting as the user would type it: fit's options show these."""
    return shown(name, getattr(DEFAULTS, name))


def _errors():
    from pipeline.cityscapes import DatasetError
    from pipeline.labels import MappingError
    from pipeline.shards import ShardError
    from train.checkpoint import CheckpointError
    from train.evaluation.evaluate import EvaluationError
    from train.evaluation.inference import InferenceError
    from train.models import ModelError, WeightsError
    from train.onnx_runtime import OnnxError
    from train.predict import InputError

    return (ShardError, MappingError, DatasetError, CheckpointError, InputError, TrainingError,
            InferenceError, ModelError, WeightsError, EvaluationError, OnnxError)


def friendly_errors(fn):
    """The project's errors become one line and a non-zero exit, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            click.echo(str(e), err=True)
            raise SystemExit(128 + int(e.signum)) from None
        except AgreedError as e:  # the same on every rank: say it once
            if int(os.environ.get("RANK", 0)) == 0:
                click.echo(f"Error: {e}", err=True)
            raise SystemExit(1) from None
        except _errors() as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def parse_size(text: str | None, order: str = "HxW") -> tuple[int, int] | None:
    """A size typed in `order` -> (H, W) (pipeline/sizes.py); 'none'/'full' -> None."""
    if text is None or text.lower() in ("none", "full"):
        return None
    try:
        return sizes.parse(text, order)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected MIN,MAX, got {text!r}") from None
    return lo, hi


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(v) for v in text.split(","))
        if not scales or min(scales) <= 0:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected positive numbers like 0.75,1.0,1.25, got {text!r}") \
            from None
    return scales


def _widths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        widths = tuple(int(v) for v in text.split(","))
        if min(widths) < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected channel counts like 256,128,64,32,16, got "
                                 f"{text!r}") from None
    return widths


def inference_options(prefix: str = "", max_windows: bool = True):
    """--mode --window --stride --scales --flip [--max-windows]; `prefix` "eval-" for fit."""
    p = f"--{prefix}"
    options = [
        click.option(f"{p}mode", default=DEFAULTS.eval_mode,
                     type=Owned("train.evaluation.inference:MODES"),
                     help="whole: the image at once; slide: overlapping windows, outputs "
                          "averaged where they overlap."),
        click.option(f"{p}window", default=None, metavar="HxW",
                     help="Slide window HxW at the model's scale, e.g. 512x1024."),
        click.option(f"{p}stride", default=None, metavar="HxW",
                     help="Slide stride HxW [2/3 of the window: 341x683 for 512x1024]."),
        click.option(f"{p}scales", default=typed_default("eval_scales"), metavar="S,S,...",
                     help="Test-time scales of the training size, outputs averaged, e.g. "
                          "0.5,0.75,1.0,1.25,1.5,1.75."),
        click.option(f"{p}flip", is_flag=True,
                     help="Also run each image mirrored and average (test-time flip)."),
    ]
    if max_windows:
        options.append(click.option(
            "--max-windows", default=4, type=click.IntRange(1),
            help="Windows (or whole images) per forward pass; peak memory grows with it."))

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def parse_inference(mode: str, window: str | None, stride: str | None, scales: str,
                    flip: bool, max_windows: int = 4, prefix: str = ""):
    """The CLI's strings -> train.evaluation.inference.Inference; a bad combination is a usage
    error."""
    from train.evaluation.inference import Inference, InferenceError

    try:
        return Inference(mode, parse_size(window) if window else None,
                         parse_size(stride) if stride else None, _scales(scales), flip,
                         max_windows)
    except InferenceError as e:
        raise click.UsageError(str(e).replace("--", f"--{prefix}")) from None
