"""Colour jitter and normalization, in torch on the loader's device, as one matrix per sample.

Brightness, contrast, saturation and hue (the last four of `draw_augment`'s values) fold
into a 3x3 matrix and an offset per sample, and the normalization folds into the same
matrix, so a batch costs one float copy, one batched matrix product and a clamp. DALI's
CPU `color_twist` costs 13 ms per 512x1024 image where this costs about 3; on a GPU both are
nearly free. `Loader` runs every batch through a `Normalizer`, whichever backend made it.
"""

from __future__ import annotations

import torch

_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                    dtype=torch.float64)
_YIQ_INV = torch.linalg.inv(_YIQ)


def color_matrix(colour: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (brightness, contrast, saturation, hue in turns) -> A (N, 3, 3), t (N,): A x + t.

    Brightness scales, contrast pulls towards mid-grey 128 (0-255 units), saturation scales
    the chroma and hue rotates it, both in YIQ space, where grey stays put.
    """
    b, c, s, h = colour.double().unbind(1)
    cos, sin = s * torch.cos(2 * torch.pi * h), s * torch.sin(2 * torch.pi * h)
    mix = torch.zeros(len(colour), 3, 3, dtype=torch.float64)
    mix[:, 0, 0], mix[:, 1, 1], mix[:, 1, 2], mix[:, 2, 1], mix[:, 2, 2] = 1, cos, -sin, sin, cos
    a = (b * c)[:, None, None] * (_YIQ_INV @ mix @ _YIQ)
    return a.float(), ((1 - c) * 128).float()


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
        self.bounds = (torch.tensor([-m / v for m, v in zip(mean, std)]).view(1, 3, 1),
                       torch.tensor([(1 - m) / v for m, v in zip(mean, std)]).view(1, 3, 1))
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._on:
            self._on[device] = tuple(_to(x, device) for x in (self.scale, self.shift,
                                                              *self.bounds))
        return self._on[device]

    def __call__(self, image: torch.Tensor, colour: torch.Tensor | None) -> torch.Tensor:
        """`colour`: (N, 4) rows of brightness, contrast, saturation, hue (CPU), or None."""
        n, h, w, _ = image.shape
        scale, shift, lo, hi = self._constants(image.device)
        x = torch.empty((n, 3, h, w), device=image.device).copy_(image.permute(0, 3, 1, 2))
        x = x.view(n, 3, h * w)
        if colour is None:
            x.mul_(scale).sub_(shift)
        else:
            a, t = color_matrix(colour)
            a, t = self.scale * a, self.scale * t.view(-1, 1, 1) - self.shift
            x = torch.baddbmm(_to(t, x.device), _to(a, x.device), x)
            x.clamp_(lo, hi)  # the jittered colour stays within 0-255
        return x.view(n, 3, h, w).to(self.dtype)
