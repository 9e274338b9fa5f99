"""Shared fixtures: a small synthetic city, its shards, and hand-made shard folders."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.labels import Mapping, get_mapping
from pipeline.shards import write_arrays

CITY_SIZE = (128, 256)  # synthetic source PNGs, (H, W) as everywhere in the code
SHARD_SIZE = (64, 128)  # preprocessed


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


# The official downloads: archive -> (top folder, its splits), as the dataset's website has them.
OFFICIAL_ZIPS = {
    "leftImg8bit_trainvaltest.zip": ("leftImg8bit", ("train", "val", "test")),
    "leftImg8bit_trainextra.zip": ("leftImg8bit", ("train_extra",)),
    "gtFine_trainvaltest.zip": ("gtFine", ("train", "val", "test")),
    "gtCoarse.zip": ("gtCoarse", ("train", "train_extra", "val")),
}


def pack_official(tree: Path, dest: Path, *, only: tuple[str, ...] | None = None,
                  compression: int = zipfile.ZIP_DEFLATED) -> list[Path]:
    """Zip an extracted tree the way the downloads come: per archive its top folder (with the
    folder entries) plus README and license.txt. `only` picks some of the archives."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (top, splits) in OFFICIAL_ZIPS.items():
        folders = [tree / top / s for s in splits if (tree / top / s).is_dir()]
        if (only is not None and name not in only) or not folders:
            continue
        with zipfile.ZipFile(dest / name, "w", compression) as z:
            z.writestr("README", f"The Cityscapes Dataset: {top}\n")
            z.writestr("license.txt", "For tests only.\n")
            z.write(tree / top, f"{top}/")
            for folder in folders:
                for path in [folder, *sorted(folder.rglob("*"))]:
                    z.write(path, path.relative_to(tree).as_posix() + "/" * path.is_dir())
        written.append(dest / name)
    return written


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


MEAN, STD = [0.29, 0.33, 0.29], [0.19, 0.19, 0.19]


def fit_briefly(model, size: tuple[int, int] = SHARD_SIZE, steps: int = 20, seed: int = 0):
    """A few Adam steps on two synthetic frames, so that the model predicts several classes
    where they are: a random one predicts one class everywhere, and any comparison of its
    predictions would pass. Leaves the model in eval mode, its BatchNorm statistics learnt."""
    import torch
    import torch.nn.functional as F

    from pipeline.photometric import normalize
    from pipeline.synth import render_frame

    mapping = get_mapping("trainid")
    frames = [render_frame(size, np.random.default_rng([seed, i])) for i in range(2)]
    x = normalize(np.stack([f[0] for f in frames]), MEAN, STD)
    y = torch.as_tensor(np.stack([mapping.remap(f[1]) for f in frames])).long()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_checkpoint(path: Path, model, *, size: tuple[int, int] = SHARD_SIZE,
                     losstype: str = "segment") -> Path:
    """A checkpoint of `model` with everything predict and export read: trainid classes,
    palette and mapping, a mean/std, the training size (H, W)."""
    from train.checkpoint import save_checkpoint

    mapping = get_mapping("trainid")
    save_checkpoint(path, {"model": model.state_dict(), "arch": model.config,
                           "classes": mapping.classes, "categories": mapping.categories,
                           "palette": mapping.palette.tolist(), "mean": MEAN, "std": STD,
                           "losstype": losstype, "ignore_index": 255,
                           "size": [size[1], size[0]], "mapping": mapping.to_json(),
                           "epoch": 1, "step": 10})
    return path


@pytest.fixture(scope="session")
def unet_checkpoint(tmp_path_factory) -> Path:
    """A small U-Net (width 8, depth 3), briefly fitted at 128x64."""
    import torch

    from train.models.plain import UNet

    torch.manual_seed(0)
    model = fit_briefly(UNet(get_mapping("trainid").num_classes, width=8, depth=3))
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet.pt", model)
