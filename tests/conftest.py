"""Shared fixtures: a small synthetic city, its shards, and hand-made shard folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.labels import Mapping, get_mapping
from pipeline.shards import write_arrays

CITY_SIZE = (256, 128)  # synthetic source PNGs, W x H
SHARD_SIZE = (128, 64)  # preprocessed, W x H


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


def write_dataset(
    folder: Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray, list[str]]],
    mapping: Mapping | str = "trainid",
    shard_size: int = 4,
    compression: str = "none",
) -> Path:
    """Shards + manifest straight from arrays (images N,H,W,3; labels N,H,W), no PNGs involved."""
    mapping = get_mapping(mapping) if isinstance(mapping, str) else mapping
    return write_arrays(folder, splits, mapping, shard_size, compression)


@pytest.fixture
def make_dataset(tmp_path) -> Callable[..., Path]:
    """`make_dataset(splits, mapping=..., shard_size=...)` writes a shard folder under tmp_path."""
    counter = iter(range(1000))

    def make(splits, **kwargs) -> Path:
        return write_dataset(tmp_path / f"data{next(counter)}", splits, **kwargs)

    return make
