"""train/evaluation/inference.py: windows laid out as mmsegmentation does, exact whole-image
equivalence, flip and scale averaging, the memory bound, and settings that do not go
together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from train.evaluation.inference import Inference, InferenceError, infer, window_starts, windows
from train.models.plain import UNet


def mmseg_grid(h, w, crop, stride):
    """mmsegmentation's slide_inference loop, verbatim in effect, as (y1, x1, y2, x2)."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(h - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * h_stride, wi * w_stride
            y2, x2 = min(y1 + h_crop, h), min(x1 + w_crop, w)
            boxes.append((max(y2 - h_crop, 0), max(x2 - w_crop, 0), y2, x2))
    return boxes


@pytest.mark.parametrize("size, window, stride", [
    ((1024, 2048), (512, 1024), (341, 683)),  # the Cityscapes recipe: 3 x 3 windows
    ((1024, 2048), (769, 769), (513, 513)),
    ((37, 53), (16, 20), (16, 20)),  # no overlap, last window moved back
    ((37, 53), (16, 20), (5, 7)),
    ((20, 30), (64, 64), (32, 32)),  # window larger than the image: one, the image
])
def test_windows_are_mmsegmentations_and_cover_every_pixel(size, window, stride):
    boxes = windows(size, window, stride)
    assert boxes == mmseg_grid(*size, window, stride)
    count = np.zeros(size, int)
    for y0, x0, y1, x1 in boxes:
        assert 0 <= y0 < y1 <= size[0] and 0 <= x0 < x1 <= size[1]
        assert (y1 - y0, x1 - x0) == (min(window[0], size[0]), min(window[1], size[1]))
        count[y0:y1, x0:x1] += 1
    assert count.min() >= 1
    if size == (1024, 2048) and window == (512, 1024):
        assert len(boxes) == 9
    assert window_starts(100, 40, 30) == [0, 30, 60]  # 60 + 40 ends at the edge


@pytest.fixture
def unet():
    torch.manual_seed(0)
    model = UNet(5, width=4, depth=2).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_a_window_covering_the_image_is_exactly_the_whole_image(unet):
    x = torch.randn(1, 3, 20, 36)
    whole = infer(unet, x)
    with torch.no_grad():
        assert torch.equal(whole, unet(x))
    for window in [(20, 36), (64, 64)]:
        assert torch.equal(infer(unet, x, mode="slide", window=window), whole)


def test_overlapping_windows_average_a_context_free_model_back_to_the_whole(unet):
    pixelwise = nn.Conv2d(3, 5, 1)  # each output pixel depends on its input pixel only
    x = torch.randn(2, 3, 37, 53)
    slid = infer(pixelwise, x, mode="slide", window=(16, 20), stride=(5, 7))
    torch.testing.assert_close(slid, infer(pixelwise, x), rtol=1e-5, atol=1e-6)
    # a model with context sees less of the image in a window: close, not equal
    a, b = infer(unet, x), infer(unet, x, mode="slide", window=(16, 20), stride=(8, 10))
    assert a.shape == b.shape and not torch.equal(a, b)


def test_windows_go_through_the_model_at_most_max_windows_at_a_time():
    model = nn.Conv2d(3, 2, 1)
    batches = []
    model.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    x = torch.randn(2, 3, 30, 40)
    infer(model, x, mode="slide", window=(16, 20), stride=(8, 10), max_windows=4)
    per_image = len(windows((30, 40), (16, 20), (8, 10)))  # 3 x 3
    assert sum(batches) == 2 * per_image and max(batches) <= 4
    batches.clear()
    infer(model, torch.randn(5, 3, 8, 8), max_windows=2)  # whole images, bounded too
    assert batches == [2, 2, 1]


class Ramp(nn.Module):
    """Outputs that depend on the position only: channel 0 = column index, 1 = its mirror."""

    def forward(self, x):
        w = x.shape[-1]
        col = torch.arange(w, dtype=torch.float32).expand(*x.shape[:1], 1, x.shape[-2], w)
        return torch.cat([col, w - 1 - col], dim=1)


def test_flip_mirrors_the_outputs_back_before_averaging():
    x = torch.randn(1, 3, 6, 9)
    out = infer(Ramp(), x, flip=True)
    # the mirrored pass's ramp, mirrored back, is the reverse ramp: their mean is flat
    torch.testing.assert_close(out, torch.full_like(out, 4.0))
    pixelwise = nn.Conv2d(3, 4, 1)  # flip-equivariant: flipping changes nothing
    torch.testing.assert_close(infer(pixelwise, x, flip=True), infer(pixelwise, x))


class Height(nn.Module):
    """Every output pixel is the height of the input it saw."""

    def forward(self, x):
        return torch.full((x.shape[0], 2, *x.shape[-2:]), float(x.shape[-2]))


def test_scales_resize_the_input_and_average_at_the_output_size():
    x = torch.randn(2, 3, 20, 30)
    out = infer(Height(), x, scales=(0.5, 1.0, 1.5))
    torch.testing.assert_close(out, torch.full((2, 2, 20, 30), (10 + 20 + 30) / 3))
    out = infer(Height(), x, scales=(0.5, 1.0), flip=True, out_size=(40, 60))
    torch.testing.assert_close(out, torch.full((2, 2, 40, 60), 15.0))
    # reconstruction models output colours: averaged the same way
    colours = infer(nn.Identity(), x, scales=(1.0, 1.0))
    torch.testing.assert_close(colours, x)


def test_settings_that_do_not_go_together():
    with pytest.raises(InferenceError, match="--mode slide needs --window"):
        Inference("slide").for_model((64, 128), crop=None)
    with pytest.raises(InferenceError, match="larger than --window"):
        Inference("slide", (512, 1024), (600, 683))
    with pytest.raises(InferenceError, match="need --mode slide"):
        Inference("whole", (512, 1024))
    with pytest.raises(InferenceError, match="positive"):
        Inference(scales=(1.0, 0.0))
    assert Inference("slide", (512, 1024)).stride == (341, 683)
    record = Inference("slide", (512, 1024), scales=(0.75, 1.0), flip=True).to_json()
    assert record == {"mode": "slide", "window": {"height": 512, "width": 1024},
                      "stride": {"height": 341, "width": 683},
                      "scales": [0.75, 1.0], "flip": True, "max_windows": 4}


def test_slide_defaults_to_the_training_crop_and_refuses_a_window_that_covers_all():
    s = Inference("slide").for_model((64, 128), crop=(32, 64))
    assert (s.window, s.stride) == ((32, 64), (21, 43))  # the crop, 2/3 of it
    given = Inference("slide", (16, 32)).for_model((64, 128), crop=(32, 64))
    assert given.window == (16, 32)
    assert Inference().for_model((64, 128), crop=(32, 64)) == Inference()
    with pytest.raises(InferenceError) as e:
        Inference("slide", (64, 128)).for_model((64, 128), crop=(32, 64))
    assert str(e.value) == ("--window 64x128 covers the whole image the model sees (128x64 "
                            "WxH, 64x128 HxW): sliding it is whole-image inference; pass a "
                            "smaller --window HxW or --mode whole")
    with pytest.raises(InferenceError, match=r"the training crop, slide's default\) covers"):
        Inference("slide").for_model((64, 128), crop=(64, 128))
    # a window that covers the image at scale 1 still slides over it at scale 2
    Inference("slide", (64, 128), scales=(1.0, 2.0)).for_model((64, 128), crop=None)
    with pytest.raises(InferenceError, match="--window 128x64 is portrait"):
        Inference("slide", (128, 64)).for_model((64, 128), crop=None)
    # at each image's own size (predict --size full) only the default is filled in
    assert Inference("slide").for_model(None, crop=(32, 64)).window == (32, 64)
