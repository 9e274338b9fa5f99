"""Coarse labels and train_extra: the synthetic city's gtCoarse, and the two-stage recipe of the
README (coarse + extra, then fine-tune on fine) through both CLIs, from the official zips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import pack_official
from PIL import Image

from pipeline.cli import main as cityprep
from pipeline.synth import CITIES, coarse_label_ids, synthesize
from train.cli import main as citytrain

FIT = ["--epochs", "1", "--batch-size", "2", "--crop", "32x64", "--width", "4", "--depth", "2",
       "--amp", "off", "--workers", "0", "--device", "cpu", "--no-progress"]


def invoke(main, *args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_coarse_labels_are_the_fine_ones_without_their_boundaries():
    ids = np.full((6, 8), 7, np.uint8)
    ids[:, 5:] = 21
    ids[0, 0] = 11  # a one-pixel object vanishes, as small things do in coarse polygons
    want = np.full((6, 8), 7, np.uint8)
    want[:, 4:6] = 0
    want[:, 6:] = 21
    want[0, :2] = want[1, 0] = 0  # the object and its 4-neighbours
    assert np.array_equal(coarse_label_ids(ids, 1), want)
    wide = coarse_label_ids(ids, 2)
    assert (wide[:, 3:7] == 0).all() and (wide[3:, :2] == 7).all() and (wide[:, 7] == 21).all()


def test_synth_writes_gtcoarse_for_every_split_and_train_extra_without_fine(tmp_path):
    synthesize(tmp_path, train=2, val=1, extra=3, size=(64, 128), seed=0)
    for split, n in (("train", 2), ("val", 1), ("train_extra", 3)):
        images = sorted((tmp_path / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(images) == n
        for image in images:
            stem = image.name[: -len("_leftImg8bit.png")]
            coarse = tmp_path / "gtCoarse" / split / image.parent.name / f"{stem}_gtCoarse"
            ids = np.asarray(Image.open(f"{coarse}_labelIds.png"))
            for kind in ("color", "instanceIds"):
                assert Path(f"{coarse}_{kind}.png").is_file()
            assert 0.05 < (ids == 0).mean() < 0.6  # the boundaries, unlabeled
            fine = tmp_path / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
            if split == "train_extra":
                assert not fine.exists() and image.parent.name in CITIES["train_extra"]
            else:
                fine_ids = np.asarray(Image.open(fine))
                assert np.array_equal(ids[ids > 0], fine_ids[ids > 0])
    assert not (tmp_path / "gtFine" / "train_extra").exists()


@pytest.mark.slow
def test_the_two_stage_recipe_from_the_official_zips(tmp_path):
    city, zips = tmp_path / "city", tmp_path / "downloads"
    invoke(cityprep, "synth", city, "--train", "4", "--val", "2", "--extra", "4",
           "--size", "128x64")
    names = sorted(p.name for p in pack_official(city, zips))
    assert names == ["gtCoarse.zip", "gtFine_trainvaltest.zip", "leftImg8bit_trainextra.zip",
                     "leftImg8bit_trainvaltest.zip"]
    prep = ["--size", "64x32", "--shard-size", "2", "--workers", "2", "--quiet"]
    coarse = ["--mode", "coarse", "--split", "train", "--split", "train_extra", "--split", "val"]
    out = invoke(cityprep, "preprocess", "--datadir", zips, "--out", tmp_path / "coarse",
                 *coarse, *prep)
    assert "manifest.json written (train 4, val 2, train_extra 4 samples)" in out
    invoke(cityprep, "preprocess", "--datadir", city, "--out", tmp_path / "coarse-tree",
           *coarse, *prep)
    for shard in sorted((tmp_path / "coarse").glob("*.h5")):
        assert shard.read_bytes() == (tmp_path / "coarse-tree" / shard.name).read_bytes()
    invoke(cityprep, "preprocess", "--datadir", zips, "--out", tmp_path / "fine", *prep)

    invoke(citytrain, "fit", "--data", tmp_path / "coarse", "--out", tmp_path / "stage1",
           "--train-split", "train+train_extra", *FIT)
    stage1 = tmp_path / "stage1" / "checkpoints" / "last.pt"
    invoke(citytrain, "fit", "--data", tmp_path / "fine", "--out", tmp_path / "stage2",
           "--init", stage1, *FIT)
    config = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert config["init"]["checkpoint"] == str(stage1)
    assert json.loads((tmp_path / "stage1" / "config.json").read_text())[
        "steps_per_epoch"] == 4  # 4 train + 4 train_extra samples, batches of 2
