"""The one evaluation loop: predictions go past a list of accumulators, which then sum
themselves over the ranks.

Every evaluation (the shards through the loader, the originals at full resolution, PNGs
predicted elsewhere, a submission) turns its inputs into `Scored` items and hands them to
`accumulate` with what it needs counted: the confusion matrix and instance statistics
(`metrics.py`), the mean loss, the pictures kept, the exported PNGs. An accumulator is
anything with `add(scored)` and `all_reduce()`; a new one plugs in beside the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from train import distributed


@dataclass
class Scored:
    """A batch (N, H, W) or one image (H, W) of predicted class ids, and what goes with it."""

    pred: torch.Tensor
    target: torch.Tensor | None = None  # the ground truth's class ids; None: a submission
    outputs: torch.Tensor | None = None  # the model's float outputs (for the loss)
    image: torch.Tensor | None = None  # the model's inputs (for pictures)
    instances: np.ndarray | None = None  # one image's instanceIds (for iIoU)
    name: str | None = None  # one image's {city}_{seq}_{frame}


class Accumulator(Protocol):
    def add(self, scored: Scored) -> None: ...

    def all_reduce(self) -> None: ...


def accumulate(items: Iterable[Scored], accumulators: Sequence[Accumulator], *,
               over_ranks: bool = True) -> None:
    """Each item past every accumulator in order, then (`over_ranks`) each summed over ranks."""
    for scored in items:
        for a in accumulators:
            a.add(scored)
    if over_ranks:
        for a in accumulators:
            a.all_reduce()


class MeanLoss:
    """The loss per image, over the whole split: its `value` after `all_reduce`."""

    def __init__(self, criterion, device: torch.device) -> None:
        self.criterion = criterion
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss * images, images

    def add(self, scored: Scored) -> None:
        n = len(scored.target)
        self.totals[0] += self.criterion(scored.outputs, scored.target).double() * n
        self.totals[1] += n

    def all_reduce(self) -> None:
        distributed.all_reduce_sum(self.totals)

    @property
    def value(self) -> float | None:
        return float(self.totals[0] / self.totals[1]) if self.totals[1] > 0 else None


class Images:
    """How many images were scored, over all ranks."""

    def __init__(self, device: torch.device) -> None:
        self.n, self.device = 0, device

    def add(self, scored: Scored) -> None:
        self.n += 1 if scored.pred.ndim == 2 else len(scored.pred)

    def all_reduce(self) -> None:
        t = torch.tensor([self.n], dtype=torch.int64, device=self.device)
        self.n = int(distributed.all_reduce_sum(t).item())


class Kept:
    """This rank's first `keep` images, labels and predictions, on the CPU (for pictures)."""

    def __init__(self, keep: int) -> None:
        self.left, self.value = keep, None

    def add(self, scored: Scored) -> None:
        if self.left <= 0:
            return
        k = self.left
        new = {"image": scored.image[:k].cpu(), "label": scored.target[:k].cpu(),
               "pred": scored.pred[:k].cpu()}
        self.value = new if self.value is None else {key: torch.cat([self.value[key], v])
                                                     for key, v in new.items()}
        self.left -= len(new["label"])

    def all_reduce(self) -> None:
        pass  # each rank's own
