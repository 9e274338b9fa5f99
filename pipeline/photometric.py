"""Colour jitter and normalization, in torch on the loader's device, as one matrix per sample.

Brightness, contrast, saturation and hue (the last four of `draw_augment`'s values) fold
into a 3x3 matrix and an offset per sample, and the normalization folds into the same
matrix, so a batch costs one float copy, one batched matrix product and a clamp. DALI's
CPU `color_twist` costs 13 ms per 512x1024 image where this costs about 3; on a GPU both are
nearly free. `Loader` applies `jitter_normalize` to every batch, whichever backend made it.
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
    b, c, s, h = colour.double().cpu().unbind(1)
    cos, sin = s * torch.cos(2 * torch.pi * h), s * torch.sin(2 * torch.pi * h)
    mix = torch.zeros(len(colour), 3, 3, dtype=torch.float64)
    mix[:, 0, 0], mix[:, 1, 1], mix[:, 1, 2], mix[:, 2, 1], mix[:, 2, 2] = 1, cos, -sin, sin, cos
    a = (b * c)[:, None, None] * (_YIQ_INV @ mix @ _YIQ)
    return a.float(), ((1 - c) * 128).float()


def jitter_normalize(image: torch.Tensor, colour: torch.Tensor | None, mean, std,
                     dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (clamp(A x + t, 0, 255) / 255 - mean) / std, `dtype` (N, 3, H, W).

    The normalization is folded into the matrix, so a batch costs one float copy, one batched
    matrix product and an in-place clamp.
    """
    n, h, w, _ = image.shape
    x = torch.empty((n, 3, h, w), device=image.device).copy_(image.permute(0, 3, 1, 2))
    x = x.view(n, 3, h * w)
    scale = torch.tensor([1 / (255 * v) for v in std]).view(1, 3, 1)
    shift = torch.tensor([m / v for m, v in zip(mean, std)]).view(1, 3, 1)
    if colour is None:
        x.mul_(scale.to(x.device)).sub_(shift.to(x.device))
    else:
        a, t = color_matrix(colour)
        a, t = (scale * a).to(x.device), (scale * t.view(-1, 1, 1) - shift).to(x.device)
        x = torch.baddbmm(t, a, x)
        for c in range(3):  # clamp the jittered colour to 0-255, in normalized units
            x[:, c].clamp_(-mean[c] / std[c], (1 - mean[c]) / std[c])
    return x.view(n, 3, h, w).to(dtype)
