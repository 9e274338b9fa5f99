"""Full-resolution evaluation against the original PNGs, the official export, submissions.

The model sees each original `*_leftImg8bit.png` resized to the training shards' size with
`pipeline.preprocess.resize_image` (the very pixels the shards hold), run as the inference
settings say (train/inference.py); its outputs are upsampled bilinearly to the original size
before the argmax (smoother than upsampling class ids) and scored against the original
`*_gtFine_labelIds.png` remapped by the mapping, and `*_gtFine_instanceIds.png` for iIoU.
With `export_dir`, each prediction is also written as `{city}_{seq}_{frame}_pred.png`
holding labelIds (`mapping.export_ids`), the format cityscapesScripts' evaluator reads.
`write_submission` writes the same PNGs into a zip for the benchmark server, reading images
only.

Every rank takes a contiguous block of the sorted image list (pipeline.sampling.Plan's rule
for evaluation), so the ranks together read each image exactly once; confusion matrix and
instance statistics are then summed over ranks.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from pipeline.cityscapes import DatasetError, exists, find_images, find_pairs, sibling
from pipeline.files import tmp_path_for
from pipeline.labels import Mapping, get_mapping
from pipeline.photometric import normalize
from pipeline.pngs import read_image, read_instance_ids, read_label_ids
from pipeline.preprocess import resize_image
from pipeline.sampling import Plan
from train.inference import WHOLE, Inference, infer
from train.losses import PixelLoss, build_loss
from train.metrics import ConfusionMatrix, InstanceStats
from train.visualize import write_png


def as_mapping(mapping: Mapping | dict | str) -> Mapping:
    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(mapping, dict):
        return Mapping.from_json(mapping)
    return get_mapping(mapping)


@dataclass(frozen=True)
class Item:
    """One original image and, for a labelled split, its label and instance PNGs."""

    name: str  # {city}_{seq:06d}_{frame:06d}
    image: Path
    label: Path | None = None
    instances: Path | None = None


def lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """table[ids] for a 256-entry uint8 table and uint8 ids; PIL's point() does a 2048x1024
    image in a third of numpy's time."""
    if ids.dtype == np.uint8 and ids.ndim == 2 and table.dtype == np.uint8:
        return np.array(Image.fromarray(ids).point(table.tolist()))  # writable, for torch
    return table[ids]


def remap(mapping: Mapping, ids: np.ndarray, source: Path) -> np.ndarray:
    """mapping.remap with a fast path: mappings covering 0..max(ids) need no histogram."""
    if ids.size and mapping.covered[: int(ids.max()) + 1].all():
        return lookup(mapping.lut, ids)
    return mapping.remap(ids, source=source)  # raises, naming the uncovered ids and the file


def list_items(datadir: Path, split: str, *, labels: bool = True) -> list[Item]:
    """The images of `split` sorted by name; with `labels`, paired with their labels.

    Instance PNGs are used when every label has one and left out when none has; a tree where
    only some have them is an error (a half-copied tree would skew the iIoU unnoticed).
    """
    if not labels:
        return [Item(name, path) for name, path in find_images(Path(datadir), split)]
    pairs = find_pairs(Path(datadir), split)
    inst = [sibling(p.label, "instanceIds.png") for p in pairs]
    have = [exists(p) for p in inst]
    if any(have) and not all(have):
        raise DatasetError(
            f"{inst[have.index(False)]}: no such file, while {sum(have)} of the {len(pairs)} "
            f"{split} labels have their instanceIds PNG; iIoU needs all of them (or none, "
            "and is then left out)")
    return [Item(p.name, p.image, p.label, i if all(have) else None)
            for p, i in zip(pairs, inst)]


def rank_share(items: list, rank: int, world_size: int) -> list:
    """This rank's contiguous block: the ranks together hold every item exactly once."""
    return [items[i] for i in Plan(len(items), 1, False, rank, world_size).order(0)]


def _prefetch(fn: Callable, items: Iterable, depth: int = 2) -> Iterator:
    """fn(item) for each item, decoded in a thread `depth` items ahead of the model."""
    with ThreadPoolExecutor(1) as pool:
        it = iter(items)
        pending = deque(pool.submit(fn, x) for _, x in zip(range(depth), it))
        while pending:
            done = pending.popleft()
            for x in it:
                pending.append(pool.submit(fn, x))
                break
            yield done.result()


class _Run:
    """Everything needed to turn an original image into class ids at its own size."""

    def __init__(self, model, *, mapping: Mapping, mean, std, size: tuple[int, int],
                 loss: PixelLoss | None, device, amp: str, inference: Inference) -> None:
        self.model, self.mapping, self.mean, self.std = model, mapping, mean, std
        self.size, self.amp, self.inference = tuple(size), amp, inference
        # a model of --losstype segment unless told: its classes are the argmax
        self.loss = loss or build_loss("segment", palette=mapping.palette)
        self.device = torch.device(device)

    def load(self, item: Item):
        """(item, image at the model's size, full size (H, W), class ids | None, instances)."""
        image = read_image(item.image)
        h, w = image.shape[:2]
        target = instances = None
        if item.label is not None:
            ids = read_label_ids(item.label)
            if ids.shape != (h, w):
                raise DatasetError(f"{item.image} is {w}x{h} but its label {item.label} is "
                                   f"{ids.shape[1]}x{ids.shape[0]}")
            target = remap(self.mapping, ids, item.label)
        if item.instances is not None:
            instances = read_instance_ids(item.instances)
            if instances.shape != (h, w):
                raise DatasetError(f"{item.instances} is {instances.shape[1]}x"
                                   f"{instances.shape[0]}, its image {item.image} {w}x{h}")
        return item, resize_image(image, self.size), (h, w), target, instances

    def predict(self, image: np.ndarray, full: tuple[int, int]) -> torch.Tensor:
        """Class ids (H, W) on the device, at size `full`: uint8 (a fraction of the memory
        traffic of int64 in the scoring that follows) unless there are over 255 classes."""
        x = normalize(image, self.mean, self.std, self.device)
        s = self.inference
        out = infer(self.model, x, mode=s.mode, window=s.window, stride=s.stride,
                    scales=s.scales, flip=s.flip, max_windows=s.max_windows, amp=self.amp,
                    out_size=full)
        pred = self.loss.predict(out)[0]
        return pred.to(torch.uint8) if self.mapping.num_classes < 256 else pred

    def label_png(self, pred: torch.Tensor) -> np.ndarray:
        return lookup(self.mapping.export_ids, pred.to(torch.uint8).cpu().numpy())


def _sum_over_ranks(n: int, device) -> int:
    t = torch.tensor([n], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return int(t.item())


@torch.inference_mode()
def evaluate_full_resolution(
    model: torch.nn.Module,
    datadir: Path,
    split: str,
    *,
    mapping: Mapping | dict | str,
    mean,
    std,
    size: tuple[int, int],
    loss: PixelLoss | None = None,
    device: str | torch.device = "cpu",
    amp: str = "off",
    inference: Inference = WHOLE,
    export_dir: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Score `split` of the Cityscapes tree `datadir` at the originals' resolution.

    `size` is (H, W) of the training shards, the scale the model sees; `loss` the model's
    (its `predict` reads the outputs; None: a --losstype segment model). Returns
    ConfusionMatrix.compute's dict (iIoU included when the instance PNGs are there) plus
    "images", over all ranks; rank r scores its block of the images (see `rank_share`).
    """
    mapping = as_mapping(mapping)
    items = list_items(datadir, split)
    run = _Run(model, mapping=mapping, mean=mean, std=std, size=size, loss=loss,
               device=device, amp=amp, inference=inference)
    cm = ConfusionMatrix(mapping.num_classes, device=device)
    stats = InstanceStats(mapping, device=device) if items[0].instances is not None else None
    mine = rank_share(items, rank, world_size)
    was_training = model.training
    model.eval()
    try:
        for item, image, full, target, instances in _prefetch(run.load, mine):
            pred = run.predict(image, full)
            cm.update(pred, torch.from_numpy(target))
            if stats is not None:
                stats.update(pred, instances)
            if export_dir is not None:
                write_png(Path(export_dir) / f"{item.name}_pred.png", run.label_png(pred))
    finally:
        model.train(was_training)
    cm.all_reduce()
    if stats is not None:
        stats.all_reduce()
    images = _sum_over_ranks(len(mine), device)
    return {**cm.compute(mapping.classes, mapping.categories, stats), "images": images}


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _gather_to_first(local: list, device) -> list | None:
    """Rank 0 gets every rank's list, in rank order; the others get None."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    return None if parts is None else [x for part in parts for x in part]


@torch.inference_mode()
def write_submission(
    model: torch.nn.Module,
    datadir: Path,
    split: str,
    zip_path: Path,
    *,
    mapping: Mapping | dict | str,
    mean,
    std,
    size: tuple[int, int],
    loss: PixelLoss | None = None,
    device: str | torch.device = "cpu",
    amp: str = "off",
    inference: Inference = WHOLE,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Predict every image of `split` and zip `{city}_{seq}_{frame}_pred.png` labelId PNGs at
    the originals' size into `zip_path`, as the benchmark server pairs them with its ground
    truth (cityscapesScripts' `{city}_{seq}_{frame}*.png` rule). Reads no label.

    Each rank predicts its block; rank 0 receives the PNGs and writes the zip under a
    temporary name, renamed when complete: an error anywhere leaves no zip. Returns the
    number of images.
    """
    mapping = as_mapping(mapping)
    items = list_items(datadir, split, labels=False)
    run = _Run(model, mapping=mapping, mean=mean, std=std, size=size, loss=loss,
               device=device, amp=amp, inference=inference)
    pngs = []
    was_training = model.training
    model.eval()
    try:
        for item, image, full, _, _ in _prefetch(run.load, rank_share(items, rank, world_size)):
            pngs.append((f"{item.name}_pred.png", _png_bytes(run.label_png(run.predict(image,
                                                                                     full)))))
    finally:
        model.train(was_training)
    everything = _gather_to_first(pngs, device)
    if everything is not None:
        zip_path = Path(zip_path)
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path_for(zip_path)
        try:
            # PNGs are compressed already: stored, not deflated
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
                for name, data in sorted(everything):
                    z.writestr(name, data)
            os.replace(tmp, zip_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return len(items)


@torch.inference_mode()
def score_predictions(datadir: Path, predictions: Path, split: str, *,
                      mapping: Mapping | dict | str = "trainid",
                      device: str | torch.device = "cpu") -> dict:
    """Score labelId PNGs `{name}*.png` in `predictions` (e.g. an --export-official folder)
    against `split` of `datadir`, as cityscapesScripts' evaluator does with the same files.

    Every predicted labelId must be one of the mapping's classes (what our export writes).
    """
    mapping = as_mapping(mapping)
    items = list_items(datadir, split)
    found = {}
    for path in sorted(Path(predictions).rglob("*.png")):
        m = re.match(r"(.+?_\d{6}_\d{6})", path.name)  # cityscapesScripts' pairing rule
        if m:
            found.setdefault(m[1], []).append(path)
    cm = ConfusionMatrix(mapping.num_classes, device=device)
    stats = InstanceStats(mapping, device=device) if items[0].instances is not None else None

    def load(item: Item):
        paths = found.get(item.name, [])
        if len(paths) != 1:
            raise DatasetError(f"{predictions}: {len(paths) or 'no'} predictions "
                               f"{item.name}*.png for {item.label}")
        ids = read_label_ids(paths[0])
        pred = lookup(mapping.lut, ids)
        if int(pred.max()) >= mapping.num_classes:
            bad = sorted(set(np.unique(ids[pred >= mapping.num_classes]).tolist()))
            raise DatasetError(f"{paths[0]}: labelIds {bad} are none of mapping "
                               f"{mapping.name!r}'s classes")
        target = remap(mapping, read_label_ids(item.label), item.label)
        if ids.shape != target.shape:
            raise DatasetError(f"{paths[0]} is {ids.shape[1]}x{ids.shape[0]}, its label "
                               f"{item.label} {target.shape[1]}x{target.shape[0]}")
        inst = None if item.instances is None else read_instance_ids(item.instances)
        return pred, target, inst

    for pred, target, inst in _prefetch(load, items):
        pred = torch.from_numpy(pred).to(device)
        cm.update(pred, torch.from_numpy(target))
        if stats is not None:
            stats.update(pred, inst)
    return {**cm.compute(mapping.classes, mapping.categories, stats), "images": len(items)}
