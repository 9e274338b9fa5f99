"""Colour jitter and normalization, in torch on the loader's device, as one matrix per sample;
and the one normalization of everything else fed to the model (`normalize`) or drawn from
its inputs (`denormalize`).

The colour jitter's four values per sample (`pipeline/augment/colour.py`: its draw and its
matrix) and the normalization fold into one matrix, so a batch costs one float copy, one
batched matrix product and a clamp. `Loader` runs every batch through a `Normalizer`,
whichever backend made it.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.augment.colour import color_matrix

BAND_PIXELS = 32 * 1024  # a band of rows: its floats stay in a core's L2 cache


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor onto `device` without making the host wait for the GPU."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x


class Normalizer:
    """uint8 (N, H, W, 3) -> (clamp(A x + t, 0, 255) / 255 - mean) / std, `dtype` (N, 3, H, W).

    The normalization is folded into the matrix, so a batch costs one float copy, one batched
    matrix product and one clamp. The constants go to the device with the first batch, so
    that building a loader touches no GPU.
    """

    def __init__(self, mean, std, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.scale = torch.tensor([1 / (255 * v) for v in std]).view(1, 3, 1)
        self.shift = torch.tensor([m / v for m, v in zip(mean, std)]).view(1, 3, 1)
        self.lo = [-m / v for m, v in zip(mean, std)]  # 0 and 255, normalized
        self.hi = [(1 - m) / v for m, v in zip(mean, std)]
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._on:
            self._on[device] = (_to(self.scale, device), _to(self.shift, device))
        return self._on[device]

    def __call__(self, image: torch.Tensor, colour: torch.Tensor | None) -> torch.Tensor:
        """`colour`: (N, 4) rows of brightness, contrast, saturation, hue (CPU), or None."""
        n, h, w, _ = image.shape
        scale, shift = self._constants(image.device)
        if colour is not None:
            a, t = color_matrix(colour)
            a, t = self.scale * a, self.scale * t.view(-1, 1, 1) - self.shift
            a, t = _to(a, image.device), _to(t, image.device)
        out = torch.empty((n, 3, h, w), device=image.device)
        # On a CPU, a band of rows at a time, so that the float copy, matrix product and
        # clamp of a band meet in the cache: 2.5x faster than three passes over the batch.
        rows = h if image.device.type == "cuda" else max(1, BAND_PIXELS // w)
        band = torch.empty((n, 3, min(rows, h), w), device=image.device)
        for r in range(0, h, rows):
            k = min(rows, h - r)
            x = band[:, :, :k].copy_(image[:, r:r + k].permute(0, 3, 1, 2)).view(n, 3, k * w)
            y = out[:, :, r:r + k].view(n, 3, k * w)
            if colour is None:
                torch.mul(x, scale, out=y).sub_(shift)
                continue
            torch.baddbmm(t, a, x, out=y)
            for c in range(3):  # the jittered colour stays within 0-255
                y[:, c].clamp_(self.lo[c], self.hi[c])
        return out.to(self.dtype)


def normalize(images, mean, std, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (N, H, W, 3) or one (H, W, 3), arrays or tensors -> the loader's
    normalized float (N, 3, H, W) on `device`: what evaluation and prediction feed the model."""
    images = np.asarray(images)
    if not images.flags.writeable:  # as PIL hands arrays out; torch warns about those
        images = images.copy()
    x = torch.as_tensor(images).to(device)
    return Normalizer(mean, std, torch.float32)(x[None] if x.ndim == 3 else x, None)


def denormalize(image: torch.Tensor, mean, std) -> np.ndarray:
    """The loader's normalized float (N, 3, H, W) -> uint8 (N, H, W, 3), for pictures."""
    x = image.detach().float().cpu()
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = ((x * s + m) * 255.0).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
