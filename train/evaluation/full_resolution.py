"""Scoring at the originals' resolution: the model against the original PNGs, and PNGs
predicted elsewhere against the same ground truth.

The model sees each original `*_leftImg8bit.png` resized to the training shards' size with
`pipeline.preprocess.resize_image` (the very pixels the shards hold), run as the inference
settings say (`train/evaluation/inference.py`); its outputs are upsampled bilinearly to the
original size before the argmax (smoother than upsampling class ids) and scored against the
original `*_gtFine_labelIds.png` remapped by the mapping, and `*_gtFine_instanceIds.png` for
iIoU. With `export_dir`, each prediction is also written as `{city}_{seq}_{frame}_pred.png`
holding labelIds (`mapping.export_ids`), the format cityscapesScripts' evaluator reads.

Every rank takes a contiguous block of the sorted image list (pipeline.sampling.Plan's rule
for evaluation), so the ranks together read each image exactly once; the accumulators
(`loop.py`) are then summed over ranks.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.cityscapes import DatasetError, exists, find_images, find_pairs, sibling
from pipeline.labels import Mapping, get_mapping
from pipeline.photometric import normalize
from pipeline.pngs import read_image, read_instance_ids, read_label_ids
from pipeline.preprocess import resize_image
from pipeline.sampling import Plan
from train.evaluation.inference import WHOLE, Inference, infer
from train.evaluation.loop import Images, Scored, accumulate
from train.evaluation.metrics import ConfusionMatrix, InstanceStats
from train.losses import PixelLoss, build_loss
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


class Run:
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

    def scored(self, items: list[Item]) -> Iterator[Scored]:
        """Each item predicted at its own size, the next ones decoding meanwhile."""
        for item, image, full, target, instances in _prefetch(self.load, items):
            yield Scored(self.predict(image, full),
                         None if target is None else torch.from_numpy(target),
                         instances=instances, name=item.name)

    def accumulate(self, items: list[Item], accumulators: list, *, rank: int,
                   world_size: int) -> None:
        """This rank's block of `items` predicted and past `accumulators` (then summed over
        the ranks), the model in eval mode meanwhile."""
        was_training = self.model.training
        self.model.eval()
        try:
            accumulate(self.scored(rank_share(items, rank, world_size)), accumulators)
        finally:
            self.model.train(was_training)

    def label_png(self, pred: torch.Tensor) -> np.ndarray:
        return lookup(self.mapping.export_ids, pred.to(torch.uint8).cpu().numpy())


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
    run = Run(model, mapping=mapping, mean=mean, std=std, size=size, loss=loss,
              device=device, amp=amp, inference=inference)
    cm = ConfusionMatrix(mapping.num_classes, device=device)
    stats = InstanceStats(mapping, device=device) if items[0].instances is not None else None
    images = Images(device)
    export = None if export_dir is None else ExportPNGs(Path(export_dir), run)
    run.accumulate(items, [a for a in (cm, stats, images, export) if a is not None],
                   rank=rank, world_size=world_size)
    return {**cm.compute(mapping.classes, mapping.categories, stats), "images": images.n}


class ExportPNGs:
    """Each prediction as `{name}_pred.png` of labelIds in `folder` (`--export-official`)."""

    def __init__(self, folder: Path, run: Run) -> None:
        self.folder, self.run = folder, run

    def add(self, scored: Scored) -> None:
        write_png(self.folder / f"{scored.name}_pred.png", self.run.label_png(scored.pred))

    def all_reduce(self) -> None:
        pass  # each rank writes its own images


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

    def scored(pred, target, inst) -> Scored:
        return Scored(torch.from_numpy(pred).to(device), torch.from_numpy(target),
                      instances=inst)

    # one process reads every prediction: nothing to sum over ranks
    accumulate((scored(*x) for x in _prefetch(load, items)),
               [a for a in (cm, stats) if a is not None], over_ranks=False)
    return {**cm.compute(mapping.classes, mapping.categories, stats), "images": len(items)}
