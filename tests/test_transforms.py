"""One test each for the transforms, as mmsegmentation has them: the colour matrix, the random
window of `draw_augment`, and the CPU geometry that reads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.geometry import pad, scale_crop_flip
from pipeline.photometric import color_matrix
from pipeline.sampling import (
    COLOUR,
    OUTPUT_SIZE,
    WINDOW_END,
    WINDOW_START,
    Augment,
    Window,
    draw_augment,
)

RGB = torch.tensor(np.random.default_rng(0).uniform(0, 255, (3, 500)))


def apply(row: list[float], x: torch.Tensor = RGB) -> torch.Tensor:
    a, t = color_matrix(torch.tensor([row]))
    return a[0].double() @ x + t.double()


def test_the_identity_row_changes_nothing():
    a, t = color_matrix(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(a[0], torch.eye(3), atol=1e-6, rtol=0)
    assert float(t[0]) == 0.0


@pytest.mark.parametrize("hue", [0.0, 0.13, -0.25])
def test_saturation_zero_is_grey_whatever_the_hue(hue):
    out = apply([1.0, 1.0, 0.0, hue])
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], out[2], atol=1e-4, rtol=0)
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64) @ RGB
    torch.testing.assert_close(out[0], luma, atol=1e-4, rtol=0)


def test_a_full_hue_turn_is_the_identity():
    torch.testing.assert_close(apply([1.0, 1.0, 1.0, 1.0]), RGB, atol=1e-3, rtol=0)
    assert not torch.allclose(apply([1.0, 1.0, 1.0, 0.5]), RGB, atol=1.0)  # half a turn moves


def test_brightness_scales_and_contrast_pulls_to_mid_grey():
    torch.testing.assert_close(apply([0.5, 1.0, 1.0, 0.0]), RGB * 0.5, atol=1e-3, rtol=0)
    torch.testing.assert_close(apply([1.0, 0.0, 1.0, 0.0]), torch.full_like(RGB, 128.0),
                               atol=1e-3, rtol=0)


SIZE, AUG = (64, 128), Augment(crop=(48, 96), scale=(0.5, 2.0), flip=True, jitter=0.2)


def draws(aug: Augment = AUG, n: int = 200) -> np.ndarray:
    return np.stack([draw_augment(0, epoch, i, SIZE, aug) for epoch in (0, 1)
                     for i in range(n // 2)])


def test_the_window_lies_inside_the_image_and_scales_to_the_output():
    for p in draws():
        w = Window.of(p)
        assert 0 <= w.top < w.bottom <= SIZE[0] and 0 <= w.left < w.right <= SIZE[1]
        assert 1 <= w.height <= AUG.crop[0] and 1 <= w.width <= AUG.crop[1]
        # one scale for both axes, within the rounding of each side
        sy, sx = w.height / (w.bottom - w.top), w.width / (w.right - w.left)
        assert 0.5 - 0.05 <= sy <= 2.0 + 0.05 and abs(sy - sx) < 0.1
    assert len({tuple(p[WINDOW_START]) for p in draws()}) > 50  # positions vary


def test_no_output_pixel_samples_a_border_between_source_pixels():
    """Nearest has one answer on every kernel: no (i + 1/2) win / n is a whole number."""
    for p in draws(n=1000):
        w = Window.of(p)
        for win, n in ((w.bottom - w.top, w.height), (w.right - w.left, w.width)):
            assert all((2 * i + 1) * win % (2 * n) for i in range(n)), (win, n)


def test_a_flip_swaps_the_x_ends_and_nothing_else():
    flipped, plain = draws(), draws(Augment(AUG.crop, AUG.scale, False, AUG.jitter))
    x0, x1 = WINDOW_START.start + 1, WINDOW_END.start + 1  # the columns of the x ends
    mirrored = flipped[:, x0] > flipped[:, x1]
    assert 0.3 < mirrored.mean() < 0.7 and not (plain[:, x0] > plain[:, x1]).any()
    swapped = plain.copy()
    swapped[mirrored, x0], swapped[mirrored, x1] = plain[mirrored, x1], plain[mirrored, x0]
    assert np.array_equal(flipped, swapped)
    assert all(Window.of(p).flip == m for p, m in zip(flipped, mirrored))


def test_jitter_changes_the_colour_fields_only():
    still = draws(Augment(AUG.crop, AUG.scale, AUG.flip, 0.0))
    moved = draws()
    geometry = [WINDOW_START, WINDOW_END, OUTPUT_SIZE]
    assert all(np.array_equal(still[:, f], moved[:, f]) for f in geometry)
    assert np.allclose(still[:, COLOUR], [1, 1, 1, 0])
    assert not np.allclose(moved[:, COLOUR], [1, 1, 1, 0])


def test_geometry_identity_mirror_and_padding():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8))
    label = torch.from_numpy(rng.integers(0, 19, SIZE, dtype=np.uint8))
    whole = np.array([0, 0, 64, 128, 64, 128, 1, 1, 1, 0], np.float32)
    out, lab = scale_crop_flip(image, label, whole)
    assert torch.equal(out, image) and torch.equal(lab, label)
    mirror = whole.copy()
    mirror[[1, 3]] = mirror[[3, 1]]
    out, lab = scale_crop_flip(image, label, mirror)
    assert torch.equal(out, image.flip(1)) and torch.equal(lab, label.flip(1))
    out, lab = pad(out[:40, :100], lab[:40, :100], (48, 128))
    assert (out[40:] == 0).all() and (out[:, 100:] == 0).all() and (lab[40:] == 255).all()
    assert torch.equal(lab[:40, :100], label.flip(1)[:40, :100])
