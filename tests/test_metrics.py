"""ConfusionMatrix and InstanceStats against hand computations, summed across two gloo
processes. (Agreement with cityscapesScripts' evaluator itself: tests/test_export.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import GUESS, INSTANCES, LABELS, TRAINID

from pipeline.labels import get_mapping
from train.evaluation import metrics, scores
from train.evaluation.metrics import AVERAGE_INSTANCE_SIZE, ConfusionMatrix, InstanceStats
from train.evaluation.results import metrics_text, scores_text

CLASSES = ["a", "b", "c", "d"]
CATEGORIES = ["x", "x", "y", "z"]
# Pixels labelled 255 are ignored even where the prediction says 0 or 3: class d then
# appears nowhere that counts.
TARGET = torch.tensor([[0, 0, 0, 1], [1, 2, 255, 255]])
PRED = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 3]])
# rows = ground truth, columns = prediction, by hand from the pixels above
MATRIX = [[2, 1, 0, 0],
          [0, 1, 1, 0],
          [0, 0, 1, 0],
          [0, 0, 0, 0]]


def test_matrix_and_scores_match_hand_computation():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    assert cm.mat.dtype == torch.int64
    assert cm.mat.tolist() == MATRIX
    r = cm.compute(CLASSES, CATEGORIES)
    assert list(r) == ["miou", "iiou", "category_miou", "category_iiou", "iou", "instance_iou",
                       "category_iou", "category_instance_iou", "pixel_acc", "confusion"]
    assert r["confusion"] == MATRIX
    assert r["iiou"] is None and r["instance_iou"] == {}  # no instance statistics given
    # IoU = TP / (row + column - TP)
    assert r["iou"]["a"] == pytest.approx(2 / (3 + 2 - 2))
    assert r["iou"]["b"] == pytest.approx(1 / (2 + 2 - 1))
    assert r["iou"]["c"] == pytest.approx(1 / (1 + 2 - 1))
    assert r["iou"]["d"] is None  # absent from ground truth and (counted) prediction
    assert r["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)  # d left out of the mean
    assert r["pixel_acc"] == pytest.approx(4 / 6)
    # category x merges a and b: TP 4, rows 5, columns 4
    assert r["category_iou"] == pytest.approx({"x": 4 / (5 + 4 - 4), "y": 1 / 2, "z": None})
    assert list(r["category_iou"]) == ["x", "y", "z"]
    assert r["category_miou"] == pytest.approx((4 / 5 + 1 / 2) / 2)


def frequency_weighted_iou(t: scores.Tally) -> float | None:
    """docs/design.md's example of a new score, word for word."""
    rows = t.mat.sum(1)  # ground-truth pixels per class
    present = [(float(r), v) for r, v in zip(rows, t.iou.values()) if v is not None]
    total = sum(r for r, _ in present)
    return sum(r * v for r, v in present) / total if total else None


def test_a_score_added_to_the_table_is_computed_listed_and_said(monkeypatch):
    """The table is the extension point: one function, and compute, metrics.json's head and
    the summary line take it up with no other change."""
    monkeypatch.setattr(scores, "SCORES", list(scores.SCORES))  # restored after the test
    scores.score("fwiou", "fwIoU")(frequency_weighted_iou)
    with pytest.raises(ValueError, match="'fwiou' is already in the table"):
        scores.score("fwiou")(frequency_weighted_iou)
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    r = cm.compute(CLASSES, CATEGORIES)
    assert list(r)[-2:] == ["confusion", "fwiou"]
    assert r["fwiou"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 3 + 1 * 1 / 2) / 6)  # rows 3, 2, 1
    metrics = {"split": "val", "resolution": "shard", "images": 1, **r}
    keys = list(json.loads(metrics_text(metrics)))
    assert keys[:9] == ["split", "resolution", "images", "miou", "iiou", "category_miou",
                        "category_iiou", "pixel_acc", "fwiou"]
    assert scores_text(metrics).endswith(f"pixel acc 0.6667, fwIoU {r['fwiou']:.4f}")


def test_predicted_but_absent_class_scores_zero_not_none():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2, 2]), torch.tensor([0, 0, 0]))
    r = cm.compute(["a", "b", "c"])
    assert r["iou"] == {"a": pytest.approx(1 / 3), "b": None, "c": 0.0}
    assert r["miou"] == pytest.approx((1 / 3 + 0.0) / 2)
    assert r["category_iou"] == {}


def test_updates_accumulate_and_reset():
    cm = ConfusionMatrix(4)
    cm.update(PRED[:1], TARGET[:1])
    cm.update(PRED[1:], TARGET[1:])
    assert cm.mat.tolist() == MATRIX
    cm.reset()
    assert cm.mat.sum() == 0
    r = cm.compute(CLASSES)
    assert r["miou"] is None and r["pixel_acc"] is None


def test_bad_inputs():
    cm = ConfusionMatrix(4)
    with pytest.raises(ValueError, match="shape"):
        cm.update(PRED, TARGET[:1])
    with pytest.raises(ValueError, match="class names"):
        cm.compute(CLASSES[:3])


def _instance_scores(images):
    cm, stats = ConfusionMatrix(19), InstanceStats(TRAINID)
    for pred, label, inst in images:
        cm.update(pred, label)
        stats.update(pred, inst)
    return cm.compute(TRAINID.classes, TRAINID.categories, stats)


def test_instance_iou_by_hand():
    r = _instance_scores([(GUESS, LABELS, INSTANCES)])
    car, person = AVERAGE_INSTANCE_SIZE["car"], AVERAGE_INSTANCE_SIZE["person"]
    # A: 3 of 4 pixels right, weight car/4; B: none of 2, weight car/2; FP: the road pixel
    # taken for a car (the crowd's pixels are true positives of the matrix, no instance)
    tp, fn = 3 * car / 4, car / 4 + 2 * car / 2
    assert r["instance_iou"]["car"] == pytest.approx(tp / (tp + 1 + fn))
    assert r["instance_iou"]["person"] == pytest.approx(0.5)  # 1 of 2, no FP
    assert r["instance_iou"]["rider"] == 0.0 and r["instance_iou"]["truck"] == 0.0  # FP only
    assert r["instance_iou"]["bus"] is None  # neither instance nor prediction
    assert list(r["instance_iou"]) == ["person", "rider", "car", "truck", "bus", "train",
                                       "motorcycle", "bicycle"]
    assert r["iiou"] == pytest.approx((tp / (tp + 1 + fn) + 0.5 + 0 + 0) / 4)
    # categories: a person taken for a rider is still human; A's truck pixel still a vehicle
    assert r["category_instance_iou"]["human"] == pytest.approx(1.0)
    assert r["category_instance_iou"]["vehicle"] == pytest.approx(car / (car + 1 + car))
    assert list(r["category_instance_iou"]) == ["human", "vehicle"]
    assert r["category_iiou"] == pytest.approx((1 + car / (2 * car + 1)) / 2)
    assert person > 0 and r["miou"] is not None


def test_the_gpu_branch_of_instance_stats_takes_the_pngs_uint16_ids():
    """A GPU scores with torch (the CPU with numpy): both branches, on the uint16 arrays that
    read_instance_ids hands out, give the same sums (torch compares no uint16)."""
    ids = INSTANCES.numpy().astype(np.uint16)
    sums = []
    for numpy in (True, False):
        stats = InstanceStats(TRAINID)
        stats._numpy = numpy
        for pred in (GUESS, GUESS.roll(3)):
            stats.update(pred, ids)
        with pytest.raises(ValueError, match="prediction of 11 pixels, instance ids of 12"):
            stats.update(GUESS[1:], ids)
        sums.append(stats.sums)
    assert sums[0].abs().sum() > 0
    torch.testing.assert_close(sums[1], sums[0], rtol=1e-12, atol=0)


def test_the_gpu_confusion_matrix_counts_without_reading_back():
    """On a GPU the matrix is counted on the device with nothing read back per batch. The
    meta device holds no values, so anything that reads one back (torch.bincount sizing its
    output from the max) fails there; and the same kernels count what numpy counts."""
    cm = ConfusionMatrix(4, device="meta")
    cm.update(PRED.to("meta"), TARGET.to("meta"))
    assert cm.mat.shape == (4, 4) and cm.mat.device.type == "meta"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 256, (5000,), generator=g), torch.randint(0, 19, (5000,), generator=g)
    on_device = metrics._bincount_pairs_torch(a.to(torch.uint8), b, 19, 256)
    assert torch.equal(on_device, metrics.bincount_pairs(a, b, 19, 256))
    assert on_device.sum() == 5000


def test_instance_classes_of_other_mappings():
    # background, road, sky, car: only car is made of labelIds with instances, and it is the
    # whole of its category
    stats = InstanceStats(get_mapping("seed4"))
    assert stats.class_names == ["car"] and stats.category_names == ["vehicle"]


def _worker(rank: int, world: int, init: str, queue) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cm = ConfusionMatrix(4)
    cm.update(PRED[rank], TARGET[rank])  # each rank sees half the pixels
    cm.all_reduce()
    stats = InstanceStats(TRAINID)  # and one of two images
    stats.update(*IMAGES[rank])
    stats.all_reduce()
    queue.put((rank, (cm.mat.tolist(), stats.sums.tolist())))
    dist.destroy_process_group()


IMAGES = [(GUESS, INSTANCES), (GUESS.roll(3), INSTANCES)]


@pytest.mark.slow
def test_all_reduce_sums_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_worker, args=(r, 2, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    one = InstanceStats(TRAINID)
    for image in IMAGES:
        one.update(*image)
    assert one.sums.abs().sum() > 0
    for rank in (0, 1):
        assert results[rank][0] == MATRIX
        torch.testing.assert_close(torch.tensor(results[rank][1], dtype=torch.float64),
                                   one.sums, rtol=1e-12, atol=0)
