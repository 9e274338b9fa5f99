"""U-Net (Ronneberger et al., 2015) with BatchNorm, for any input size.

    in -> DoubleConv(width) -> [MaxPool, DoubleConv(2x)] * depth            (encoder)
       -> [Up(/2), concat skip, DoubleConv(/2)] * depth -> 1x1 conv -> logits (decoder)

Every block is conv 3x3 (no bias: BatchNorm follows) -> BatchNorm -> ReLU, twice. Unlike the
paper the convolutions are padded, so the output has the input's size; the input is padded
at the bottom and right to a multiple of 2**depth and the logits are cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.models.registry import register_model

UPSAMPLE_MODES = ("bilinear", "transpose")


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Upsample x2 halving the channels, concatenate the skip, DoubleConv.

    "transpose" is the paper's 2x2 up-convolution; "bilinear" halves the channels with a 1x1
    conv and interpolates, so both modes have the same widths. Conv before upsampling is the
    same linear map (interpolation weights sum to 1) at a quarter of the FLOPs.
    """

    def __init__(self, in_channels: int, out_channels: int, mode: str) -> None:
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            )
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        depth: int = 4,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, not {upsample!r}")
        if depth < 1 or width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"UNet needs positive sizes (num_classes={num_classes}, "
                f"in_channels={in_channels}, width={width}, depth={depth})"
            )
        # Checkpoints store this and rebuild the model with build_model(**config).
        self.config = {"encoder": "plain", "num_classes": num_classes,
                       "in_channels": in_channels, "width": width, "depth": depth,
                       "upsample": upsample}
        self.depth = depth
        self.size_multiple = 2**depth
        self.normalization = None  # from scratch: the dataset's own mean/std
        widths = [width * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, width)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], upsample) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        pad_h, pad_w = -h % m, -w % m
        # Inputs are normalized, so zero is the mean colour: the least surprising filler.
        # Padded even by zero: a branch on the size would be traced as one fixed answer by
        # torch.export, and the ONNX graph (train/onnx_export.py) serves every size.
        x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.inc(x)
        skips = [x]
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips.pop()  # the bottleneck is x itself
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)[..., :h, :w]


@register_model("plain")
def plain(num_classes: int, *, in_channels: int = 3, width: int = 64, depth: int = 4,
          upsample: str = "bilinear") -> UNet:
    """The U-Net from scratch: `--width` channels at full resolution, doubled `--depth` times."""
    return UNet(num_classes, in_channels=in_channels, width=width, depth=depth,
                upsample=upsample)
