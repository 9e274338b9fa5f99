"""Confusion matrix and instance statistics over a whole split, summed across ranks; the
scores derived from them are the table of `train/evaluation/scores.py`.

Pixels labelled `ignore_index` are left out of the matrix entirely, so a prediction on them is
neither right nor wrong (as in the official Cityscapes evaluator).

iIoU_k = iTP / (iTP + FP + iFN), where each ground-truth instance's pixels count with weight
(average instance size of its class) / (its size), so that small instances count as much as
large ones; FP stays unweighted. This is cityscapesScripts' `evalPixelLevelSemanticLabeling`:
the same average sizes, instances are the instanceIds above 1000 (crowd regions, whose id is
the bare labelId, count in IoU only), and a category has an iIoU when all its classes have
instances (human, vehicle). With other mappings a class has an iIoU when every labelId it is
made of has instances.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pipeline.labels import IGNORE_INDEX, LABEL_BY_ID, Mapping
from train.evaluation.scores import Tally, compute_scores, iou

MAX_INSTANCE_ID = 1 << 16  # instanceIds PNGs are 16-bit

# Average pixels per instance of each class over the training set: cityscapesScripts'
# `args.avgClassSize`, the weights of the official iIoU.
AVERAGE_INSTANCE_SIZE = {
    "bicycle": 4672.3249222261, "caravan": 36771.8241758242, "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518, "bus": 35732.1511111111, "train": 67583.7075812274,
    "car": 12794.0202738185, "person": 3462.4756337644, "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}


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
        # on the matrix's device: a GPU counts there, the CPU through numpy (bincount_pairs)
        target = target.reshape(-1).to(self.mat.device)
        pred = pred.reshape(-1).to(self.mat.device)
        rows = 256  # uint8 targets as they are: rows k..255 (ignore) are dropped below
        if target.dtype != torch.uint8 or self.ignore_index < k:
            drop = (target < 0) | (target >= k) | (target == self.ignore_index)
            target, rows = target.masked_fill(drop, k), k + 1
        # One bincount over t*K+p fills the whole matrix in a single pass.
        self.mat += bincount_pairs(target, pred, k, rows)[:k].to(self.mat.device)

    def all_reduce(self) -> None:
        """Sum the matrices of all ranks (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def compute(self, classes: list[str], categories: list[str] | None = None,
                instances: InstanceStats | None = None) -> dict:
        """The table of scores (`train/evaluation/scores.py`), in its order:

        miou, iiou, category_miou, category_iiou: the benchmark's four means (None when there
        is nothing to average; the two iIoU ones also without `instances`);
        iou, instance_iou, category_iou, category_instance_iou: {name: float|None} behind them;
        pixel_acc; confusion: the matrix as nested lists (rows ground truth); then any score
        added to the table.

        Category IoU treats the classes of one category as one class (merge rows and columns).
        """
        if len(classes) != self.num_classes:
            raise ValueError(f"{len(classes)} class names for a {self.num_classes}-class matrix")
        counts = self.mat.detach().cpu()
        mat = counts.double()
        per_class = {name: iou(mat, [k]) for k, name in enumerate(classes)}
        per_category: dict[str, float | None] = {}
        if categories is not None:
            if len(categories) != self.num_classes:
                raise ValueError(f"{len(categories)} categories for {self.num_classes} classes")
            for cat in dict.fromkeys(categories):  # first-appearance order
                per_category[cat] = iou(mat, [k for k, c in enumerate(categories) if c == cat])
        instance_iou, category_instance_iou = ({}, {}) if instances is None \
            else instances.compute(mat)
        return compute_scores(Tally(mat, counts, per_class, per_category, instance_iou,
                                    category_instance_iou))

    def add(self, scored) -> None:
        """The evaluation loop's call (`loop.accumulate`)."""
        self.update(scored.pred, scored.target)


def bincount_pairs(a, b, nb: int, na: int) -> torch.Tensor:
    """counts[i, j] = pixels with a == i and b == j: an (na, nb) int64 table; 0 <= a < na,
    0 <= b < nb; tensors or arrays. On the CPU through numpy, whose bincount is several
    times faster than torch's there."""
    if isinstance(a, torch.Tensor) and a.device.type != "cpu":
        return _bincount_pairs_torch(a, b, nb, na)
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    code_type = np.uint16 if na * nb <= 1 << 16 else np.int64
    code = a.astype(code_type)
    code *= nb
    code += b.astype(code_type, copy=False)
    return torch.from_numpy(np.bincount(code, minlength=na * nb).reshape(na, nb))


def _bincount_pairs_torch(a: torch.Tensor, b: torch.Tensor, nb: int, na: int) -> torch.Tensor:
    """`bincount_pairs` on `a`'s device without reading anything back: torch.bincount sizes its
    output from the codes' max and min, two host syncs per call on a GPU."""
    code = a.long() * nb + b.to(a.device).long()
    counts = torch.zeros(na * nb, dtype=torch.int64, device=a.device)
    return counts.index_add_(0, code, torch.ones((), dtype=torch.int64,
                                                 device=a.device).expand_as(code)).reshape(na, nb)


class InstanceStats:
    """Instance-weighted TP and FN per class and per category, for iIoU (see the module doc).

    `sums[i] = (weighted TP, weighted FN)` for the instance classes, then the instance
    categories: one float64 tensor, so ranks sum it with one all_reduce.
    """

    def __init__(self, mapping: Mapping, device: str | torch.device = "cpu") -> None:
        def has_instances(ids) -> bool:
            return bool(ids) and all(i in LABEL_BY_ID and LABEL_BY_ID[i].hasInstances for i in ids)

        classes = [k for k, c in enumerate(mapping.class_defs) if has_instances(c.ids)]
        cats = list(dict.fromkeys(mapping.categories))
        cats = [cat for cat in cats
                if all(k in classes for k, c in enumerate(mapping.categories) if c == cat)]
        self.num_classes = mapping.num_classes
        self.class_names = [mapping.classes[k] for k in classes]
        self.category_names = cats
        self.class_ids = classes  # class index of row i
        self.category_ids = [[k for k, c in enumerate(mapping.categories) if c == cat]
                             for cat in cats]
        # Per instanceId (16-bit PNGs: below 65536): its row, class, category row (-1: none)
        # and the weight's numerator. Ids up to 1000 are no instances (crowd regions or stuff).
        ids = torch.arange(MAX_INSTANCE_ID)
        label = (ids // 1000).clamp(max=255)
        row_of_label = torch.full((256,), -1, dtype=torch.int64)
        size_of_label = torch.zeros(256, dtype=torch.float64)
        for i, k in enumerate(classes):
            for label_id in mapping.class_defs[k].ids:
                row_of_label[label_id] = i
                size_of_label[label_id] = AVERAGE_INSTANCE_SIZE.get(LABEL_BY_ID[label_id].name, 0.)
        row = torch.where(ids > 1000, row_of_label[label], -1)
        self.device = torch.device(device)
        self._candidates = torch.nonzero(row >= 0).flatten().to(self.device)
        cand = self._candidates.cpu()
        self._row = row[cand].to(self.device)
        self._class = torch.tensor(classes, dtype=torch.int64)[self._row.cpu()].to(self.device)
        self._avg = size_of_label[label[cand]].to(self.device)
        # category membership of each class, and the category row of each candidate
        member = torch.zeros(len(cats), mapping.num_classes, dtype=torch.float64)
        cat_of_class = torch.full((mapping.num_classes,), -1, dtype=torch.int64)
        for j, members in enumerate(self.category_ids):
            member[j, members] = 1.0
            cat_of_class[members] = j
        self._member = member.to(self.device)
        self._cat = cat_of_class[self._class.cpu()].to(self.device)
        self.sums = torch.zeros(len(classes) + len(cats), 2, dtype=torch.float64,
                                device=self.device)
        # numpy's masks and bincount are several times torch's on the CPU; the tests turn
        # this off to run the torch branch, the one a GPU takes, on CPU tensors
        self._numpy = self.device.type == "cpu"

    @torch.no_grad()
    def update(self, pred: torch.Tensor, instance_ids) -> None:
        """Add one image: class ids (H, W) and its instanceIds (H, W) as read from the PNG."""
        k = self.num_classes
        if self._numpy:
            inst, pred = np.asarray(instance_ids).reshape(-1), pred.cpu().numpy().reshape(-1)
        else:  # 16 bits over the bus, widened there: torch compares no unsigned type but uint8
            inst = torch.as_tensor(instance_ids).to(self.device).int().reshape(-1)
            pred = pred.to(self.device).reshape(-1)
        if inst.shape != pred.shape:
            raise ValueError(f"prediction of {len(pred)} pixels, instance ids of {len(inst)}")
        keep = inst > 1000  # instances only: a fifth of the pixels in a street scene
        inst, pred = inst[keep], pred[keep]
        if len(inst) and int(inst.max()) >= MAX_INSTANCE_ID:
            raise ValueError(f"instance ids above {MAX_INSTANCE_ID - 1}")
        # One bincount over (instance id, predicted class) gives, for every instance, how
        # many of its pixels went to each class; the rest works on that small table.
        table = bincount_pairs(inst, pred, k, MAX_INSTANCE_ID).to(self.device)
        table = table[self._candidates]
        present = table.sum(1) > 0
        if not present.any():
            return
        table = table[present].double()
        rows, cls, cats = self._row[present], self._class[present], self._cat[present]
        pixels = table.sum(1)
        weight = self._avg[present] / pixels
        hit = table.gather(1, cls[:, None])[:, 0]
        add = torch.zeros_like(self.sums)
        add[:, 0].index_add_(0, rows, hit * weight)
        add[:, 1].index_add_(0, rows, (pixels - hit) * weight)
        has_cat = cats >= 0
        if has_cat.any():  # a category's TP: predicted as any class of the category
            cat_hit = (table[has_cat] * self._member[cats[has_cat]]).sum(1)
            w, n = weight[has_cat], len(self.class_ids)
            add[:, 0].index_add_(0, n + cats[has_cat], cat_hit * w)
            add[:, 1].index_add_(0, n + cats[has_cat], (pixels[has_cat] - cat_hit) * w)
        self.sums += add

    def add(self, scored) -> None:
        """The evaluation loop's call (`loop.accumulate`): one image and its instance ids."""
        self.update(scored.pred, scored.instances)

    def all_reduce(self) -> None:
        """Sum over ranks (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)

    def compute(self, mat: torch.Tensor) -> tuple[dict, dict]:
        """({class: iIoU|None}, {category: iIoU|None}) with FP from the confusion matrix."""
        sums = self.sums.detach().cpu().tolist()
        classes = {name: iou(mat, [k], *sums[i])
                   for i, (name, k) in enumerate(zip(self.class_names, self.class_ids))}
        n = len(self.class_ids)
        cats = {name: iou(mat, ids, *sums[n + j])
                for j, (name, ids) in enumerate(zip(self.category_names, self.category_ids))}
        return classes, cats
