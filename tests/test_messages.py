"""What the commands say: errors that point the right way, one error prefix, the end and every
stop of a run said out loud, logs that read in a file."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import time

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import progress
from pipeline.cli import main as cityprep
from train import engine, preflight
from train import fit as fit_module
from train.cli import main as citytrain
from train.config import Config

FIT = ["--batch-size", "2", "--crop", "32x64", "--width", "4", "--depth", "2", "--amp", "off",
       "--workers", "0", "--device", "cpu", "--no-progress"]


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def fails(cli, *args, code: int = 1) -> str:
    """A command that must fail with one `Error:` line and no traceback; returns that line."""
    r = invoke(cli, *args)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, r.output
    return errors[0]


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("messages") / "run"
    result = invoke(citytrain, "fit", "--data", shards, "--out", out, "--epochs", "2", *FIT)
    assert result.exit_code == 0, result.output
    return out


# -- errors that point the right way ----------------------------------------------------------

@pytest.mark.slow
def test_a_cityscapes_tree_given_as_data_names_the_preprocess_to_run(run, city, tmp_path):
    line = fails(citytrain, "fit", "--data", city, "--out", tmp_path / "r", "--epochs", "1",
                 *FIT)
    assert line == (f"Error: {city}: a Cityscapes tree (leftImg8bit/, gtFine/), not shards; "
                    f"make shards from it with `cityprep preprocess --datadir {city} --out "
                    "data_cache/cityscapes-1024x512` and use data_cache/cityscapes-1024x512 "
                    "instead")
    assert not (tmp_path / "r").exists()
    assert "a Cityscapes tree" in fails(cityprep, "verify", city)
    assert "a Cityscapes tree" in fails(citytrain, "evaluate", "--checkpoint",
                                        run / "checkpoints" / "last.pt", "--data", city)


def test_shards_given_as_datadir_say_to_pass_them_as_data(run, shards, tmp_path):
    expected = (f"{shards}: holds shards (manifest.json from `cityprep preprocess`), not the "
                f"Cityscapes originals: shards go to citytrain as --data {shards}")
    line = fails(citytrain, "evaluate", "--checkpoint", run / "checkpoints" / "last.pt",
                 "--datadir", shards, "--device", "cpu")
    assert expected in line and "--submit" not in line
    assert expected in fails(cityprep, "preprocess", "--datadir", shards, "--out", tmp_path / "o")


def test_other_confusable_inputs(run, shards, tmp_path):
    assert "a file, not a shard folder; pass its folder" in fails(
        citytrain, "fit", "--data", shards / "train-00000.h5", "--out", tmp_path / "r", *FIT)
    assert f"--out {shards} holds shards (manifest.json): a run needs a folder of its own" in \
        fails(citytrain, "fit", "--data", shards, "--out", shards, "--epochs", "1", *FIT)
    assert not (shards / "checkpoints").exists()
    assert "holds shards, not images: predict reads image files" in fails(
        citytrain, "predict", "--checkpoint", run / "checkpoints" / "last.pt", "--input",
        shards, "--out", tmp_path / "p", "--device", "cpu")
    assert "a folder; a shard is one {split}-00000.h5 file in it" in fails(
        cityprep, "inspect-shard", shards)


def test_both_clis_print_one_error_prefix(tmp_path):
    assert fails(cityprep, "verify", tmp_path / "nowhere").startswith("Error: ")
    assert fails(citytrain, "fit", "--data", tmp_path / "nowhere", "--out", tmp_path / "r",
                 *FIT).startswith("Error: ")
    # click's own usage errors read the same
    assert fails(cityprep, "preprocess", "--bogus", code=2).startswith("Error: ")
    assert fails(citytrain, "fit", "--bogus", code=2).startswith("Error: ")


# -- said out loud ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def said(shards, tmp_path_factory):
    """A finished run and what its fit printed."""
    out = tmp_path_factory.mktemp("said") / "run"
    result = invoke(citytrain, "fit", "--data", shards, "--out", out, "--epochs", "2", *FIT)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_the_end_of_fit_says_the_final_scores_where_they_are_and_why_it_stopped(said):
    out, output = said
    metrics = json.loads((out / "eval-val" / "metrics.json").read_text())
    final = next(ln for ln in output.splitlines() if ln.startswith("final evaluation"))
    assert final == (f"final evaluation (val, 4 images at shard resolution, whole): mIoU "
                     f"{metrics['miou']:.4f}, iIoU n/a, category mIoU "
                     f"{metrics['category_miou']:.4f}, category iIoU n/a, pixel acc "
                     f"{metrics['pixel_acc']:.4f}; wrote {out / 'eval-val' / 'metrics.json'}, "
                     "confusion.png, iou.png")
    assert "iIoU needs the originals' instance ids" in output
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["val_miou"]))
    done = output.strip().splitlines()[-1]
    assert done.startswith("done (2 epochs): 2/2 epochs, step 6, ")
    assert done.endswith(f"; best val mIoU {float(best['val_miou']):.4f} at epoch "
                         f"{best['epoch']} ({out / 'checkpoints' / 'best.pt'})")
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["reason"], status["epoch"], status["epochs"]) == \
        ("done", "epochs", 2, 2)


def test_resuming_a_finished_run_says_so_and_its_best(said, shards):
    out, _ = said
    before = {p: p.stat().st_mtime_ns for p in (out / "config.json", out / "metrics.csv",
                                                 out / "checkpoints" / "last.pt")}
    r = invoke(citytrain, "fit", "--data", shards, "--out", out, "--epochs", "2", *FIT,
               "--resume")
    assert r.exit_code == 0, r.output
    assert f"{out}: this run is finished (2/2 epochs done); best val mIoU " in r.output
    assert "nothing to train: resume with --epochs above 2 to train on" in r.output
    assert "resuming" not in r.output
    assert before == {p: p.stat().st_mtime_ns for p in before}  # nothing rewritten


@pytest.mark.slow
def test_a_time_limit_stop_says_so(shards, tmp_path):
    r = invoke(citytrain, "fit", "--data", shards, "--out", tmp_path / "r", "--epochs", "5",
               "--time-limit", "0.001", *FIT)
    assert r.exit_code == 0, r.output
    assert "done (--time-limit 0.001 s reached): 0/5 epochs, step 1, " in r.output
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert (status["state"], status["reason"]) == ("done", "time limit")


def _signal_at(monkeypatch, *steps):
    real, taken = engine.train_step, []

    def step_then_signal(*args, **kwargs):
        loss = real(*args, **kwargs)
        taken.append(1)
        if len(taken) in steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(engine, "train_step", step_then_signal)


@pytest.mark.slow
def test_a_signal_is_acknowledged_at_once_and_the_stop_says_where(shards, tmp_path, monkeypatch,
                                                                  capfd):
    _signal_at(monkeypatch, 2)
    r = invoke(citytrain, "fit", "--data", shards, "--out", tmp_path / "r", "--epochs", "3",
               *FIT)
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    assert ("stopped by SIGTERM in epoch 1/3, batch 2/3 (0 done), step 2, " in r.output
            and f"; saved {last}; continue with --resume" in r.output)
    said_at_once = capfd.readouterr().err  # written by the handler itself, during the step
    assert "SIGTERM: stopping after the step in progress, then saving the checkpoint" in \
        said_at_once
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert (status["state"], status["reason"], status["step"]) == ("stopped", "SIGTERM", 2)
    # resumed, the same numbering: the epoch in progress, counted from 1
    monkeypatch.undo()
    r = invoke(citytrain, "fit", "--data", shards, "--out", tmp_path / "r", "--epochs", "3",
               *FIT, "--resume")
    assert r.exit_code == 0, r.output
    assert f"resuming {last} at step 2: epoch 1/3, batch 2/3 (0 done)" in r.output


@pytest.mark.slow
def test_a_signal_in_the_last_step_skips_the_final_evaluation_and_says_so(shards, tmp_path,
                                                                         monkeypatch):
    _signal_at(monkeypatch, 6)  # the last step of epoch 2 of 2
    r = invoke(citytrain, "fit", "--data", shards, "--out", tmp_path / "r", "--epochs", "2",
               *FIT)
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert "stopped by SIGTERM after epoch 2/2, step 6, " in r.output
    assert "epoch 2/2 step 6: loss" in r.output  # its validation was done and logged
    assert not (tmp_path / "r" / "eval-val").exists() and "final evaluation" not in r.output


@pytest.mark.slow
def test_a_slow_cpu_step_gets_its_run_estimated_first(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "SLOW_STEP_S", 0.0)
    r = invoke(citytrain, "fit", "--data", shards, "--out", tmp_path / "r", "--epochs", "4",
               "--time-limit", "3600", *FIT[:-1], "--preflight")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("preflight: on the CPU"))
    assert re.fullmatch(r"preflight: on the CPU one step \(batch 2\) takes about \d+s "
                        r"\(timed\): about \S+ per epoch of 3 steps, \S+ for 4 epochs; "
                        r"--time-limit 3600 s stops it after about \d+ steps\. Faster: a GPU, "
                        r"--amp bf16, a smaller --crop, --batch-size or model", line), line
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["preflight"]["step_s"] > 0


def test_the_estimate_adds_up():
    cfg = Config(epochs=10, batch_size=8, time_limit=600.0, amp="bf16")
    text = preflight.time_estimate(180.0, 15, cfg)
    assert text.startswith("preflight: on the CPU one step (batch 8) takes about 3m00s "
                           "(timed): about 45m00s per epoch of 15 steps, 7h30m for 10 epochs; "
                           "--time-limit 600 s stops it after about 3 steps.")
    assert "--amp bf16" not in text


# -- logs -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_log_file_gets_lines_not_carriage_returns(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line at every sync
    r = invoke(citytrain, "fit", "--data", shards, "--out", tmp_path / "r", "--epochs", "2",
               *FIT[:-1], "--progress", "--log-every", "1")
    assert r.exit_code == 0, r.output
    assert "\r" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("epoch 2/2: ")]
    assert [ln.split(" [")[0] for ln in lines] == ["epoch 2/2: 0/3", "epoch 2/2: 1/3",
                                                   "epoch 2/2: 2/3", "epoch 2/2: 3/3"]
    assert "loss=" in lines[-1] and "img_s=" in lines[-1] and "wait=" in lines[-1]
    # the loader's start-up is said once, and is not data wait
    assert r.output.count("loader: first batch after ") == 1
    assert "(its workers starting up; left out of the data wait)" in r.output


@pytest.mark.slow
def test_the_first_batch_wait_is_no_data_wait(make_dataset, tmp_path, monkeypatch):
    """A loader whose first batch takes long (workers starting) reports no data wait."""
    from pipeline import loader as loader_module

    real = loader_module.build_loader

    class SlowStart:  # the first batch of the first pass waits, as workers starting up do
        def __init__(self, loader):
            self.loader, self.first = loader, True

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            first, self.first = self.first, False

            def batches():
                if first:
                    time.sleep(1.0)
                yield from self.loader

            return batches()

    def slow_start(*args, **kwargs):
        loader = real(*args, **kwargs)
        return SlowStart(loader) if kwargs.get("train") else loader

    monkeypatch.setattr(fit_module, "build_loader", slow_start)
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 64, 3), dtype=np.uint8)
    labels = np.zeros((4, 32, 64), np.uint8)
    data = make_dataset({"train": (images, labels, [f"a_000000_00000{i}" for i in range(4)])})
    row = fit_module.fit(Config(data=str(data), out=str(tmp_path / "r"), epochs=1,
                                batch_size=4, crop=(32, 64), width=4, depth=2, amp="off",
                                workers=0, device="cpu", progress=False, preflight=False))
    assert row["data_wait_fraction"] < 0.5
