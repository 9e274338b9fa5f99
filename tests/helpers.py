"""Builders the test modules share: data made in memory, configs, command lines, process probes.

Fixtures live in conftest.py; whatever a test module imports comes from here, so no test
module imports another (and none runs another's tests or fixtures by importing it).
"""

from __future__ import annotations

import json
import os
import socket
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.labels import Mapping, get_mapping
from pipeline.loader import dali_available
from pipeline.shards import write_arrays
from train.config import Config

REPO = Path(__file__).resolve().parents[1]
CITY_SIZE = (128, 256)  # synthetic source PNGs, (H, W) as everywhere in the code
SHARD_SIZE = (64, 128)  # preprocessed

# the loader tests' parameter: DALI where it is installed, the torch fallback always
BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                          reason="nvidia.dali not installed")),
            "torch"]


# -- shard folders and official zips ----------------------------------------------------------

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


def read_split(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A split of a shard folder back as arrays, in the manifest's order."""
    manifest = json.loads((out / "manifest.json").read_text())
    images, labels, names = [], [], []
    for entry in manifest["splits"][split]["shards"]:
        with h5py.File(out / entry["file"], "r") as f:
            images.append(f["image"][()])
            labels.append(f["label"][()])
            names += [n.decode() for n in f["name"][()]]
    return np.concatenate(images), np.concatenate(labels), names


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


# -- a Cityscapes tree of random PNGs (preprocessing) ------------------------------------------

IDS = np.array([0, 7, 8, 9, 11, 21, 23, 24, 26], np.uint8)  # 0 and 9 are ignored by trainid
SIZE = (16, 32)  # H, W
KW = dict(size=SIZE, shard_size=2, workers=1, progress=False)  # a small preprocess job


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_tree(root: Path, counts=(("train", 6), ("val", 2)), size=(32, 64), seed=0) -> Path:
    """Random pixels and random label ids per pixel: any misalignment shows."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in counts:
        for i in range(n):
            city = ("aachen", "bochum")[i % 2]
            name = f"{city}_{i:06d}_000019"
            write_png(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png",
                      rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            write_png(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png",
                      rng.choice(IDS, (h, w)))
    return root


def leftovers(out: Path) -> list[str]:
    """Anything a finished or failed job must not leave: temporaries anywhere under out."""
    return sorted(p.name for p in out.rglob(".*tmp-*"))


def assert_clean(out: Path) -> None:
    """A failed preprocess job left no manifest and no temporaries."""
    assert not (out / "manifest.json").exists()
    assert leftovers(out) == []


# -- frames whose colour is their label (the loader) -------------------------------------------

PRIMARY_SIZE = (64, 128)  # (H, W) of `primary_frames`
PRIMARIES = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


def primary_frames(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels in random 8x8 blocks of classes 0-2; images the matching primary colours."""
    h, w = PRIMARY_SIZE
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (n, h // 8, w // 8)).repeat(8, 1).repeat(8, 2).astype(np.uint8)
    return PRIMARIES[labels], labels, [f"testcity_{i:06d}_000019" for i in range(n)]


# -- training ----------------------------------------------------------------------------------

CLASSES = (0, 2, 8, 10, 13)  # road, building, vegetation, sky, car (trainid)


def blocks(n: int, h: int = 32, w: int = 48, seed: int = 0):
    """Frames of random rectangles of a few classes, each pixel its class colour plus noise.

    No ignore pixels, so every process of a multi-process run averages over equal pixel counts.
    """
    rng = np.random.default_rng(seed)
    palette = get_mapping("trainid").palette.astype(np.int16)
    labels = np.full((n, h, w), CLASSES[0], np.uint8)
    for lab in labels:
        for _ in range(6):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            lab[y:y + rng.integers(4, h // 2), x:x + rng.integers(4, w // 2)] = rng.choice(CLASSES)
    noise = rng.integers(-25, 26, (n, h, w, 3))
    images = np.clip(palette[labels] + noise, 0, 255).astype(np.uint8)
    names = [f"blocks_{i:06d}_000019" for i in range(n)]
    return images, labels, names


def tiny(data, out, **kw) -> Config:
    """A run small enough for a test: a width-8 U-Net on the CPU, no augmentation, SGD."""
    base = dict(data=str(data), out=str(out), width=8, depth=2, epochs=2, batch_size=4,
                crop=None, scale=(1.0, 1.0), flip=False, jitter=0.0, optimizer="sgd", lr=0.05,
                amp="off", workers=0, progress=False, grid_samples=2, device="cpu")
    return Config(**{**base, **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world_size: int, port: int, cfg: dict) -> None:
    """One rank of a `fit` under torch.multiprocessing.spawn, as torchrun would start it."""
    import torch

    from train.fit import fit

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the cores
    fit(Config(**cfg))


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


# -- the command line --------------------------------------------------------------------------

FIT = ["--epochs", "2", "--batch-size", "2", "--crop", "32x64", "--width", "4", "--depth", "2",
       "--amp", "off", "--optimizer", "adamw", "--lr", "1e-2", "--workers", "0", "--device",
       "cpu", "--no-progress"]


def citytrain(*args) -> object:
    from click.testing import CliRunner

    from train.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def fails(*args, code: int = 1) -> str:
    """Run a citytrain command that must fail cleanly; returns its output."""
    from click.testing import CliRunner

    from train.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result.output


# -- processes (Linux /proc) -------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie holds no memory; its new parent reaps it


# -- one row of scored pixels, shared by the metric tests on the CPU and the GPU ---------------

TRAINID = get_mapping("trainid")
ROAD, PERSON, RIDER, CAR, TRUCK = (TRAINID.classes.index(c)
                                   for c in ("road", "person", "rider", "car", "truck"))
# One row of 12 pixels: car instances A (4 px) and B (2 px), a person (2 px), a crowd of cars
# (id 26 = labelId only: no instance) and road.
INSTANCES = torch.tensor([26000] * 4 + [26001] * 2 + [24000] * 2 + [26, 26, 7, 7])
LABELS = torch.tensor([CAR] * 6 + [PERSON] * 2 + [CAR] * 2 + [ROAD] * 2)
GUESS = torch.tensor([CAR, CAR, CAR, TRUCK, ROAD, ROAD, PERSON, RIDER, CAR, CAR, CAR, ROAD])
