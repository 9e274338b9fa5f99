"""One test each for the augmentations (pipeline/augment/): the colour matrix, the random window
of the scale-crop-flip, its CPU step and the padding's; and the recipe that lists them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pytest
import torch

from pipeline.augment.colour import color_matrix
from pipeline.augment.op import Op
from pipeline.augment.pad import Pad
from pipeline.augment.recipe import Augment
from pipeline.augment.scale_crop_flip import (
    WINDOW_END,
    WINDOW_START,
    ScaleCropFlip,
    Window,
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
GEOMETRY, COLOUR = AUG.fields("scale_crop_flip"), AUG.fields("colour")


def draws(aug: Augment = AUG, n: int = 200) -> np.ndarray:
    return np.stack([aug.draw(0, epoch, i, SIZE) for epoch in (0, 1) for i in range(n // 2)])


def test_the_window_lies_inside_the_image_and_scales_to_the_output():
    for p in draws():
        w = Window.of(p[GEOMETRY])
        assert 0 <= w.top < w.bottom <= SIZE[0] and 0 <= w.left < w.right <= SIZE[1]
        assert 1 <= w.height <= AUG.crop[0] and 1 <= w.width <= AUG.crop[1]
        # one scale for both axes, within the rounding of each side
        sy, sx = w.height / (w.bottom - w.top), w.width / (w.right - w.left)
        assert 0.5 - 0.05 <= sy <= 2.0 + 0.05 and abs(sy - sx) < 0.1
    assert len({tuple(p[GEOMETRY][WINDOW_START]) for p in draws()}) > 50  # positions vary


def test_no_output_pixel_samples_a_border_between_source_pixels():
    """Nearest has one answer on every kernel: no (i + 1/2) win / n is a whole number."""
    for p in draws(n=1000):
        w = Window.of(p[GEOMETRY])
        for win, n in ((w.bottom - w.top, w.height), (w.right - w.left, w.width)):
            assert all((2 * i + 1) * win % (2 * n) for i in range(n)), (win, n)


def test_a_flip_swaps_the_x_ends_and_nothing_else():
    flipped, plain = draws(), draws(Augment(AUG.crop, AUG.scale, False, AUG.jitter))
    x0, x1 = (GEOMETRY.start + f.start + 1 for f in (WINDOW_START, WINDOW_END))  # x ends
    mirrored = flipped[:, x0] > flipped[:, x1]
    assert 0.3 < mirrored.mean() < 0.7 and not (plain[:, x0] > plain[:, x1]).any()
    swapped = plain.copy()
    swapped[mirrored, x0], swapped[mirrored, x1] = plain[mirrored, x1], plain[mirrored, x0]
    assert np.array_equal(flipped, swapped)
    assert all(Window.of(p[GEOMETRY]).flip == m for p, m in zip(flipped, mirrored))


def test_jitter_changes_the_colour_fields_only():
    still = draws(Augment(AUG.crop, AUG.scale, AUG.flip, 0.0))
    moved = draws()
    assert np.array_equal(still[:, GEOMETRY], moved[:, GEOMETRY])
    assert np.allclose(still[:, COLOUR], [1, 1, 1, 0])
    assert not np.allclose(moved[:, COLOUR], [1, 1, 1, 0])


def sample(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)),
            torch.from_numpy(rng.integers(0, 19, SIZE, dtype=np.uint8)))


def test_geometry_identity_mirror_and_padding():
    image, label = sample()
    whole = np.array([0, 0, 64, 128, 64, 128], np.float32)
    op = ScaleCropFlip(AUG.crop, AUG.scale, AUG.flip)
    out, lab = op.cpu(image, label, whole)
    assert torch.equal(out, image) and torch.equal(lab, label)
    mirror = whole.copy()
    mirror[[1, 3]] = mirror[[3, 1]]
    out, lab = op.cpu(image, label, mirror)
    assert torch.equal(out, image.flip(1)) and torch.equal(lab, label.flip(1))
    out, lab = Pad((48, 128)).cpu(out[:40, :100], lab[:40, :100], None)
    assert (out[40:] == 0).all() and (out[:, 100:] == 0).all() and (lab[40:] == 255).all()
    assert torch.equal(lab[:40, :100], label.flip(1)[:40, :100])


def test_the_recipe_runs_its_ops_in_order_on_their_own_floats():
    """`Augment.cpu` is the per-sample ops' CPU steps in list order, each reading its floats;
    the colour, an op on the batch, has none and leaves the sample alone."""
    assert [op.name for op in AUG.ops] == ["scale_crop_flip", "pad", "colour"]
    assert (AUG.num_params, GEOMETRY, COLOUR) == (10, slice(0, 6), slice(6, 10))
    image, label = sample()
    for p in draws(n=20):
        out, lab = AUG.cpu(image, label, p)
        want = Pad(AUG.crop).cpu(*ScaleCropFlip(AUG.crop, AUG.scale, AUG.flip).cpu(
            image, label, p[GEOMETRY]), None)
        assert out.shape == (*AUG.crop, 3) and torch.equal(out, want[0])
        assert torch.equal(lab, want[1])


@dataclass(frozen=True)
class Invert(Op):
    """A new augmentation, as docs/design.md adds a blur: an op, and a line in the list."""

    name = "invert"
    draws, size = 1, 1

    def draw(self, u, size):
        return np.array([u[0] < 0.5], np.float32)

    def cpu(self, image, label, p):
        return (255 - image if p[0] else image), label


class WithInvert(Augment):
    @cached_property
    def ops(self):
        first, *rest = Augment.ops.func(self)
        return (first, Invert(), *rest)


def test_an_added_op_gets_its_draw_its_floats_and_its_turn():
    aug = WithInvert(AUG.crop, AUG.scale, AUG.flip, AUG.jitter)
    assert (aug.fields("invert"), aug.fields("colour"), aug.num_params) == (
        slice(6, 7), slice(7, 11), 11)
    plain, added = draws(), draws(aug)
    assert np.array_equal(added[:, GEOMETRY], plain[:, GEOMETRY])  # drawn before it: unchanged
    inverted = added[:, 6] == 1
    assert 0.3 < inverted.mean() < 0.7
    image, label = sample()
    for p, q in zip(plain[:20], added[:20]):
        out, lab = AUG.cpu(image, label, p)
        got, got_label = aug.cpu(image, label, q)
        h, w = Window.of(p[GEOMETRY])[4:6]  # inverted before the padding: the padding stays 0
        want = 255 - out[:h, :w] if q[6] else out[:h, :w]
        assert torch.equal(got[:h, :w], want) and torch.equal(got_label, lab)
        assert (got[h:] == 0).all() and (got[:, w:] == 0).all()
