"""Pad bottom/right up to the crop: image 0, label 255 (ignore).

After the flip, so the padding always lands bottom/right; a scaled image smaller than the
crop leaves the rest of the sample to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.augment.op import Op


@dataclass(frozen=True)
class Pad(Op):
    crop: tuple[int, int]  # (H, W)

    name = "pad"

    def dali(self, image, label, p):
        from nvidia.dali import fn

        image = fn.pad(image, axis_names="HW", shape=list(self.crop), fill_value=0)
        label = fn.pad(label, axis_names="HW", shape=list(self.crop), fill_value=255)
        return image, label

    def cpu(self, image, label, p):
        import torch  # here, not above: see scale_crop_flip.py

        h, w = label.shape
        padded = (torch.zeros((*self.crop, 3), dtype=torch.uint8),
                  torch.full(self.crop, 255, dtype=torch.uint8))
        padded[0][:h, :w], padded[1][:h, :w] = image, label
        return padded
