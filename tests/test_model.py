"""The U-Net's shapes and alignment, and the losses: ignore handling, fp32, colour round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.labels import get_mapping
from train.losses import (
    build_loss,
    class_weights_from_pixels,
    output_channels,
)
from train.models import build_model
from train.models.plain import UNet

PALETTE = get_mapping("trainid").palette


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
@pytest.mark.parametrize("hw", [(37, 53), (16, 16), (1, 3)])
def test_unet_output_has_input_size(upsample, hw):
    torch.manual_seed(0)
    model = UNet(num_classes=5, width=4, depth=3, upsample=upsample)
    out = model(torch.randn(2, 3, *hw))
    assert out.shape == (2, 5, *hw)
    assert torch.isfinite(out).all()


def test_unet_pads_bottom_right_and_crops_aligned():
    # An odd input must give exactly the top-left crop of the padded input's logits;
    # a crop from the wrong corner would shift every mask against its image.
    torch.manual_seed(0)
    model = UNet(num_classes=3, width=4, depth=2).eval()
    x = torch.randn(1, 3, 13, 10)
    with torch.no_grad():
        out = model(x)
        ref = model(F.pad(x, (0, 2, 0, 3)))[..., :13, :10]
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("depth,width", [(2, 8), (4, 16)])
def test_unet_respects_width_and_depth(depth, width):
    model = UNet(num_classes=7, in_channels=4, width=width, depth=depth)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(pools) == depth
    assert convs[0].in_channels == 4 and convs[0].out_channels == width
    assert max(c.out_channels for c in convs) == width * 2**depth
    assert convs[-1].out_channels == 7
    assert not any(isinstance(m, nn.Tanh) for m in model.modules())  # logits out
    # config is what checkpoints store: it rebuilds the same architecture
    clone = build_model(**model.config)
    assert {k: v.shape for k, v in clone.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_unet_rejects_unknown_upsample():
    with pytest.raises(ValueError, match="upsample"):
        UNet(num_classes=2, upsample="nearest")


def _label(n=2, h=6, w=5, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, k, (n, h, w), generator=g)
    label[:, :2, :] = 255
    return label


@pytest.mark.parametrize("losstype", ["segment", "reconstruction"])
def test_ignored_pixels_get_no_gradient(losstype):
    label = _label()
    c = output_channels(losstype, 4)
    outputs = torch.randn(2, c, 6, 5, requires_grad=True)
    loss = build_loss(losstype, palette=PALETTE[:4])(outputs, label)
    loss.backward()
    ignored = (label == 255)[:, None].expand_as(outputs)
    assert outputs.grad[ignored].abs().max() == 0
    assert outputs.grad[~ignored].abs().sum() > 0


def test_segment_loss_is_weighted_cross_entropy():
    label = _label()
    outputs = torch.randn(2, 4, 6, 5)
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0])
    loss = build_loss("segment", palette=PALETTE[:4], class_weights=weights)(outputs, label)
    ref = F.cross_entropy(outputs, label, weight=weights, ignore_index=255)
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("losstype", ["segment", "reconstruction"])
def test_loss_is_fp32_under_autocast_and_zero_when_all_ignored(losstype):
    c = output_channels(losstype, 4)
    loss_fn = build_loss(losstype, palette=PALETTE[:4])
    x = torch.randn(2, 3, 6, 5)
    conv = nn.Conv2d(3, c, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = conv(x)
        assert outputs.dtype == torch.bfloat16
        loss = loss_fn(outputs, _label())
        empty = loss_fn(outputs, torch.full((2, 6, 5), 255))
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    assert empty.item() == 0.0  # not NaN: a fully ignored crop must not stop training


def test_reconstruction_round_trip():
    palette = PALETTE
    label = torch.randint(0, len(palette), (2, 7, 9))
    label[0, 0] = 255
    colors = torch.as_tensor(palette, dtype=torch.float32) / 255.0
    perfect = colors[label.clamp(max=len(palette) - 1)].permute(0, 3, 1, 2)
    assert output_channels("reconstruction", len(palette)) == 3
    loss = build_loss("reconstruction", palette=palette)(perfect, label)
    assert loss.item() == 0.0
    pred = build_loss("reconstruction", palette=palette).predict(
        perfect + 0.01 * torch.randn_like(perfect))
    keep = label != 255
    assert torch.equal(pred[keep], label[keep])
    # and a wrong colour costs something
    assert build_loss("reconstruction", palette=palette)(perfect.roll(1, dims=2), label) > 0


def test_segment_prediction_is_argmax():
    outputs = torch.randn(2, 5, 4, 3)
    assert output_channels("segment", 5) == 5
    assert torch.equal(build_loss("segment", palette=PALETTE[:5]).predict(outputs),
                       outputs.argmax(1))


def test_unknown_losstype():
    with pytest.raises(ValueError, match="losstype"):
        build_loss("dice", palette=PALETTE)
    with pytest.raises(ValueError, match="losstype"):
        output_channels("dice", 3)


def test_class_weights_from_pixels():
    counts = [1000, 100, 0, 10]
    w = class_weights_from_pixels(counts)
    share = np.array(counts) / sum(counts)
    assert w.dtype == torch.float32 and w.shape == (4,)
    assert w[2] == 0  # no training pixels: nothing to weight
    for k in (0, 1, 3):
        assert math.isclose(float(w[k]), 1 / math.log(1.02 + share[k]), rel_tol=1e-6)
    assert w[3] > w[1] > w[0] > 0  # rarer classes weigh more
    with pytest.raises(ValueError, match="pixel counts"):
        class_weights_from_pixels([0, 0])
