"""A random scale, crop and flip: one source window, resized to the output, mirrored.

The window is cut from the source and resized to at most the crop, so the work scales with
the output; where the scaled image is smaller than the crop, the output is smaller and `Pad`
fills it up. A flip is a window whose x ends are swapped: resizing a mirrored window mirrors
the output. The label is resized with nearest, so it is never blended.

On the CPU the step runs in torch's uint8 kernels: DALI's own CPU resize costs 6-11 ms per
512x1024 output where torch's uint8 bilinear kernel costs about 1. torch is imported inside
the CPU step, because the DALI reader workers unpickle this op to draw and must not load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.augment.op import Op

# The op's floats, field by field: the one place their layout is written down.
WINDOW_START = slice(0, 2)  # (y0, x0): the source window's first row and column
WINDOW_END = slice(2, 4)  # (y1, x1): one past its last; x1 < x0 when it is read mirrored
OUTPUT_SIZE = slice(4, 6)  # (h, w) the window is resized to, at most the crop


class Window(NamedTuple):
    """The op's floats as the CPU step reads them."""

    top: int
    left: int
    bottom: int
    right: int
    height: int  # of the output
    width: int
    flip: bool

    @classmethod
    def of(cls, p) -> Window:
        (y0, x0), (y1, x1), (h, w) = (p[WINDOW_START], p[WINDOW_END], p[OUTPUT_SIZE])
        return cls(int(y0), int(min(x0, x1)), int(y1), int(max(x0, x1)), int(h), int(w),
                   bool(x0 > x1))


def _nearest(start: int, stop: int, size: int) -> np.ndarray:
    """Source index of each of `size` outputs over [start, stop): DALI's INTERP_NN and
    torch's "nearest-exact" both take floor((i + 0.5) * scale)."""
    return start + ((np.arange(size) + 0.5) * ((stop - start) / size)).astype(np.int64)


@dataclass(frozen=True)
class ScaleCropFlip(Op):
    crop: tuple[int, int]  # (H, W)
    scale: tuple[float, float]
    flip: bool

    name = "scale_crop_flip"
    draws = 4  # scale, y, x, coin
    size = 6

    def draw(self, u: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The window at a random scale and position; x ends swapped on heads.

        Output pixel i of n samples the window of `win` pixels at (i + 1/2) win / n; when win
        holds more factors of two than n, some of those points fall exactly on a border
        between two source pixels, where nearest has two answers and the GPU's float32
        arithmetic and the CPU's each pick one. A window one pixel smaller (odd) has no such
        point, so the label is the same on every kernel.
        """
        s, uy, ux, coin = u
        s = self.scale[0] + s * (self.scale[1] - self.scale[0])
        p = np.zeros(self.size, np.float32)
        start, end, out = p[WINDOW_START], p[WINDOW_END], p[OUTPUT_SIZE]  # views: written below
        for axis, v in enumerate((uy, ux)):
            n = min(self.crop[axis], max(1, round(size[axis] * s)))
            win = min(size[axis], max(1, round(n / s)))
            if win & -win > n & -n:  # more factors of two in win than in n: see above
                win -= 1
            first = int(v * (size[axis] - win + 1))
            start[axis], end[axis], out[axis] = first, first + win, n
        if self.flip and coin < 0.5:
            start[1], end[1] = end[1], start[1]
        return p

    def dali(self, image, label, p):
        """Cut the window out, then resize it: a resize over a region of interest would blend
        the pixels beyond its edges in. The same as the CPU step."""
        from nvidia.dali import fn, types
        from nvidia.dali import math as dmath

        start, end = p[WINDOW_START], p[WINDOW_END]  # x ends swapped when flipped
        mirror = fn.cast(start > end, dtype=types.FLOAT)  # per axis: 1 where flipped
        window = dict(start=fn.cast(dmath.min(start, end), dtype=types.INT32),
                      end=fn.cast(dmath.max(start, end), dtype=types.INT32), axis_names="HW")
        resize = dict(roi_start=mirror, roi_end=1 - mirror, roi_relative=True,
                      size=p[OUTPUT_SIZE])
        image = fn.resize(fn.slice(image, **window), **resize, interp_type=types.INTERP_LINEAR,
                          antialias=False)
        label = fn.resize(fn.slice(label, **window), **resize, interp_type=types.INTERP_NN)
        return image, label

    def cpu(self, image, label, p):
        """Bilinear for the image (no antialiasing, as the DALI step), nearest for the label;
        both come back mirrored when `p` says flip."""
        import torch
        import torch.nn.functional as F

        top, left, bottom, right, h, w, flip = Window.of(p)
        window = image[top:bottom, left:right]
        window = window.flip(1) if flip else window.contiguous()  # mirrored as it is copied
        # NHWC with a real batch stride: torch's fast uint8 path (channels_last in and out,
        # HWC back for free); a bare window[None] can look like NCHW to interpolate's check
        window = window.view(1, *window.shape).permute(0, 3, 1, 2)
        out = F.interpolate(window, size=(h, w), mode="bilinear", align_corners=False,
                            antialias=False)
        cols = _nearest(left, right, w)
        # rows, then columns with np.take: 4x faster than one 2-D gather for a uint8 label
        picked = np.take(label.numpy()[_nearest(top, bottom, h)], cols[::-1] if flip else cols,
                         axis=1)
        return out[0].permute(1, 2, 0), torch.from_numpy(picked)
