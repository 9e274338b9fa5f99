"""`citytrain fit`'s options read Config and the owners' lists: the help shows Config's
defaults as a user types them, the choices are the owners', and the defaults are those of
the releases before (a changed default changes what every existing command line does)."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest

from pipeline.devices import DEVICES
from pipeline.loader import BACKENDS
from train.checkpoint import INIT_HEADS
from train.cli import fit, main
from train.config import AMP_MODES, Config, shown
from train.evaluation.inference import MODES
from train.losses import LOSSTYPES
from train.models.plain import UPSAMPLE_MODES
from train.optim import OPTIMIZERS

# what `citytrain fit --help` showed before its options were read from Config
SHOWN = {"--train-split": "train", "--epochs": "100; x>=1", "--batch-size": "8; x>=1",
         "--crop": "512x1024", "--scale": "0.5,2.0", "--flip": "flip", "--jitter": "0.2; 0<=x<=1",
         "--optimizer": "sgd", "--warmup": "0; x>=0", "--encoder": "plain",
         "--weights": "imagenet", "--encoder-lr-mult": "1.0; x>0", "--width": "64; x>=1",
         "--depth": "4; x>=1", "--upsample": "bilinear", "--losstype": "segment",
         "--amp": "bf16", "--tf32": "tf32", "--sync-bn": "sync-bn", "--device": "auto",
         "--backend": "auto", "--eval-every": "1; x>=1", "--log-every": "20; x>=1",
         "--save-every": "500; x>=0", "--seed": "0", "--init-head": "keep",
         "--progress": "progress", "--preflight": "preflight", "--eval-mode": "whole",
         "--eval-scales": "1.0"}
CHOICES = {"--optimizer": OPTIMIZERS, "--upsample": UPSAMPLE_MODES, "--losstype": LOSSTYPES,
           "--amp": AMP_MODES, "--device": DEVICES, "--backend": BACKENDS,
           "--init-head": INIT_HEADS, "--eval-mode": MODES}


def help_records() -> dict[str, str]:
    """Option -> the text `--help` shows beside it (help, choices, [default: ...])."""
    ctx = click.Context(fit, info_name="fit", parent=click.Context(main, info_name="citytrain"),
                        show_default=True)
    records = {}
    for param in fit.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is not None:
            records[param.opts[0]] = " ".join(record)
    return records


def test_fit_help_shows_the_same_defaults_as_before():
    records = help_records()
    for option, default in SHOWN.items():
        assert f"[default: {default}]" in records[option], option


def test_fit_defaults_are_configs_as_typed():
    records = help_records()
    by_option = {"--" + f.name.replace("_", "-"): f.name for f in fields(Config)}
    checked = 0
    for param in fit.params:
        name = by_option.get(param.opts[0])
        # no default: the setting comes from elsewhere (--data, --out, --lr: a resumed run,
        # the optimizer); a flag shows its name
        if name is None or param.default is None or getattr(param, "is_flag", False):
            continue
        assert f"[default: {shown(name, getattr(Config(), name))}" in records[param.opts[0]], name
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("option", sorted(CHOICES))
def test_fit_choices_are_the_owners(option):
    param = next(p for p in fit.params if p.opts[0] == option)
    assert tuple(param.type.choices) == tuple(CHOICES[option])
    assert f"[{'|'.join(CHOICES[option])}]" in " ".join(help_records()[option].split())
