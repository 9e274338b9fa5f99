"""Pretrained weights for an encoder: torchvision's ImageNet weights, or a state dict file.

`imagenet` goes through torchvision's weights API, so the file is downloaded once into torch's
hub cache (`$TORCH_HOME/hub/checkpoints/`, `~/.cache/torch` by default) and read from there
after; a node without network gets the file's exact name and the folder to put it in.
"""

from __future__ import annotations

import pickle
import urllib.error
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum


class WeightsError(RuntimeError):
    """Weights that cannot be had or do not fit; the message names the file and the way out."""


def cache_file(weights: WeightsEnum) -> Path:
    """Where torch's hub cache keeps `weights` (where torchvision looks before downloading)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def imagenet_state_dict(weights: WeightsEnum, *, progress: bool = True) -> dict:
    """The state dict of `weights`, from the hub cache or downloaded into it."""
    file = cache_file(weights)
    try:
        return weights.get_state_dict(progress=progress, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        reason = getattr(e, "reason", None) or e
        raise WeightsError(
            f"cannot fetch the ImageNet weights {weights} ({reason}): put {file.name} (from "
            f"{weights.url}) into {file.parent}/, or pass --weights PATH to a copy of it, or "
            "--weights none to train the encoder from scratch") from None


def file_state_dict(path: Path) -> dict:
    """A torchvision state dict saved with `torch.save(model.state_dict(), path)`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file (--weights takes imagenet, none or "
                           "the path of a torchvision state dict)")
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: not a torch.save file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path}: not a readable state dict ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict (a dict of tensors, as "
                           "torch.save(model.state_dict()) writes)")
    return state


def load_weights(backbone: nn.Module, state: dict, source: str) -> None:
    """Load `state` into the whole torchvision `backbone` (its classifier too), naming the keys
    that are missing or unexpected and the tensors whose shapes differ."""
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{what} {_few(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("other shapes", shapes)) if keys]
    if problems:
        raise WeightsError(f"{source}: weights do not fit {type(backbone).__name__}: "
                           + "; ".join(problems))
    backbone.load_state_dict(state)


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
