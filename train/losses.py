"""Training losses, the classes they predict, and class weights from pixel counts.

Two ways to train, chosen by `--losstype`:
- "segment": K logits per pixel, cross entropy, pixels labelled 255 ignored.
- "reconstruction": 3 outputs per pixel regress the class's palette colour (0-1 units),
  L1, the same pixels ignored; a pixel's class is the nearest palette colour. The original
  project regressed the colour label image, ignore areas included; here ignored pixels give
  no gradient and prediction maps back to classes, so it is evaluated like "segment".

Both compute in fp32 whatever autocast does, and reduce to the (weighted) mean over the
labelled pixels; a batch with none gives 0, not NaN, so it cannot stop a run.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.labels import IGNORE_INDEX

LOSSTYPES = ("segment", "reconstruction")


def _check(losstype: str) -> None:
    if losstype not in LOSSTYPES:
        raise ValueError(f"losstype must be one of {LOSSTYPES}, not {losstype!r}")


def output_channels(losstype: str, num_classes: int) -> int:
    """How many channels the model outputs for this loss."""
    _check(losstype)
    return num_classes if losstype == "segment" else 3


def _palette_tensor(palette, like: torch.Tensor) -> torch.Tensor:
    """(K, 3) colours in 0-1 units, on `like`'s device, fp32."""
    pal = torch.as_tensor(np.asarray(palette, dtype=np.float32).reshape(-1, 3))
    return (pal / 255.0).to(like.device)


class PixelLoss(nn.Module):
    """Weighted mean of a per-pixel loss over the pixels whose label is not `ignore_index`;
    `predict` turns the model's outputs into classes as this loss reads them, so whoever
    holds the loss needs neither the loss type nor the palette to score or to draw."""

    def __init__(
        self, losstype: str, palette, ignore_index: int, class_weights: torch.Tensor | None
    ) -> None:
        super().__init__()
        _check(losstype)
        self.losstype = losstype
        self.ignore_index = ignore_index
        self.palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)  # class colours
        weight = None if class_weights is None else torch.as_tensor(class_weights).float()
        self.register_buffer("class_weights", weight)
        self.register_buffer("colors", _palette_tensor(palette, torch.empty(0)))

    def per_pixel(self, outputs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.losstype == "segment":
            return F.cross_entropy(outputs, label, reduction="none")
        target = self.colors.to(label.device)[label].permute(0, 3, 1, 2)  # N,H,W,3 -> N,3,H,W
        # L1 is the median, so a boundary pixel regresses to one of the two colours rather
        # than to their blend, which could be nearest to a third class.
        return (outputs - target).abs().mean(dim=1)

    def forward(self, outputs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        with torch.autocast(outputs.device.type, enabled=False):
            outputs = outputs.float()
            valid = label != self.ignore_index
            safe = torch.where(valid, label, 0)  # any in-range index; masked out below
            losses = self.per_pixel(outputs, safe)
            weight = valid.float()
            if self.class_weights is not None:
                weight = weight * self.class_weights.to(label.device)[safe]
            # Dividing the sum ourselves (as F.cross_entropy's weighted mean does) keeps an
            # all-ignored batch at 0 instead of 0/0 = NaN, without a host sync.
            return (losses * weight).sum() / weight.sum().clamp_min(1e-12)

    @torch.no_grad()
    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Model outputs (N, C, H, W) -> class ids (N, H, W) int64."""
        if self.losstype == "segment":
            # max's indices are argmax's (the first maximum on ties), about 3x faster on the
            # CPU for (1, 19, 1024, 2048) full-resolution logits
            return outputs.max(dim=1).indices
        outputs = outputs.float()
        # One (N, H, W) distance map per class: N*K*H*W floats, not the 3x of broadcasting.
        colors = self.colors.to(outputs.device)
        dist = torch.stack([(outputs - c[:, None, None]).square().sum(dim=1) for c in colors],
                           dim=1)
        return dist.argmin(dim=1)


def build_loss(
    losstype: str,
    *,
    palette,
    ignore_index: int = IGNORE_INDEX,
    class_weights: torch.Tensor | None = None,
) -> PixelLoss:
    """The loss module, called as `loss(outputs, label)` -> fp32 scalar."""
    return PixelLoss(losstype, palette, ignore_index, class_weights)


def class_weights_from_pixels(class_pixels: list[int]) -> torch.Tensor:
    """ENet's weighting (Paszke et al., 2016): w_k = 1 / ln(1.02 + p_k), p_k = pixel share.

    Bounded between 1/ln(2.02) = 1.42 and 1/ln(1.02) = 50.5, so rare classes (poles, traffic
    lights) count up to ~35x more than road without the blow-up of inverse frequency. A class
    with no training pixels gets 0: there is nothing to balance, and a weight of 50 would only
    let its few val pixels dominate the val loss. The scale is irrelevant (the loss divides by
    the summed weights).
    """
    counts = torch.as_tensor(class_pixels, dtype=torch.float64)
    total = counts.sum()
    if counts.ndim != 1 or counts.numel() == 0 or total <= 0 or (counts < 0).any():
        raise ValueError(f"class pixel counts must be non-negative with a positive sum: "
                         f"{list(class_pixels)}")
    weights = 1.0 / torch.log(1.02 + counts / total)
    weights[counts == 0] = 0.0
    return weights.float()
