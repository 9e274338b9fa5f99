"""`predict_paths` on folders of odd-sized images; grids, overlays, denormalizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.labels import colorize, get_mapping
from pipeline.photometric import denormalize, normalize
from train.losses import build_loss
from train.predict import InputError, predict_paths
from train.visualize import overlay, save_grid

PALETTE = get_mapping("trainid").palette
SEGMENT = build_loss("segment", palette=PALETTE)
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


class PaletteModel(nn.Module):
    """A 'model' whose answer is known: each pixel is the class whose palette colour it has."""

    def __init__(self, losstype: str = "segment") -> None:
        super().__init__()
        self.losstype = losstype
        self.register_buffer("colors", torch.as_tensor(PALETTE, dtype=torch.float32) / 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        if self.losstype == "reconstruction":
            return rgb
        return -100 * (rgb[:, None] - self.colors[None, :, :, None, None]).square().sum(2)


def blocks(h: int, w: int, seed: int) -> np.ndarray:
    """Class ids in 4 vertical bands of random classes."""
    classes = np.random.default_rng(seed).choice(len(PALETTE), 4, replace=False)
    return classes[np.arange(w) * 4 // w][None, :].repeat(h, 0).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    labels = {"a": blocks(37, 53, 0), "b": blocks(20, 31, 1), "sub/c": blocks(41, 29, 2)}
    for stem, lab in labels.items():
        Image.fromarray(PALETTE[lab]).save(root / f"{stem}.png")
    Image.fromarray(PALETTE[blocks(24, 40, 3)]).save(root / "sub" / "d.jpg", quality=95)
    (root / "notes.txt").write_text("not an image")
    return root, labels


@pytest.mark.parametrize("losstype", ["segment", "reconstruction"])
def test_masks_match_images_at_their_own_size(folder, tmp_path, losstype):
    root, labels = folder
    out = tmp_path / "out"
    written = predict_paths(PaletteModel(losstype), [root], out, mean=MEAN, std=STD,
                            loss=build_loss(losstype, palette=PALETTE), device="cpu")
    expected = [out / f"{s}_{kind}.png" for s in ["a", "b", "sub/c", "sub/d"]
                for kind in ("mask", "overlay")]
    assert written == expected
    for stem, lab in labels.items():
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        np.testing.assert_array_equal(mask, colorize(lab, PALETTE))
        over = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert over.shape == lab.shape + (3,)
    jpg = np.asarray(Image.open(out / "sub" / "d_mask.png"))
    assert jpg.shape == (24, 40, 3)
    assert (jpg == colorize(blocks(24, 40, 3), PALETTE)).all(-1).mean() > 0.9


def test_resize_to_training_size_and_back(folder, tmp_path):
    root, labels = folder
    model = PaletteModel()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    out = tmp_path / "out"
    predict_paths(model, [root / "a.png", root / "sub"], out, mean=MEAN, std=STD,
                  loss=SEGMENT, device="cpu", size=(16, 24))
    assert seen == [(16, 24)] * 3  # every image predicted at the shards' W x H
    mask = np.asarray(Image.open(out / "a_mask.png"))
    assert mask.shape == (37, 53, 3)  # and the mask is back at the input's size
    agree = (mask == colorize(labels["a"], PALETTE)).all(-1)
    assert agree.mean() > 0.9  # only band edges may move by the resampling
    assert sorted(p.name for p in out.rglob("*_mask.png")) == ["a_mask.png", "c_mask.png",
                                                               "d_mask.png"]


def test_model_mode_restored(folder, tmp_path):
    model = PaletteModel().train()
    predict_paths(model, [folder[0] / "a.png"], tmp_path / "o", mean=MEAN, std=STD,
                  loss=SEGMENT, device="cpu")
    assert model.training


def test_bad_inputs_name_the_file(folder, tmp_path):
    root, _ = folder
    kw = dict(mean=MEAN, std=STD, loss=SEGMENT, device="cpu")
    with pytest.raises(InputError, match="missing.png: no such file"):
        predict_paths(PaletteModel(), [root / "missing.png"], tmp_path / "o1", **kw)
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    with pytest.raises(InputError, match="bad.png: cannot read image"):
        predict_paths(PaletteModel(), [bad], tmp_path / "o2", **kw)
    with pytest.raises(InputError, match="would both write"):
        predict_paths(PaletteModel(), [root / "a.png", root / "a.png"], tmp_path / "o3", **kw)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .png/.jpg/.jpeg images"):
        predict_paths(PaletteModel(), [empty], tmp_path / "o4", **kw)
    assert not (tmp_path / "o2").exists()  # nothing written for a failed run


def test_save_grid_rows_are_image_truth_prediction(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 19, (2, 6, 5)).astype(np.uint8)
    labels[0, 0, 0] = 255
    preds = torch.as_tensor(rng.integers(0, 19, (2, 6, 5)))
    path = save_grid(images, torch.as_tensor(labels), preds, PALETTE, tmp_path / "g" / "grid.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (12, 15, 3)
    for i in range(2):
        row = grid[6 * i:6 * (i + 1)]
        np.testing.assert_array_equal(row[:, :5], images[i])
        np.testing.assert_array_equal(row[:, 5:10], colorize(labels[i], PALETTE))
        np.testing.assert_array_equal(row[:, 10:], colorize(preds[i].numpy(), PALETTE))
    assert (grid[0, 5] == 0).all()  # ignore is black
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporaries left


def test_denormalize_inverts_the_loader_normalization():
    images = np.random.default_rng(1).integers(0, 256, (2, 7, 9, 3), dtype=np.uint8)
    x = normalize(images, MEAN, STD, "cpu")
    assert x.shape == (2, 3, 7, 9)
    np.testing.assert_array_equal(denormalize(x, MEAN, STD), images)


def test_overlay_blends():
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.full((2, 2, 3), 200, np.uint8)
    assert (overlay(image, mask, alpha=0.25) == 125).all()
    assert overlay(image, mask).dtype == np.uint8
    with pytest.raises(ValueError, match="differ"):
        overlay(image, mask[:1])
