"""What an augmentation provides: its random draw, its DALI step and its CPU step."""

from __future__ import annotations

from typing import ClassVar

import numpy as np


class Op:
    """One augmentation of an (image, label) pair, as a frozen dataclass of its settings.

    `draw` turns its `draws` uniforms in [0, 1) into the `size` floats it keeps in the
    sample's vector (`Augment.draw` hands each op its share of one stream per sample, so the
    values are a pure function of (seed, epoch, index) on every backend and every resume).
    Its steps read those floats back, as `p`, on one (image, label) pair:
    - `dali(image, label, p)` in the DALI graph (on the GPU in training; `p` a DataNode),
    - `cpu(image, label, p)` on one raw sample, uint8 tensors (H, W, 3) and (H, W), in torch
      (the CPU path of both backends); the two give the same labels and images within one
      grey level.
    An op with `on_batch` set has no per-sample step: it runs in torch on the batch's device,
    after either backend (colour: folded into the normalization, `pipeline/photometric.py`).
    `p` is None for an op of `size` 0.
    """

    name: ClassVar[str]
    draws: ClassVar[int] = 0
    size: ClassVar[int] = 0
    on_batch: ClassVar[bool] = False

    def draw(self, u: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """`u`: this op's uniforms; `size`: the source (H, W). -> `size` floats."""
        return np.zeros(0, np.float32)

    def dali(self, image, label, p):
        raise NotImplementedError(f"{type(self).__name__} has no DALI step")

    def cpu(self, image, label, p):
        raise NotImplementedError(f"{type(self).__name__} has no CPU step")
