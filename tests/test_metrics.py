"""ConfusionMatrix against a hand-computed matrix, and summed across two gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.metrics import ConfusionMatrix

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
    assert set(r) == {"miou", "iou", "category_iou", "pixel_acc"}
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


def _worker(rank: int, world: int, init: str, queue) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cm = ConfusionMatrix(4)
    cm.update(PRED[rank], TARGET[rank])  # each rank sees half the pixels
    cm.all_reduce()
    queue.put((rank, cm.mat.tolist()))
    dist.destroy_process_group()


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
    assert results == {0: MATRIX, 1: MATRIX}
