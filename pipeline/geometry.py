"""Scale, crop, flip and pad on the CPU, in torch's uint8 kernels, for both loader backends.

On a GPU the DALI graph does this (`pipeline/loader.py`). On the CPU, DALI's own resize costs
6-11 ms per 512x1024 output where torch's uint8 bilinear kernel costs about 1, so the CPU
path of both backends runs this one function on each sample: the DALI backend in the
trainer on the batches its reader workers hand over, the torch backend in its DataLoader
workers. Same inputs, same kernel: the two backends give identical batches.

The window, output size and flip come from `pipeline.sampling.draw_augment` (read through
`Window.of`); a flip is a window whose x ends are swapped, and the output is the mirrored
resize of that window.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.sampling import Window


def _nearest(start: int, stop: int, size: int) -> np.ndarray:
    """Source index of each of `size` outputs over [start, stop): DALI's INTERP_NN and
    torch's "nearest-exact" both take floor((i + 0.5) * scale)."""
    return start + ((np.arange(size) + 0.5) * ((stop - start) / size)).astype(np.int64)


def scale_crop_flip(image: torch.Tensor, label: torch.Tensor, p: np.ndarray | torch.Tensor) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image (H, W, 3) and label (H, W) -> the window of `p` resized to its output size.

    Bilinear for the image (no antialiasing, as the GPU graph), nearest for the label, so a
    label is never blended; both come back mirrored when `p` says flip.
    """
    top, left, bottom, right, h, w, flip = Window.of(p)
    window = image[top:bottom, left:right]
    window = window.flip(1) if flip else window.contiguous()  # mirrored as it is copied out
    # NHWC with a real batch stride: torch's fast uint8 path (channels_last in and out, HWC
    # back for free); a bare window[None] can look like NCHW to interpolate's layout check
    window = window.view(1, *window.shape).permute(0, 3, 1, 2)
    out = F.interpolate(window, size=(h, w), mode="bilinear", align_corners=False,
                        antialias=False)
    cols = _nearest(left, right, w)
    # rows, then columns with np.take: 4x faster than one 2-D gather for a uint8 label
    picked = np.take(label.numpy()[_nearest(top, bottom, h)], cols[::-1] if flip else cols,
                     axis=1)
    return out[0].permute(1, 2, 0), torch.from_numpy(picked)


def pad(image: torch.Tensor, label: torch.Tensor, crop: tuple[int, int]) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right up to the crop (H, W): image 0, label 255 (ignore)."""
    h, w = label.shape
    padded = torch.zeros((*crop, 3), dtype=torch.uint8), torch.full(crop, 255, dtype=torch.uint8)
    padded[0][:h, :w], padded[1][:h, :w] = image, label
    return padded


def augment_batch(images: torch.Tensor, labels: torch.Tensor, params: torch.Tensor,
                  crop: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`scale_crop_flip` and `pad` over a batch of raw samples (N, H, W, 3), (N, H, W[, 1])."""
    out = torch.zeros((len(images), *crop, 3), dtype=torch.uint8)
    out_labels = torch.full((len(images), *crop), 255, dtype=torch.uint8)
    for i, p in enumerate(params.numpy()):
        image, label = scale_crop_flip(images[i], labels[i].reshape(labels.shape[1:3]), p)
        h, w = label.shape
        out[i, :h, :w], out_labels[i, :h, :w] = image, label
    return out, out_labels
