"""The recipe: which augmentations a training sample gets, in which order, with which draws.

`Augment` holds the settings a run records (crop, scale, flip, jitter) and `ops` lists the
augmentations built from them, in the order they run; the DALI graph
(`pipeline/loader.py: segmentation_graph`) and the CPU path (`Augment.cpu`) both walk that
list. Adding an augmentation is a file beside this one (an `Op`) and a line in `ops`
(docs/design.md shows a Gaussian blur).

Each sample's random values are one vector (`Augment.draw`): the ops' floats side by side,
in list order (`Augment.fields` says where each op's are), computed from one stream of
uniforms per (seed, epoch, index), each op taking its `draws` in list order. Every op draws
whatever its settings, so switching one off leaves the others' values unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.augment.colour import ColourJitter
from pipeline.augment.op import Op
from pipeline.augment.pad import Pad
from pipeline.augment.scale_crop_flip import ScaleCropFlip


@dataclass(frozen=True)
class Augment:
    crop: tuple[int, int]  # (H, W)
    scale: tuple[float, float]
    flip: bool
    jitter: float

    @cached_property
    def ops(self) -> tuple[Op, ...]:
        """The augmentations, in the order they run."""
        return (
            ScaleCropFlip(self.crop, self.scale, self.flip),
            Pad(self.crop),
            ColourJitter(self.jitter),
        )

    @cached_property
    def _where(self) -> dict[str, slice]:
        where, k = {}, 0
        for op in self.ops:
            where[op.name], k = slice(k, k + op.size), k + op.size
        return where

    @property
    def num_params(self) -> int:
        return sum(op.size for op in self.ops)

    def fields(self, name: str) -> slice:
        """Where the op called `name` keeps its floats in a sample's vector."""
        return self._where[name]

    def steps(self, params) -> list[tuple[Op, object]]:
        """The per-sample ops in order, each with its floats out of `params` (None if none)."""
        return [(op, params[self._where[op.name]] if op.size else None)
                for op in self.ops if not op.on_batch]

    def draw(self, seed: int, epoch: int, index: int, size: tuple[int, int]) -> np.ndarray:
        """Sample `index`'s vector (float32) in epoch `epoch`; `size` is the source (H, W)."""
        u = np.random.default_rng((seed, epoch, index, 1)).random(
            sum(op.draws for op in self.ops))
        parts, k = [], 0
        for op in self.ops:
            parts.append(op.draw(u[k:k + op.draws], size))
            k += op.draws
        return np.concatenate(parts).astype(np.float32)

    def cpu(self, image, label, p: np.ndarray):
        """One raw sample, uint8 tensors (H, W, 3) and (H, W), through the per-sample ops'
        CPU steps: what the torch backend's workers and the DALI backend's CPU path run."""
        for op, q in self.steps(p):
            image, label = op.cpu(image, label, q)
        return image, label

    def cpu_batch(self, images, labels, params):
        """`cpu` over a batch of raw samples (N, H, W, 3), (N, H, W[, 1]), params (N, P)."""
        import torch  # not above: the DALI reader workers unpickle this class

        pairs = [self.cpu(images[i], labels[i].reshape(labels.shape[1:3]), p)
                 for i, p in enumerate(params.numpy())]
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
