"""Confusion matrix over a whole split, summed across ranks, and the scores derived from it.

IoU_k = TP / (TP + FP + FN) from the matrix; pixels labelled `ignore_index` are left out
entirely, so a prediction on them is neither right nor wrong (as in the official Cityscapes
evaluator). A class absent from both ground truth and prediction has no IoU (None) and is
left out of the mean, again as the official evaluator does (NaN there).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.labels import IGNORE_INDEX


class ConfusionMatrix:
    """`mat[t, p]` counts pixels of ground-truth class t predicted as p (int64, on `device`)."""

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: str | torch.device = "cpu"
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: class ids of any matching shapes; target == ignore_index is skipped."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                             "differ in shape")
        k = self.num_classes
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        keep = (target >= 0) & (target < k) & (target != self.ignore_index)
        # One count over t*K+p fills the whole matrix in a single pass on the device; pixels
        # left out go to a spare bin K*K rather than through a boolean mask, whose size the
        # host would have to wait for. index_add_ needs no maximum either (bincount does).
        idx = torch.where(keep, target * k + pred, k * k)
        counts = torch.zeros(k * k + 1, dtype=torch.int64, device=self.mat.device)
        counts.index_add_(0, idx, torch.ones(1, dtype=torch.int64,
                                             device=idx.device).expand_as(idx))
        self.mat += counts[: k * k].reshape(k, k)

    def all_reduce(self) -> None:
        """Sum the matrices of all ranks (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def compute(self, classes: list[str], categories: list[str] | None = None) -> dict:
        """{"miou", "iou": {class: float|None}, "category_iou": {cat: float|None}, "pixel_acc"}.

        Category IoU treats the classes of one category as one class (merge rows and columns).
        `miou` and `pixel_acc` are None when there is nothing to average.
        """
        if len(classes) != self.num_classes:
            raise ValueError(f"{len(classes)} class names for a {self.num_classes}-class matrix")
        mat = self.mat.detach().cpu().double()
        iou = {name: _iou(mat, [k]) for k, name in enumerate(classes)}
        category_iou: dict[str, float | None] = {}
        if categories is not None:
            if len(categories) != self.num_classes:
                raise ValueError(f"{len(categories)} categories for {self.num_classes} classes")
            for cat in dict.fromkeys(categories):  # first-appearance order
                category_iou[cat] = _iou(mat, [k for k, c in enumerate(categories) if c == cat])
        present = [v for v in iou.values() if v is not None]
        total = float(mat.sum())
        return {
            "miou": sum(present) / len(present) if present else None,
            "iou": iou,
            "category_iou": category_iou,
            "pixel_acc": float(mat.trace()) / total if total else None,
        }


def _iou(mat: torch.Tensor, ids: list[int]) -> float | None:
    tp = float(mat[ids][:, ids].sum())
    union = float(mat[ids, :].sum()) + float(mat[:, ids].sum()) - tp
    return tp / union if union else None
