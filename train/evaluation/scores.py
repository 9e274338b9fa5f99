"""The scores, one table: each a small function of a `Tally` (the confusion matrix and the
per-class IoU behind it), listed in the order `ConfusionMatrix.compute` returns them.

A score with a label is a headline: metrics.json lists it first (`HEAD`), and the one-line
summary (`results.scores_text`) shows it by that label; a score without one is a table
behind the headlines (per class, per category, the matrix). Adding a score computed from the
confusion matrix is one function under `@score(...)`; docs/design.md shows frequency-weighted
IoU.

IoU_k = TP / (TP + FP + FN) from the matrix; pixels labelled `ignore_index` are left out
entirely. A class absent from both ground truth and prediction has no IoU (None) and is left
out of the mean, as the official evaluator does (NaN there). The instance-weighted iIoU comes
from `metrics.InstanceStats` (see `train/evaluation/metrics.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def mean(scores: dict[str, float | None]) -> float | None:
    """The mean of the scores that exist (None: none does)."""
    present = [v for v in scores.values() if v is not None]
    return sum(present) / len(present) if present else None


def iou(mat: torch.Tensor, ids: list[int], tp: float | None = None,
        fn: float | None = None) -> float | None:
    """TP / (TP + FP + FN) of the classes `ids` taken as one; iIoU passes weighted TP and FN."""
    inside = float(mat[ids][:, ids].sum())
    fp = float(mat[:, ids].sum()) - inside
    if tp is None:
        tp, fn = inside, float(mat[ids, :].sum()) - inside
    union = tp + fp + fn
    return tp / union if union else None


@dataclass(frozen=True)
class Tally:
    """What every score reads: the matrix (float64 on the CPU, rows ground truth, `counts` as
    counted), and the per-class and per-category IoU and iIoU ({name: float | None})."""

    mat: torch.Tensor
    counts: torch.Tensor
    iou: dict[str, float | None]
    category_iou: dict[str, float | None]
    instance_iou: dict[str, float | None]
    category_instance_iou: dict[str, float | None]


@dataclass(frozen=True)
class Score:
    name: str  # its key in metrics.json
    fn: Callable[[Tally], Any]
    label: str | None  # a headline's name in the summary line; None: a table behind them


SCORES: list[Score] = []


def score(name: str, label: str | None = None) -> Callable:
    """Add the decorated function of a `Tally` to the table, after those already there."""
    if any(s.name == name for s in SCORES):
        raise ValueError(f"a score named {name!r} is already in the table")

    def add(fn: Callable[[Tally], Any]) -> Callable[[Tally], Any]:
        SCORES.append(Score(name, fn, label))
        return fn
    return add


def headlines() -> list[Score]:
    return [s for s in SCORES if s.label is not None]


def compute_scores(tally: Tally) -> dict:
    return {s.name: s.fn(tally) for s in SCORES}


# -- the table, in the order metrics.json has always listed them ------------------------------

@score("miou", "mIoU")
def mean_iou(t: Tally) -> float | None:
    return mean(t.iou)


@score("iiou", "iIoU")
def mean_instance_iou(t: Tally) -> float | None:
    return mean(t.instance_iou)


@score("category_miou", "category mIoU")
def mean_category_iou(t: Tally) -> float | None:
    return mean(t.category_iou)


@score("category_iiou", "category iIoU")
def mean_category_instance_iou(t: Tally) -> float | None:
    return mean(t.category_instance_iou)


score("iou")(lambda t: t.iou)
score("instance_iou")(lambda t: t.instance_iou)
score("category_iou")(lambda t: t.category_iou)
score("category_instance_iou")(lambda t: t.category_instance_iou)


@score("pixel_acc", "pixel acc")
def pixel_accuracy(t: Tally) -> float | None:
    total = float(t.mat.sum())
    return float(t.mat.trace()) / total if total else None


score("confusion")(lambda t: t.counts.tolist())
