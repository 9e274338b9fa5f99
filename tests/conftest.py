"""Shared fixtures: a small synthetic city, its shards, hand-made shard folders, a checkpoint.

The builders behind them, and whatever a test module imports, are in helpers.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import CITY_SIZE, SHARD_SIZE, fit_briefly, write_checkpoint, write_dataset

from pipeline.labels import get_mapping


@pytest.fixture(scope="session")
def city(tmp_path_factory) -> Path:
    """A synthetic Cityscapes tree: 6 train and 4 val frames at 256x128."""
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("city")
    synthesize(root, train=6, val=4, size=CITY_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def shards(city, tmp_path_factory) -> Path:
    """`city` preprocessed to 128x64 with the trainid mapping, 4 samples per shard."""
    from pipeline.preprocess import preprocess

    out = tmp_path_factory.mktemp("shards") / "city-128x64"
    preprocess(city, out, size=SHARD_SIZE, mapping="trainid", shard_size=4, workers=1,
               progress=False)
    return out


@pytest.fixture
def make_dataset(tmp_path) -> Callable[..., Path]:
    """`make_dataset(splits, mapping=..., shard_size=...)` writes a shard folder under tmp_path."""
    counter = iter(range(1000))

    def make(splits, **kwargs) -> Path:
        return write_dataset(tmp_path / f"data{next(counter)}", splits, **kwargs)

    return make


@pytest.fixture(scope="session")
def unet_checkpoint(tmp_path_factory) -> Path:
    """A small U-Net (width 8, depth 3), briefly fitted at 128x64."""
    import torch

    from train.models.plain import UNet

    torch.manual_seed(0)
    model = fit_briefly(UNet(get_mapping("trainid").num_classes, width=8, depth=3))
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet.pt", model)
