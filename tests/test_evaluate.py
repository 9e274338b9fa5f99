"""`citytrain evaluate` as the benchmark does it: every rank, full resolution, sliding windows
and TTA, a test-server zip, pictures; and the evaluation that ends `citytrain fit`."""

from __future__ import annotations

import json
import os
import re
import zipfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from helpers import CITY_SIZE, SHARD_SIZE, free_port
from PIL import Image

from pipeline.labels import get_mapping
from pipeline.preprocess import preprocess
from pipeline.sizes import wh
from pipeline.synth import synthesize
from train.cli import main
from train.evaluation.pictures import confusion_image, iou_image, ramp_color
from train.evaluation.results import metrics_text

FIT = ["--epochs", "2", "--batch-size", "2", "--crop", "32x64", "--width", "4", "--depth", "2",
       "--amp", "off", "--optimizer", "adamw", "--lr", "1e-2", "--workers", "0", "--device",
       "cpu", "--no-progress"]
SLIDE = ["--mode", "slide", "--window", "32x64", "--stride", "16x32", "--flip"]
TRAINID = get_mapping("trainid")


def citytrain(*args) -> object:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def fails(*args, code: int = 1) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    """A tiny model trained on the session's shards; its final evaluation slides and flips."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    citytrain("fit", "--data", shards, "--out", out, *FIT, "--eval-mode", "slide",
              "--eval-window", "32x64", "--eval-stride", "16x32", "--eval-flip")
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """5 val frames (2 + 3 across two ranks) with their shards, and 3 test frames (1 + 2)."""
    root = tmp_path_factory.mktemp("uneven")
    synthesize(root / "city", train=0, val=5, test=3, size=CITY_SIZE, seed=1)
    preprocess(root / "city", root / "shards", splits=("val",), size=SHARD_SIZE,
               mapping="trainid", shard_size=2, workers=1, progress=False)
    return root / "city", root / "shards"


def _rank(rank: int, world: int, commands: list[tuple[int, list[str]]]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)  # two processes share the cores
    for port, args in commands:
        os.environ["MASTER_PORT"] = str(port)
        main(args, standalone_mode=False)


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (x is None and y is None) or (not isinstance(x, float) and x == y)
        or (isinstance(x, float) and y is not None and abs(x - y) <= 1e-12 * max(1.0, abs(y)))
        for x, y in ((a[k], b[k]) for k in a))


def _scores(path) -> dict:
    m = json.loads(path.read_text())
    return {k: v for k, v in m.items()
            if k not in ("seconds", "images_per_s", "export_official", "checkpoint")}


@pytest.mark.slow
def test_two_ranks_score_exactly_what_one_process_scores(run, uneven, tmp_path):
    city, data = uneven
    ckpt = run / "checkpoints" / "last.pt"

    def commands(tag: str) -> list[list[str]]:
        base = ["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"]
        return [
            base + ["--data", str(data), "--batch-size", "2", "--workers", "0", *SLIDE,
                    "--out", str(tmp_path / tag / "shard")],
            base + ["--datadir", str(city), "--export-official", str(tmp_path / tag / "pngs"),
                    "--out", str(tmp_path / tag / "full"), "--scales", "0.75,1.0"],
            base + ["--datadir", str(city), "--split", "test", "--submit",
                    str(tmp_path / tag / "test.zip")],
        ]

    for args in commands("one"):
        citytrain(*args)
    mp.spawn(_rank, args=(2, [(free_port(), a) for a in commands("two")]), nprocs=2)

    for kind, images in (("shard", 5), ("full", 5)):
        one, two = _scores(tmp_path / "one" / kind / "metrics.json"), \
            _scores(tmp_path / "two" / kind / "metrics.json")
        assert one["images"] == two["images"] == images
        assert two["confusion"] == one["confusion"]  # no image twice, none left out
        assert two.keys() == one.keys()
        for key, value in one.items():  # floats: summed in another order, to the last bits
            if isinstance(value, dict) and key != "inference":
                assert close(two[key], value), (kind, key)
            elif key != "inference":
                assert close({key: two[key]}, {key: value}), (kind, key)
    full = _scores(tmp_path / "two" / "full" / "metrics.json")
    assert full["resolution"] == "full" and full["iiou"] is not None
    assert full["inference"]["scales"] == [0.75, 1.0]
    shard = _scores(tmp_path / "two" / "shard" / "metrics.json")
    assert shard["iiou"] is None and shard["inference"]["mode"] == "slide"
    # each rank wrote its own PNGs; together exactly the split, as one process writes them
    names = sorted(p.name for p in (tmp_path / "one" / "pngs").iterdir())
    assert len(names) == 5 and sorted(p.name for p in (tmp_path / "two" / "pngs").iterdir()) \
        == names
    for name in names:
        assert (tmp_path / "two" / "pngs" / name).read_bytes() == \
            (tmp_path / "one" / "pngs" / name).read_bytes()
    with zipfile.ZipFile(tmp_path / "one" / "test.zip") as a, \
            zipfile.ZipFile(tmp_path / "two" / "test.zip") as b:
        assert a.namelist() == b.namelist() and len(a.namelist()) == 3
        assert all(a.read(n) == b.read(n) for n in a.namelist())


def test_submission_zip_holds_one_labelid_png_per_test_image(run, uneven, tmp_path):
    city, _ = uneven
    assert not (city / "gtFine" / "test").exists()  # nothing to read a label from
    ckpt = run / "checkpoints" / "last.pt"
    out = citytrain("evaluate", "--checkpoint", ckpt, "--datadir", city, "--split", "test",
                    "--submit", tmp_path / "results.zip", "--device", "cpu", *SLIDE).output
    assert "wrote" in out and "3 labelId PNGs" in out
    stems = sorted(p.name[: -len("_leftImg8bit.png")]
                   for p in (city / "leftImg8bit" / "test").rglob("*.png"))
    with zipfile.ZipFile(tmp_path / "results.zip") as z:
        assert z.namelist() == [f"{s}_pred.png" for s in stems]
        for name in z.namelist():
            with Image.open(z.open(name)) as png:
                assert png.mode == "L" and png.size == wh(CITY_SIZE)  # the originals' size
                assert set(np.unique(np.asarray(png))) <= set(TRAINID.export_ids[:19].tolist())
    assert [p.name for p in tmp_path.iterdir()] == ["results.zip"]  # no temporaries left
    # the zip holds the very PNGs --export-official writes for a split
    citytrain("evaluate", "--checkpoint", ckpt, "--datadir", city, "--submit",
              tmp_path / "val.zip", "--device", "cpu")
    citytrain("evaluate", "--checkpoint", ckpt, "--datadir", city, "--export-official",
              tmp_path / "pngs", "--out", tmp_path / "ev", "--device", "cpu")
    with zipfile.ZipFile(tmp_path / "val.zip") as z:
        assert sorted(z.namelist()) == sorted(p.name for p in (tmp_path / "pngs").iterdir())
        assert all(z.read(n) == (tmp_path / "pngs" / n).read_bytes() for n in z.namelist())


def test_a_failed_submission_leaves_no_zip(run, uneven, tmp_path):
    city, _ = uneven
    broken = tmp_path / "city"
    for p in (city / "leftImg8bit" / "test").rglob("*.png"):
        target = broken / p.relative_to(city)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    bad = sorted((broken / "leftImg8bit" / "test").rglob("*.png"))[-1]
    bad.write_bytes(bad.read_bytes()[:2000])
    out = fails("evaluate", "--checkpoint", run / "checkpoints" / "last.pt", "--datadir",
                broken, "--split", "test", "--submit", tmp_path / "z" / "results.zip",
                "--device", "cpu")
    assert f"{bad}: corrupt or truncated PNG" in out
    assert not (tmp_path / "z").exists() or not list((tmp_path / "z").iterdir())


def test_fit_ends_with_the_evaluation_citytrain_evaluate_writes(run, shards, tmp_path):
    final = json.loads((run / "eval-val" / "metrics.json").read_text())
    assert final["inference"] == {"mode": "slide", "window": {"height": 32, "width": 64},
                                  "stride": {"height": 16, "width": 32}, "scales": [1.0],
                                  "flip": True, "max_windows": 4, "amp": "off",
                                  "model_size": {"height": 64, "width": 128}}
    assert {p.name for p in (run / "eval-val").iterdir()} == {"metrics.json", "confusion.png",
                                                             "iou.png"}
    citytrain("evaluate", "--checkpoint", run / "checkpoints" / "last.pt", "--data", shards,
              "--out", tmp_path / "again", "--workers", "0", "--device", "cpu", *SLIDE)
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["confusion"] == final["confusion"] and again["miou"] == final["miou"]
    plain = citytrain("evaluate", "--checkpoint", run / "checkpoints" / "last.pt", "--data",
                      shards, "--out", tmp_path / "plain", "--workers", "0", "--device", "cpu")
    assert "iIoU needs the instance ids" in plain.output
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert plain["confusion"] != final["confusion"]  # the windows and the flip did something
    assert plain["inference"]["mode"] == "whole"
    # and TensorBoard got the pictures at each validation
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert {"val/confusion", "val/iou"} <= set(events.Tags()["images"])
    assert len(events.Images("val/confusion")) == 2  # two epochs


def test_metrics_json_reads_as_json_with_the_four_scores_first(run):
    text = (run / "eval-val" / "metrics.json").read_text()
    metrics = json.loads(text)
    assert list(metrics)[:8] == ["split", "resolution", "images", "miou", "iiou",
                                 "category_miou", "category_iiou", "pixel_acc"]
    assert len(metrics["confusion"]) == 19 and text.count("\n") < 120  # a line per row
    assert json.loads(metrics_text(metrics)) == metrics


def test_predict_slides_and_flips_at_the_inputs_size(run, uneven, tmp_path):
    city, _ = uneven
    image = sorted((city / "leftImg8bit" / "test").rglob("*.png"))[0]
    citytrain("predict", "--checkpoint", run / "checkpoints" / "last.pt", "--input", image,
              "--out", tmp_path / "p", "--device", "cpu", *SLIDE, "--scales", "1,1.5")
    mask = Image.open(tmp_path / "p" / f"{image.stem}_mask.png")
    assert mask.size == wh(CITY_SIZE)


def test_confusion_and_iou_pictures_show_the_numbers():
    classes = ["road", "sky", "car"]
    mat = np.array([[90, 10, 0], [0, 50, 0], [0, 0, 0]])  # car absent from the truth
    picture = confusion_image(mat, classes)
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert ramp_color(1.0) in colours  # sky: all its pixels right
    assert ramp_color(0.9) in colours and ramp_color(0.1) in colours  # road: 90 % / 10 %
    assert (236, 236, 236) in colours  # car's row: grey, nothing to normalize
    assert picture.shape[0] > 3 * 34 and picture.shape[1] > 3 * 34
    bars = iou_image({"road": 0.9, "sky": 0.5, "car": None}, TRAINID.palette[[0, 10, 13]],
                     classes)
    colours = {tuple(c) for c in bars.reshape(-1, 3)}
    road, sky, car = (tuple(int(v) for v in TRAINID.palette[i]) for i in (0, 10, 13))
    assert road in colours and sky in colours and car not in colours  # no bar without IoU
    # the longer bar is the better class's
    width = {c: int((bars == np.array(c)).all(-1).sum(1).max()) for c in (road, sky)}
    assert width[road] > width[sky] * 1.6


def test_a_submission_needs_the_official_classes(tmp_path):
    from train.checkpoint import CheckpointError
    from train.evaluation.evaluate import _benchmark_classes

    _benchmark_classes(TRAINID, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt: predicts 4 classes of mapping 'seed4'; "
                                              "the benchmark server scores the 19 official"):
        _benchmark_classes(get_mapping("seed4"), tmp_path / "c.pt")


def test_usage_errors(run, shards, uneven, tmp_path):
    city, _ = uneven
    ckpt = run / "checkpoints" / "last.pt"
    assert "--submit needs --datadir" in fails("evaluate", "--checkpoint", ckpt, "--data",
                                               shards, "--submit", tmp_path / "z.zip", code=2)
    assert "covers the whole image the model sees" in fails(
        "evaluate", "--checkpoint", ckpt, "--data", shards, "--mode", "slide", "--window",
        "64x128")
    assert "pass --data (shards) or --datadir" in fails("evaluate", "--checkpoint", ckpt,
                                                        code=2)
    assert "--eval-window and --eval-stride need --eval-mode slide" in fails(
        "fit", "--data", shards, "--out", tmp_path / "r", *FIT, "--eval-window", "32x64",
        code=2)
    assert not (tmp_path / "r").exists()
    assert "expected HxW" in fails("evaluate", "--checkpoint", ckpt, "--datadir", city,
                                   "--mode", "slide", "--window", "32", code=2)
    out = fails("evaluate", "--checkpoint", ckpt, "--datadir", city, "--split", "test")
    assert "gtFine/test: no labels to score the test split against" in out and "--submit" in out


@pytest.mark.parametrize("command, flags", [
    ("evaluate", ["--datadir", "--export-official", "--submit", "--mode", "--window",
                  "--stride", "--scales", "--flip", "--max-windows"]),
    ("predict", ["--mode", "--window", "--stride", "--scales", "--flip", "--max-windows",
                 "--amp"]),
    ("fit", ["--eval-mode", "--eval-window", "--eval-stride", "--eval-scales", "--eval-flip"]),
    ("bench-inference", ["--size", "--width", "--depth", "--window", "--stride", "--scales",
                         "--images", "--warmup", "--max-windows", "--amp", "--device"]),
    ("compare-official", ["--datadir", "--predictions", "--split", "--device"]),
])
def test_help_explains_every_new_option(command, flags):
    out = citytrain(command, "--help").output
    for flag in flags:
        line = next(x for x in out.splitlines() if x.strip().startswith(flag + " ")
                    or x.strip() == flag)
        words = re.split(r"\s{2,}", line.strip())  # option, then its help
        assert len(words) >= 2 and re.match(r"[A-Za-z]", words[1]), (command, flag, line)
