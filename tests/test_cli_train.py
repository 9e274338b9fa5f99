"""`citytrain` as a user types it: the run directory, metrics.json, predictions, bench, errors."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from helpers import FIT, citytrain, fails
from PIL import Image

from pipeline.photometric import normalize
from pipeline.shards import open_shard, read_names, split_shards
from train.checkpoint import load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = citytrain("fit", "--data", shards, "--out", out, *FIT)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_fit_writes_the_run_directory(run, shards):
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["width"] == 4
    assert config["config"]["crop"] == {"height": 32, "width": 64}
    assert config["data"]["manifest_config"]["size"] == {"height": 64, "width": 128}
    assert config["data"]["samples"] == {"train": 6, "val": 4}
    assert config["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    with open(run / "metrics.csv") as f:
        reader = csv.reader(f)
        header, *rows = list(reader)
    assert header == ["epoch", "step", "lr", "train_loss", "val_loss", "val_miou", "pixel_acc",
                      "images_per_s", "data_wait_fraction"]
    assert [(r[0], r[1]) for r in rows] == [("1", "3"), ("2", "6")]  # 6 images / batch 2
    assert all(0 <= float(r[5]) <= 1 and 0 <= float(r[8]) <= 1 for r in rows)
    assert list(run.glob("events.out.tfevents.*"))
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.pt", "best.pt"}
    for epoch in (1, 2):
        grid = Image.open(run / "predictions" / f"epoch_{epoch:03d}" / "val.png")
        assert grid.size == (3 * 128, 4 * 64)  # image | truth | prediction, 4 val samples


def test_evaluate_writes_metrics_that_match_a_hand_computed_confusion(run, shards):
    ckpt = run / "checkpoints" / "last.pt"
    result = citytrain("evaluate", "--checkpoint", ckpt, "--data", shards, "--workers", "0",
                       "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "wrote " + str(run / "eval-val-last-whole" / "metrics.json") in result.output
    metrics = json.loads((run / "eval-val-last-whole" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["resolution"] == "shard"
    assert metrics["images"] == 4

    state = load_checkpoint(ckpt)
    model = model_from_checkpoint(state, ckpt)
    k = len(state["classes"])
    mat = np.zeros((k, k), np.int64)
    for path, _ in split_shards(shards, json.loads((shards / "manifest.json").read_text()),
                                "val"):
        with open_shard(path) as f, torch.no_grad():
            pred = model(normalize(f["image"][()], state["mean"], state["std"], "cpu"))
            pred, label = pred.argmax(1).numpy().ravel(), f["label"][()].ravel()
        keep = label != 255
        np.add.at(mat, (label[keep], pred[keep]), 1)
    for c, name in enumerate(state["classes"]):
        union = mat[c].sum() + mat[:, c].sum() - mat[c, c]
        expected = None if union == 0 else mat[c, c] / union
        assert metrics["iou"][name] == pytest.approx(expected), name
    present = [v for v in metrics["iou"].values() if v is not None]
    assert metrics["miou"] == pytest.approx(np.mean(present))
    assert metrics["pixel_acc"] == pytest.approx(np.trace(mat) / mat.sum())
    assert set(metrics["category_iou"]) == set(state["categories"])
    assert "mIoU" in result.output


def test_evaluate_exports_official_pngs_at_full_resolution(run, shards, city, tmp_path):
    result = citytrain("evaluate", "--checkpoint", run / "checkpoints" / "last.pt", "--data",
                       shards, "--out", tmp_path / "ev", "--export-official", tmp_path / "pngs",
                       "--datadir", city, "--device", "cpu")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["resolution"] == "full" and metrics["images"] == 4
    manifest = json.loads((shards / "manifest.json").read_text())
    names = []
    for path, _ in split_shards(shards, manifest, "val"):
        with open_shard(path) as f:
            names += read_names(f)
    pngs = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert pngs == sorted(f"{n}_pred.png" for n in names)
    assert Image.open(tmp_path / "pngs" / pngs[0]).size == (256, 128)  # the originals' size


def test_predict_writes_masks_and_overlays_at_the_inputs_size(run, city, tmp_path):
    inputs = sorted((city / "leftImg8bit" / "val").rglob("*.png"))
    result = citytrain("predict", "--checkpoint", run / "checkpoints" / "best.pt", "--input",
                       inputs[0], "--input", inputs[1], "--out", tmp_path / "p", "--device",
                       "cpu")
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert written == sorted(f"{p.stem}_{kind}.png" for p in inputs[:2]
                             for kind in ("mask", "overlay"))
    assert Image.open(tmp_path / "p" / written[0]).size == Image.open(inputs[0]).size


def test_bench_reports_throughput_and_mfu(tmp_path):
    per_image = []
    for batch in (1, 2):
        out = tmp_path / f"b{batch}.json"
        result = citytrain("bench", "--crop", "16x32", "--batch-size", batch, "--width", "4",
                           "--depth", "2", "--steps", "2", "--warmup-steps", "1", "--amp", "off",
                           "--device", "cpu", "--peak-tflops", "0.5", "--json", out)
        assert result.exit_code == 0, result.output
        assert "images/s" in result.output and "MFU" in result.output
        report = json.loads(out.read_text())
        assert report["images_per_s"] > 0 and report["peak_memory_mb"] > 0
        assert report["mfu"] == pytest.approx(report["achieved_tflops"] / 0.5)
        per_image.append(report["gflops_per_image"])
    assert per_image[0] == pytest.approx(per_image[1]) and per_image[0] > 0


# -- bad input: one clear line and a non-zero exit ---------------------------------------------

def test_fit_without_a_data_folder_names_it(tmp_path):
    out = fails("fit", "--data", tmp_path / "nowhere", "--out", tmp_path / "r", *FIT)
    assert "nowhere: no such data folder" in out
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_fit_on_shards_of_another_format_version_names_the_shard(shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    with h5py.File(old / "train-00000.h5", "r+") as f:
        f.attrs["format_version"] = 2
    out = fails("fit", "--data", old, "--out", tmp_path / "r", *FIT)
    assert "train-00000.h5: shard format_version 2" in out


def test_resume_with_another_architecture_is_refused(run, shards, tmp_path):
    shutil.copytree(run, tmp_path / "r")
    args = [a if a != "4" else "8" for a in FIT]  # --width 8 (and --epochs stays 2)
    out = fails("fit", "--data", shards, "--out", tmp_path / "r", *args, "--resume")
    assert "another architecture" in out and "width=4" in out and "width=8" in out


def test_evaluate_on_data_with_other_classes_is_refused(run, make_dataset):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 64, 128, 3), np.uint8)
    labels = rng.integers(0, 4, (2, 64, 128), np.uint8)
    seed4 = make_dataset({"val": (images, labels, ["a_000000_000019", "a_000001_000019"])},
                         mapping="seed4")
    out = fails("evaluate", "--checkpoint", run / "checkpoints" / "last.pt", "--data", seed4,
                "--device", "cpu")
    assert "predicts 19 classes" in out and "has 4 (background, road, sky, car)" in out


def test_evaluate_with_a_file_that_is_no_checkpoint(shards, tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_text("hello")
    out = fails("evaluate", "--checkpoint", bogus, "--data", shards)
    assert "model.pt: not a readable checkpoint" in out
    out = fails("evaluate", "--checkpoint", bogus, "--data", shards, "--export-official",
                tmp_path / "x", code=2)
    assert "--export-official needs --datadir" in out
