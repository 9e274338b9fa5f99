"""Full-resolution evaluation and the official export, checked by cityscapesScripts' evaluator:
all four scores (class and category IoU and iIoU) on a hand-made scene and the synthetic city."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.cityscapes import DatasetError
from pipeline.labels import LABEL_BY_NAME, MappingError, get_mapping
from pipeline.photometric import normalize
from pipeline.shards import load_manifest, open_shard, split_shards
from pipeline.sizes import from_wh, wh
from train.evaluation.full_resolution import evaluate_full_resolution, score_predictions

MAPPING = get_mapping("trainid")
PALETTE = MAPPING.palette
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
FULL = (32, 64)  # originals, (H, W)
SHARD = (16, 32)
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


def scene(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labelIds, instanceIds, image) at full size. The image paints each pixel in its class's
    colour, except where the scene makes the model wrong: a car painted as a truck, 1-pixel
    poles that vanish at shard size, and ignored areas (unlabeled, ego vehicle) painted black.
    Each scene has one car instance; scene 0 also a crowd of cars (instanceId 26: no
    instance) and scene 2 a second, smaller car."""
    h, w = FULL
    ids = np.full((h, w), _id("building"), np.uint8)
    ids[: h // 4] = _id("sky")
    ids[h // 2:] = _id("road")
    ids[h // 2:, : w // 4] = _id("sidewalk")
    ids[h // 2 - 4: h // 2 + 4, 20 + 8 * i: 36 + 8 * i] = _id("car")
    ids[h // 4:, 5 + 3 * i] = _id("pole")
    ids[-3:] = _id("ego vehicle")
    ids[h // 4: h // 4 + 2, 40:] = _id("unlabeled")
    inst = ids.astype(np.uint16)
    inst[ids == _id("car")] = 26000 + i
    if i == 0:
        ids[h // 2 + 6: h // 2 + 10, 44:60] = inst[h // 2 + 6: h // 2 + 10, 44:60] = _id("car")
    if i == 2:
        ids[h // 2 + 8: h // 2 + 12, 48:54] = _id("car")
        inst[h // 2 + 8: h // 2 + 12, 48:54] = 26001
    image = PALETTE[MAPPING.lut[ids] % 255].copy()
    image[MAPPING.lut[ids] == 255] = 0
    if i == 1:  # this car looks like a truck
        image[ids == _id("car")] = PALETTE[MAPPING.classes.index("truck")]
    return ids, inst, image


@pytest.fixture
def tree(tmp_path, make_dataset):
    """A Cityscapes-layout val split at 64x32 and its shards at 32x16 (2 shards)."""
    datadir = tmp_path / "cityscapes"
    images, labels = [], []
    for i, name in enumerate(NAMES):
        ids, inst, image = scene(i)
        city = name.split("_")[0]
        for kind, sub, arr in [("leftImg8bit", "leftImg8bit", image),
                               ("gtFine_labelIds", "gtFine", ids),
                               ("gtFine_instanceIds", "gtFine", inst)]:
            folder = datadir / sub / "val" / city
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(folder / f"{name}_{kind}.png")
        images.append(np.asarray(Image.fromarray(image).resize(wh(SHARD), Image.BILINEAR)))
        labels.append(np.asarray(Image.fromarray(MAPPING.remap(ids)).resize(wh(SHARD),
                                                                          Image.NEAREST)))
    data = make_dataset({"val": (np.stack(images), np.stack(labels), NAMES)}, shard_size=2)
    return datadir, data


@pytest.fixture
def official(monkeypatch):
    """cityscapesScripts' pixel-level evaluator, quiet, no JSON file, with instance scores."""
    # It still calls np.in1d, which numpy 2.4 removed.
    monkeypatch.setattr(np, "in1d", lambda a, b, *args, **kw: np.isin(a, b, *args, **kw),
                        raising=False)
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    settings = {"evalInstLevelScore": True, "evalPixelAccuracy": False, "JSONOutput": False,
                "quiet": True, "predictionPath": None, "predictionWalk": None}
    for key, value in settings.items():
        monkeypatch.setattr(ev.args, key, value)

    def evaluate(gt_root, pred_dir) -> dict:
        ev.args.predictionPath = str(pred_dir)
        gts = sorted(str(p) for p in gt_root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
        preds = [ev.getPrediction(ev.args, g) for g in gts]
        return ev.evaluateImgLists(preds, gts, ev.args)

    return evaluate


def _run(datadir, model=None, **kw):
    return evaluate_full_resolution(model or PaletteModel(), datadir, "val", mapping=MAPPING,
                                    mean=MEAN, std=STD, size=SHARD,
                                    device="cpu", amp="off", **kw)


def _same(ours: float | None, theirs: float, tol: float = 1e-6) -> bool:
    return math.isnan(theirs) if ours is None else abs(ours - theirs) < tol


def agrees(ours: dict, theirs: dict) -> None:
    """All four scores and every number behind them, within 1e-6."""
    pairs = [("miou", "averageScoreClasses"), ("iiou", "averageScoreInstClasses"),
             ("category_miou", "averageScoreCategories"),
             ("category_iiou", "averageScoreInstCategories")]
    for key, their_key in pairs:
        assert _same(ours[key], theirs[their_key]), key
    for ours_key, their_key in [("iou", "classScores"), ("instance_iou", "classInstScores"),
                                ("category_iou", "categoryScores"),
                                ("category_instance_iou", "categoryInstScores")]:
        for name, value in ours[ours_key].items():
            assert _same(value, theirs[their_key][name]), (ours_key, name)
    # ours leaves out what theirs reports as NaN: classes without instances, void
    for name, value in theirs["classInstScores"].items():
        if not math.isnan(value):
            assert name in ours["instance_iou"], name


def test_export_agrees_with_official_evaluator(tree, official, tmp_path):
    datadir, _ = tree
    export = tmp_path / "export"
    result = _run(datadir, export_dir=export)

    assert result["images"] == 3
    written = sorted(p.name for p in export.iterdir())
    assert written == [f"{n}_pred.png" for n in NAMES]
    for p in export.iterdir():
        pred = np.asarray(Image.open(p))
        assert pred.shape == FULL and pred.dtype == np.uint8  # labelIds at full size
        assert set(np.unique(pred)) <= set(MAPPING.export_ids[: MAPPING.num_classes].tolist())

    theirs = official(datadir, export)
    agrees(result, theirs)
    # The scene makes the comparison meaningful: right, wrong and absent classes all occur.
    assert result["iou"]["sky"] > 0.8
    assert result["iou"]["truck"] == 0.0  # predicted, never true
    assert result["iou"]["pole"] < 0.5  # too thin to survive the shard size
    assert result["iou"]["person"] is None
    assert 0.2 < result["miou"] < 0.9
    # the car taken for a truck costs the car's iIoU a third of its weight; a vehicle still
    assert 0.3 < result["instance_iou"]["car"] < 0.8
    assert result["category_instance_iou"]["vehicle"] > result["instance_iou"]["car"]
    assert result["instance_iou"]["person"] is None and result["iiou"] is not None
    # and our scorer of exported PNGs reads them back to the same numbers
    again = score_predictions(datadir, export, "val")
    for key in ("miou", "iiou", "category_miou", "category_iiou", "confusion"):
        assert again[key] == result[key], key


def test_the_model_sees_the_pixels_of_the_shards(city, shards):
    # the originals, resized as cityprep resized them: the model sees what it trained on
    manifest = load_manifest(shards)
    seen = []
    model = PaletteModel()
    model.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    evaluate_full_resolution(model, city, "val", mapping=manifest["config"]["mapping_def"],
                             mean=MEAN, std=STD, size=from_wh(manifest["config"]["size"]))
    shard_images = []
    for path, _ in split_shards(shards, manifest, "val"):
        with open_shard(path) as f:
            shard_images += list(f["image"][()])
    assert len(seen) == len(shard_images) == 4
    for x, image in zip(seen, shard_images):
        assert torch.equal(x, normalize(image, MEAN, STD, "cpu"))


def test_export_reads_the_originals_out_of_the_official_zips(tree, tmp_path):
    from helpers import pack_official

    datadir, _ = tree
    zips = tmp_path / "downloads"
    pack_official(datadir, zips)
    from_zips = _run(zips, export_dir=tmp_path / "a")
    assert from_zips["images"] == 3 and from_zips["iiou"] is not None  # instanceIds read too
    assert from_zips == _run(datadir, export_dir=tmp_path / "b")
    assert [p.read_bytes() for p in sorted((tmp_path / "a").iterdir())] == [
        p.read_bytes() for p in sorted((tmp_path / "b").iterdir())]


def test_evaluation_without_export_writes_nothing(tree, tmp_path):
    datadir, _ = tree
    before = set(tmp_path.rglob("*"))
    result = _run(datadir)
    assert result["images"] == 3 and set(tmp_path.rglob("*")) == before


def test_bad_originals_name_the_file(tree):
    datadir, _ = tree
    label = datadir / "gtFine" / "val" / "bonn" / f"{NAMES[2]}_gtFine_labelIds.png"
    ids = np.asarray(Image.open(label)).copy()
    Image.fromarray(ids[:, :-1]).save(label)
    with pytest.raises(DatasetError, match=f"is 64x32 but its label {label} is 63x32"):
        _run(datadir)
    ids[0, 0] = 200  # a labelId the mapping does not know
    Image.fromarray(ids).save(label)
    with pytest.raises(MappingError, match=f"{label}.*200"):
        _run(datadir)
    instances = datadir / "gtFine" / "val" / "bonn" / f"{NAMES[2]}_gtFine_instanceIds.png"
    instances.unlink()
    with pytest.raises(DatasetError, match=f"{instances}: no such file, while 2 of the 3"):
        _run(datadir)


def test_without_instance_pngs_there_is_no_iiou(tree):
    datadir, _ = tree
    for p in datadir.rglob("*_instanceIds.png"):
        p.unlink()
    result = _run(datadir)
    assert result["iiou"] is None and result["category_iiou"] is None
    assert result["instance_iou"] == {} and result["miou"] is not None


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
    # scored by us and by the official evaluator on the gtFine labelIds and instanceIds. The
    # shard-resolution truth, upsampled, must score high: a sample paired with another's
    # label would not.
    manifest = load_manifest(shards)
    labels = []
    for path, _ in split_shards(shards, manifest, "val"):
        with open_shard(path) as f:
            labels += list(f["label"][()])
    export = tmp_path / "export"
    result = evaluate_full_resolution(ShardOracle(labels), city, "val", export_dir=export,
                                      mapping=manifest["config"]["mapping_def"],
                                      mean=manifest["mean"], std=manifest["std"],
                                      size=from_wh(manifest["config"]["size"]))
    theirs = official(city, export)
    assert result["images"] == manifest["splits"]["val"]["samples"] == len(list(export.iterdir()))
    agrees(result, theirs)
    assert 0.5 < result["miou"] < 1.0 and result["pixel_acc"] > 0.9
    # instances lose their edges to the shard size: small ones most, which iIoU weighs up
    assert 0.3 < result["iiou"] < 1.0 and len(result["instance_iou"]) == 8
    assert result["category_iiou"] is not None
