"""A U-Net decoder over any encoder's feature pyramid (the SwiftNet / smp `Unet` shape).

    features at strides 2, 4, 8, 16, 32 (some encoders have no /2)
    deepest -> [upsample x2, concatenate the skip at that stride (if any), DoubleConv] * 5
            -> 1x1 conv -> logits at the input's size

The input is padded bottom/right to a multiple of the encoder's largest stride, so every
upsampling meets its skip exactly, and the logits are cropped back: any input size works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.models.plain import DoubleConv

DECODER_WIDTHS = (256, 128, 64, 32, 16)  # at strides 16, 8, 4, 2, 1


class Encoder(nn.Module):
    """What an encoder gives the decoder: `forward(x) -> [features]`, shallow to deep, with
    `channels` and `strides` (powers of two, the last the largest) for each."""

    channels: list[int]
    strides: list[int]


class UNetDecoder(nn.Module):
    def __init__(self, channels: list[int], strides: list[int],
                 widths: tuple[int, ...] = DECODER_WIDTHS) -> None:
        super().__init__()
        levels = strides[-1].bit_length() - 1  # upsamplings from the deepest feature to /1
        if len(widths) != levels:
            raise ValueError(f"the decoder needs {levels} widths (strides "
                             f"{strides[-1] // 2} down to 1), not {len(widths)}: {widths}")
        skip_at = dict(zip(strides, channels))
        self.skips: list[int | None] = []  # per block, the index of its skip feature
        blocks, c = [], channels[-1]
        for i, width in enumerate(widths):
            stride = strides[-1] >> (i + 1)
            skip = skip_at.get(stride, 0)
            self.skips.append(strides.index(stride) if stride in skip_at else None)
            blocks.append(DoubleConv(c + skip, width))
            c = width
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = c

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, self.skips):
            # nearest: exact at the padded sizes, and the 3x3 convs that follow smooth it
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if skip is not None:
                x = torch.cat([x, features[skip]], dim=1)
            x = block(x)
        return x


class EncoderUNet(nn.Module):
    """`encoder` -> U-Net decoder -> `head` (1x1 conv); `config` rebuilds it."""

    def __init__(self, encoder: Encoder, num_classes: int, *, config: dict,
                 decoder: tuple[int, ...] = DECODER_WIDTHS,
                 normalization: dict | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.channels, encoder.strides, tuple(decoder))
        self.head = nn.Conv2d(self.decoder.out_channels, num_classes, 1)
        self.config = config
        self.size_multiple = encoder.strides[-1]
        self.normalization = normalization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.size_multiple
        # always, if by zero: a branch on the size would be frozen into an exported graph;
        # zero is the mean colour of normalized inputs
        x = F.pad(x, (0, -w % m, 0, -h % m))
        return self.head(self.decoder(self.encoder(x)))[..., :h, :w]
