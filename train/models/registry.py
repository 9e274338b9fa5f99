"""The model registry: a name for each model and the one function that builds it.

As torchvision's `register_model`/`get_model`: a dict, a decorator that refuses a name twice,
a lookup that lists the names on a miss. A builder is `builder(num_classes, **options)`; its
keyword options are named as the `Config` fields they come from (`width`, `decoder`,
`weights`...), so `fit` hands each model the settings it takes and no others. The model it
returns meets the contract in docs/design.md (`.config`, `.size_multiple`, `.normalization`,
`head.`, `encoder.`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from torch import nn

from train.config import Config

# The settings that describe a model; a model takes some of them (its builder's keywords).
MODEL_SETTINGS = ("width", "depth", "upsample", "decoder", "weights")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_WEIGHTS: dict[str, Any] = {}  # name -> the torchvision WeightsEnum `--weights imagenet` loads


class ModelError(ValueError):
    """An unknown model, or settings that model does not take."""


def register_model(name: str, *, weights: Any = None) -> Callable:
    """Decorator: `@register_model("resnet18")` over `builder(num_classes, **options)`;
    `weights`: the torchvision weights its `weights="imagenet"` loads, for `citytrain models`."""

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"a model named {name!r} is already registered "
                             f"({getattr(_BUILDERS[name], '__module__', None) or 'elsewhere'})")
        _BUILDERS[name] = builder
        if weights is not None:
            _WEIGHTS[name] = weights
        return builder

    return register


def list_models() -> list[str]:
    """Every registered name, in the order registered (the plain U-Net first)."""
    return list(_BUILDERS)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ModelError(f"no model named {name!r}; the registered ones are "
                         f"{', '.join(list_models())}") from None


def pretrained_weights(name: str) -> Any:
    """The torchvision weights `name` loads with `weights="imagenet"`, or None."""
    return _WEIGHTS.get(name)


def settings_taken(name: str) -> tuple[str, ...]:
    """Which of MODEL_SETTINGS model `name` takes: its builder's keyword parameters."""
    params = inspect.signature(get_model_builder(name)).parameters
    return tuple(k for k in MODEL_SETTINGS if k in params)


def model_from_config(cfg: Config, num_classes: int, *, pretrained: bool = True) -> nn.Module:
    """The model a run's settings describe, built with the settings it takes.

    A setting the model does not take is refused unless left at its default: `--width` means
    nothing to a ResNet, and ignoring it would train something other than asked. A setting
    left at None is the model's own default. `pretrained=False` builds with random weights
    (a checkpoint brings them, or only the shape counts), fetching nothing.
    """
    settings, defaults = asdict(cfg), asdict(Config())
    taken = settings_taken(cfg.encoder)
    ignored = [k for k in MODEL_SETTINGS if k not in taken and settings[k] != defaults[k]]
    if ignored:
        flags = ", ".join("--" + k for k in ignored)
        takes = ", ".join("--" + k for k in taken) or "none of them"
        raise ModelError(f"{flags}: not a setting of the {cfg.encoder} model (it takes "
                         f"{takes}; `citytrain models` lists the models)")
    options = {k: settings[k] for k in taken if settings[k] is not None}
    if not pretrained and "weights" in options:
        options["weights"] = "none"
    return build_model(cfg.encoder, num_classes, **options)


def build_model(encoder: str, num_classes: int, **options: Any) -> nn.Module:
    """The registered model `encoder` with `num_classes` outputs per pixel.

    `build_model(**model.config)` rebuilds any model's architecture, with random weights
    (a builder's `weights` default is "none", as torchvision's are)."""
    return get_model_builder(encoder)(num_classes=num_classes, **options)


def arch_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's `arch`, read as today's: checkpoints from before the registry hold the
    plain U-Net's config without an `encoder` entry."""
    return {"encoder": "plain", **config}


def model_card(name: str, size: tuple[int, int] = (512, 1024), num_classes: int = 19) \
        -> dict[str, Any]:
    """What `citytrain models` says of `name`: parameters, forward GFLOPs on one (H, W)
    image (torch.utils.flop_counter, on the meta device: no memory, no time), and the
    ImageNet weights' name, top-1 and mean/std from torchvision's metadata."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(name, num_classes).eval()
    params = sum(p.numel() for p in model.parameters())
    model = model.to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, *size, device="meta"))
    card = {"name": name, "params_m": params / 1e6, "size": list(size),
            "gflops": counter.get_total_flops() / 1e9, "weights": None, "top1": None,
            "mean": None, "std": None}
    weights = pretrained_weights(name)
    if weights is not None:
        preset = weights.transforms()
        card.update(weights=str(weights), top1=weights.meta["_metrics"]["ImageNet-1K"]["acc@1"],
                    mean=list(preset.mean), std=list(preset.std))
    return card
