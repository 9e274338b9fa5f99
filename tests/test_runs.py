"""Runs you can find and results nothing overwrites: `citytrain runs`, `--checkpoint RUN`,
evaluate's folders, predict's formats, --version."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main as cityprep
from pipeline.labels import colorize, get_mapping
from train import engine
from train.cli import main as citytrain

FIT = ["--batch-size", "2", "--crop", "32x64", "--width", "4", "--depth", "2", "--amp", "off",
       "--workers", "0", "--device", "cpu", "--no-progress"]
EVAL = ["--workers", "0", "--device", "cpu"]


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(cli, *args) -> str:
    r = invoke(cli, *args)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """runs/done (2 epochs, evaluated), runs/sub/stopped (SIGTERM in epoch 2)."""
    root = tmp_path_factory.mktemp("runs")
    ok(citytrain, "fit", "--data", shards, "--out", root / "done", "--epochs", "2", *FIT)
    real, taken = engine.train_step, []

    def step_then_signal(*args, **kwargs):
        loss = real(*args, **kwargs)
        taken.append(1)
        if len(taken) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    engine.train_step = step_then_signal
    try:
        r = invoke(citytrain, "fit", "--data", shards, "--out", root / "sub" / "stopped",
                   "--epochs", "3", *FIT)
    finally:
        engine.train_step = real
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    return root


def _best(run):
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val_miou"]]
    best = max(rows, key=lambda r: float(r["val_miou"]))
    return float(best["val_miou"]), int(best["epoch"])


@pytest.mark.slow
def test_evaluate_writes_where_checkpoint_and_settings_say_and_never_overwrites(runs, shards):
    run = runs / "done"
    final = (run / "eval-val" / "metrics.json").read_bytes()  # fit's own final evaluation
    out = ok(citytrain, "evaluate", "--checkpoint", run, "--data", shards, *EVAL)
    assert f"wrote {run / 'eval-val-best-whole' / 'metrics.json'}" in out
    metrics = json.loads((run / "eval-val-best-whole" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(run / "checkpoints" / "best.pt")
    r = invoke(citytrain, "evaluate", "--checkpoint", run, "--data", shards, *EVAL)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert (f"Error: {run / 'eval-val-best-whole' / 'metrics.json'}: already there, from an "
            "earlier evaluation; pass --overwrite to replace it, or another --out DIR") in r.output
    ok(citytrain, "evaluate", "--checkpoint", run, "--data", shards, *EVAL, "--overwrite")
    # slide with no --window slides the training crop, into a folder of its own
    ok(citytrain, "evaluate", "--checkpoint", run / "checkpoints" / "last.pt", "--data", shards,
       *EVAL, "--mode", "slide", "--flip")
    slid = json.loads((run / "eval-val-last-slide-flip" / "metrics.json").read_text())
    assert slid["inference"]["window"] == {"height": 32, "width": 64}
    assert (run / "eval-val" / "metrics.json").read_bytes() == final


def test_exported_pngs_are_not_overwritten_either(runs, city, tmp_path):
    ckpt = runs / "done" / "checkpoints" / "last.pt"
    ok(citytrain, "evaluate", "--checkpoint", ckpt, "--datadir", city, "--export-official",
       tmp_path / "pngs", "--out", tmp_path / "a", "--device", "cpu")
    r = invoke(citytrain, "evaluate", "--checkpoint", ckpt, "--datadir", city,
               "--export-official", tmp_path / "pngs", "--out", tmp_path / "b", "--device",
               "cpu")
    assert r.exit_code == 1 and "pass --overwrite to replace it, or another --export-official" \
        in r.output
    assert not (tmp_path / "b").exists()


def test_runs_prints_a_table_of_runs(runs):
    out = ok(citytrain, "runs", runs)
    header, *lines = out.strip().splitlines()
    assert header.split() == ["run", "encoder", "epochs", "best", "mIoU", "at", "last",
                              "evaluation", "mIoU", "iIoU", "cat", "mIoU", "cat", "iIoU", "time",
                              "state"]
    rows = {line.split()[0]: line for line in lines}
    assert set(rows) == {"done", "sub/stopped"}
    best, at = _best(runs / "done")
    done = rows["done"].split()
    assert done[1:5] == ["plain", "2/2", f"{best:.4f}", str(at)]
    newest = max(runs.glob("done/eval-*/metrics.json"), key=lambda p: p.stat().st_mtime)
    scores = json.loads(newest.read_text())
    assert done[5:10] == [newest.parent.name, f"{scores['miou']:.4f}", "-",
                          f"{scores['category_miou']:.4f}", "-"]  # no iIoU at shard resolution
    assert done[-1] == "done"
    assert rows["sub/stopped"].endswith("stopped (SIGTERM)")
    assert rows["sub/stopped"].split()[2] == "1/3"  # one epoch done, stopped in the second

    table = json.loads(ok(citytrain, "runs", runs, "--json"))
    assert [r["run"] for r in table] == ["done", "sub/stopped"]
    assert table[0]["best_miou"] == pytest.approx(best) and table[0]["best_epoch"] == at
    assert table[1]["state"] == "stopped" and table[1]["reason"] == "SIGTERM"


def test_runs_tells_running_from_killed_and_reads_older_runs(runs, tmp_path):
    for name in ("running", "killed", "older"):
        shutil.copytree(runs / "done", tmp_path / name)
    for name, pid in (("running", os.getpid()), ("killed", 2 ** 22 + 12345)):
        status = json.loads((tmp_path / name / "status.json").read_text())
        status.update(state="running", reason=None, pid=pid, host=socket.gethostname())
        (tmp_path / name / "status.json").write_text(json.dumps(status))
    (tmp_path / "older" / "status.json").unlink()  # a run from before status.json
    table = {r["run"]: r for r in json.loads(ok(citytrain, "runs", tmp_path, "--json"))}
    assert table["running"]["state"] == "running"
    assert (table["killed"]["state"], table["killed"]["reason"]) == \
        ("stopped", "killed (its process is gone)")
    assert (table["older"]["state"], table["older"]["epoch"]) == ("done", 2)
    assert ok(citytrain, "runs", tmp_path / "older").count("\n") == 2  # a run itself: one row
    assert "no runs" in ok(citytrain, "runs", tmp_path / "older" / "checkpoints")


def test_checkpoint_run_dir_means_its_best(runs, shards, tmp_path):
    r = invoke(citytrain, "predict", "--checkpoint", shards, "--input", shards, "--out",
               tmp_path / "p", "--device", "cpu")
    assert r.exit_code == 1 and "a shard folder, not a run: pass it as --data" in r.output
    run = tmp_path / "nobest"
    shutil.copytree(runs / "done", run)
    (run / "checkpoints" / "best.pt").unlink()
    r = invoke(citytrain, "evaluate", "--checkpoint", run, "--data", shards, *EVAL)
    assert r.exit_code == 1 and (f"a run without best.pt (no validation has scored it yet); "
                                 f"pass --checkpoint {run / 'checkpoints' / 'last.pt'}") in r.output


def test_predict_writes_color_trainid_or_labelid(runs, city, tmp_path):
    val = city / "leftImg8bit" / "val"
    image = sorted(val.rglob("*.png"))[0]
    stem = image.name[:-4]
    ok(citytrain, "predict", "--checkpoint", runs / "done", "--input", val, "--out",
       tmp_path / "color", "--device", "cpu")
    ok(citytrain, "predict", "--checkpoint", runs / "done", "--input", val, "--out",
       tmp_path / "ids", "--device", "cpu", "--format", "trainid")
    out = ok(citytrain, "predict", "--checkpoint", runs / "done", "--input", val, "--out",
             tmp_path / "labels", "--device", "cpu", "--format", "labelid")
    assert "wrote 4 labelid PNGs" in out
    city_dir = image.parent.name  # a folder per city, as the input has them
    assert sorted(p.name for p in (tmp_path / "ids" / city_dir).iterdir())[0].endswith(
        "_trainid.png")
    ids = np.array(Image.open(tmp_path / "ids" / city_dir / f"{stem}_trainid.png"))
    mask = np.array(Image.open(tmp_path / "color" / city_dir / f"{stem}_mask.png"))
    trainid = get_mapping("trainid")
    assert ids.shape == mask.shape[:2] == np.array(Image.open(image)).shape[:2]
    assert np.array_equal(colorize(ids, trainid.palette), mask)
    labels = np.array(Image.open(tmp_path / "labels" / city_dir / f"{stem}_labelid.png"))
    assert np.array_equal(labels, trainid.export_ids[ids])


def test_both_clis_say_their_version():
    from importlib import metadata

    version = metadata.version("cityseg")
    assert ok(citytrain, "--version").strip() == f"citytrain, version {version}"
    assert ok(cityprep, "--version").strip() == f"cityprep, version {version}"


@pytest.mark.parametrize("command, flag", [("evaluate", "--overwrite"), ("predict", "--format"),
                                           ("runs", "--json"), ("evaluate", "--checkpoint"),
                                           ("predict", "--checkpoint")])
def test_help_explains_the_new_options(command, flag):
    out = ok(citytrain, command, "--help")
    line = next(x for x in out.splitlines() if x.strip().startswith(flag + " "))
    assert len(line.split(flag, 1)[1].strip()) > 10, line  # an explanation, not just the flag
