"""Full-resolution evaluation and the official export, checked by cityscapesScripts' evaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.labels import LABEL_BY_NAME, MappingError, get_mapping
from train.export import evaluate_full_resolution
from train.predict import InputError

MAPPING = get_mapping("trainid")
PALETTE = MAPPING.palette
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
FULL = (64, 32)  # originals, W x H
SHARD = (32, 16)
NAMES = ["aachen_000000_000019", "aachen_000001_000019", "bonn_000000_000019"]


class PaletteModel(nn.Module):
    """A 'model' with a known answer: each pixel is the class whose palette colour it has."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("colors", torch.as_tensor(PALETTE, dtype=torch.float32) / 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        return -100 * (rgb[:, None] - self.colors[None, :, :, None, None]).square().sum(2)


def _id(name: str) -> int:
    return LABEL_BY_NAME[name].id


def scene(i: int) -> tuple[np.ndarray, np.ndarray]:
    """(labelIds, image) at full size. The image paints each pixel in its class's colour, except
    where the scene makes the model wrong: a car painted as a truck, 1-pixel poles that vanish
    at shard size, and ignored areas (unlabeled, ego vehicle) painted black."""
    w, h = FULL
    ids = np.full((h, w), _id("building"), np.uint8)
    ids[: h // 4] = _id("sky")
    ids[h // 2:] = _id("road")
    ids[h // 2:, : w // 4] = _id("sidewalk")
    ids[h // 2 - 4: h // 2 + 4, 20 + 8 * i: 36 + 8 * i] = _id("car")
    ids[h // 4:, 5 + 3 * i] = _id("pole")
    ids[-3:] = _id("ego vehicle")
    ids[h // 4: h // 4 + 2, 40:] = _id("unlabeled")
    image = PALETTE[MAPPING.lut[ids] % 255].copy()
    image[MAPPING.lut[ids] == 255] = 0
    if i == 1:  # this car looks like a truck
        image[ids == _id("car")] = PALETTE[MAPPING.classes.index("truck")]
    return ids, image


@pytest.fixture
def tree(tmp_path, make_dataset):
    """A Cityscapes-layout val split at 64x32 and its shards at 32x16 (2 shards)."""
    datadir = tmp_path / "cityscapes"
    images, labels = [], []
    for i, name in enumerate(NAMES):
        ids, image = scene(i)
        city = name.split("_")[0]
        for kind, sub, arr in [("leftImg8bit", "leftImg8bit", image),
                               ("gtFine_labelIds", "gtFine", ids)]:
            folder = datadir / sub / "val" / city
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(folder / f"{name}_{kind}.png")
        images.append(np.asarray(Image.fromarray(image).resize(SHARD, Image.BILINEAR)))
        labels.append(np.asarray(Image.fromarray(MAPPING.remap(ids)).resize(SHARD,
                                                                          Image.NEAREST)))
    data = make_dataset({"val": (np.stack(images), np.stack(labels), NAMES)}, shard_size=2)
    return datadir, data


@pytest.fixture
def official(monkeypatch):
    """cityscapesScripts' pixel-level evaluator, quiet, no JSON file, no instance scores."""
    # It still calls np.in1d, which numpy 2.4 removed.
    monkeypatch.setattr(np, "in1d", lambda a, b, *args, **kw: np.isin(a, b, *args, **kw),
                        raising=False)
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    settings = {"evalInstLevelScore": False, "evalPixelAccuracy": False, "JSONOutput": False,
                "quiet": True, "predictionPath": None, "predictionWalk": None}
    for key, value in settings.items():
        monkeypatch.setattr(ev.args, key, value)

    def evaluate(gt_root, pred_dir) -> dict:
        ev.args.predictionPath = str(pred_dir)
        gts = sorted(str(p) for p in gt_root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
        preds = [ev.getPrediction(ev.args, g) for g in gts]
        return ev.evaluateImgLists(preds, gts, ev.args)

    return evaluate


def _run(data, datadir, **kw):
    return evaluate_full_resolution(PaletteModel(), data, "val", datadir, mapping=MAPPING,
                                    mean=MEAN, std=STD, losstype="segment", device="cpu",
                                    amp="off", **kw)


def _same(ours: float | None, theirs: float) -> bool:
    return math.isnan(theirs) if ours is None else abs(ours - theirs) < 0.005


def test_export_agrees_with_official_evaluator(tree, official, tmp_path):
    datadir, data = tree
    export = tmp_path / "export"
    result = _run(data, datadir, export_dir=export, batch_size=2)

    assert result["images"] == 3
    written = sorted(p.name for p in export.iterdir())
    assert written == [f"{n}_pred.png" for n in NAMES]
    for p in export.iterdir():
        pred = np.asarray(Image.open(p))
        assert pred.shape == FULL[::-1] and pred.dtype == np.uint8  # labelIds at full size
        assert set(np.unique(pred)) <= set(MAPPING.export_ids[: MAPPING.num_classes].tolist())

    theirs = official(datadir, export)
    assert abs(result["miou"] - theirs["averageScoreClasses"]) < 0.005
    for name, iou in result["iou"].items():
        assert _same(iou, theirs["classScores"][name]), name
    for cat, iou in result["category_iou"].items():
        assert _same(iou, theirs["categoryScores"][cat]), cat
    # The scene makes the comparison meaningful: right, wrong and absent classes all occur.
    assert result["iou"]["sky"] > 0.8
    assert result["iou"]["truck"] == 0.0  # predicted, never true
    assert result["iou"]["pole"] < 0.5  # too thin to survive the shard size
    assert result["iou"]["person"] is None
    assert 0.2 < result["miou"] < 0.9


def test_export_reads_the_originals_out_of_the_official_zips(tree, tmp_path):
    from conftest import pack_official

    datadir, data = tree
    zips = tmp_path / "downloads"
    pack_official(datadir, zips)
    from_zips = _run(data, zips, export_dir=tmp_path / "a")
    assert from_zips == _run(data, datadir, export_dir=tmp_path / "b")
    assert [p.read_bytes() for p in sorted((tmp_path / "a").iterdir())] == [
        p.read_bytes() for p in sorted((tmp_path / "b").iterdir())]


def test_evaluation_without_export_writes_nothing(tree, tmp_path):
    datadir, data = tree
    before = set(tmp_path.rglob("*"))
    result = _run(data, datadir)
    assert result["images"] == 3 and set(tmp_path.rglob("*")) == before


def test_originals_that_do_not_match_the_shards(tree, tmp_path):
    datadir, data = tree
    label = datadir / "gtFine" / "val" / "bonn" / f"{NAMES[2]}_gtFine_labelIds.png"
    ids = np.asarray(Image.open(label)).copy()
    ids[0, 0] = 200  # a labelId the mapping does not know
    Image.fromarray(ids).save(label)
    with pytest.raises(MappingError, match=f"{label}.*200"):
        _run(data, datadir)
    for kind in ("leftImg8bit", "gtFine"):
        for p in (datadir / kind / "val" / "bonn").iterdir():
            p.unlink()
    with pytest.raises(InputError, match="no original image/label for 1 of the 3 val samples"):
        _run(data, datadir)


class ShardOracle(nn.Module):
    """Answers with each shard sample's own label, in the order the evaluation reads them."""

    def __init__(self, labels: list[np.ndarray]) -> None:
        super().__init__()
        self.labels = labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = torch.as_tensor(np.stack(self.labels[: len(x)])).long()
        del self.labels[: len(x)]
        label[label == 255] = 0
        return torch.nn.functional.one_hot(label, MAPPING.num_classes).permute(0, 3, 1, 2).float()


def test_synthetic_city_agrees_with_official_evaluator(city, shards, official, tmp_path):
    # The real path end to end: synthetic PNGs -> cityprep's shards -> full-resolution export,
    # scored by us and by the official evaluator on the gtFine labelIds. The shard-resolution
    # truth, upsampled, must score high: a sample paired with another's label would not.
    from pipeline.shards import load_manifest, open_shard, split_shards

    manifest = load_manifest(shards)
    labels = []
    for path, _ in split_shards(shards, manifest, "val"):
        with open_shard(path) as f:
            labels += list(f["label"][()])
    export = tmp_path / "export"
    result = evaluate_full_resolution(ShardOracle(labels), shards, "val", city,
                                      export_dir=export,
                                      mapping=manifest["config"]["mapping_def"],
                                      mean=manifest["mean"], std=manifest["std"])
    theirs = official(city, export)
    assert result["images"] == manifest["splits"]["val"]["samples"] == len(list(export.iterdir()))
    assert abs(result["miou"] - theirs["averageScoreClasses"]) < 0.005
    for name, iou in result["iou"].items():
        assert _same(iou, theirs["classScores"][name]), name
    assert 0.5 < result["miou"] < 1.0 and result["pixel_acc"] > 0.9
