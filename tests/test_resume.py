"""A run remembers itself and a relaunch continues it: --resume takes the run's settings and
refuses another recipe, --resume auto, --config, --init's architecture, effective values in
config.json, step checkpoints that a crash resumes from exactly, saves a kill cannot tear."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from helpers import FIT, REPO, blocks, citytrain, fails, tiny

from train import engine
from train.checkpoint import load_checkpoint
from train.config import (
    ARCH_FIELDS,
    SESSION_FIELDS,
    Config,
    TrainingError,
    read_config_file,
    resumed,
)
from train.fit import fit


def _rows(run) -> list[dict]:
    with open(run / "metrics.csv") as f:  # timings differ between runs, nothing else may
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait_fraction")}
                for r in csv.DictReader(f)]


def _config(run) -> dict:
    return json.loads((run / "config.json").read_text())


def _option(args: list, name: str, value) -> list:
    """FIT with `name`'s value replaced."""
    args = list(args)
    args[args.index(name) + 1] = value
    return args


# -- the settings of a resumed run, from its checkpoint ---------------------------------------

@pytest.mark.slow
def test_resume_takes_every_setting_from_the_run(shards, tmp_path):
    run = tmp_path / "run"
    first = citytrain("fit", "--data", shards, "--out", run, *_option(FIT, "--epochs", "1"),
                      "--upsample", "transpose", "--seed", "3", "--save-every", "0")
    assert first.exit_code == 0, first.output
    # nothing retyped but the new length: the width, crop, optimizer... are the run's
    again = citytrain("fit", "--out", run, "--resume", "--epochs", "2", "--no-progress")
    assert again.exit_code == 0, again.output
    assert "resuming" in again.output and "at step 3: epoch 2/2 (1 done)" in again.output
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (2, 6)
    assert state["arch"]["width"] == 4 and state["arch"]["upsample"] == "transpose"
    config = _config(run)["config"]
    assert (config["width"], config["crop"], config["optimizer"], config["seed"]) == \
        (4, {"height": 32, "width": 64}, "adamw", 3)
    assert config["epochs"] == 2 and config["save_every"] == 0
    assert config["data"] == os.path.abspath(shards)  # the run's own, absolute
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]


@pytest.mark.slow
def test_resume_refuses_another_recipe_naming_both_values(shards, tmp_path):
    run = tmp_path / "run"
    assert citytrain("fit", "--data", shards, "--out", run,
                     *_option(FIT, "--epochs", "1")).exit_code == 0
    out = fails("fit", "--out", run, "--resume", "--epochs", "2", "--lr", "0.5", "--crop",
                "16x32")
    assert "the run was trained with --crop 32x64 --lr 0.01; this command gives --crop " \
           "16x32 --lr 0.5" in out
    assert f"--init {run / 'checkpoints' / 'last.pt'} --out NEW_RUN" in out
    out = fails("fit", "--out", run, "--resume", "--width", "8")
    assert "checkpoint is another architecture (width=4); this run builds width=8" in out
    # the same values again, typed out as in the first command, and session settings: fine
    again = citytrain("fit", "--data", shards, "--out", run, *_option(FIT, "--epochs", "2"),
                      "--resume", "--log-every", "1", "--eval-flip")
    assert again.exit_code == 0, again.output
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert _config(run)["config"]["eval_flip"] is True


@pytest.mark.slow
def test_resume_reads_the_shards_wherever_they_are_now_but_only_those(shards, tmp_path,
                                                                      make_dataset):
    run = tmp_path / "run"
    copy = tmp_path / "moved"
    shutil.copytree(shards, copy)
    assert citytrain("fit", "--data", copy, "--out", run,
                     *_option(FIT, "--epochs", "1")).exit_code == 0
    shutil.rmtree(copy)
    out = fails("fit", "--out", run, "--resume", "--epochs", "2")
    assert f"{copy}: the run's shards are not there; pass --data where they are now" in out
    images, labels, names = blocks(6, 64, 128)
    other = make_dataset({"train": (images, labels, names), "val": (images, labels, names)})
    out = fails("fit", "--out", run, "--resume", "--epochs", "2", "--data", other)
    assert f"the run was trained on other shards than {other} (mean" in out
    ok = citytrain("fit", "--out", run, "--resume", "--epochs", "2", "--data", shards)
    assert ok.exit_code == 0, ok.output
    assert _config(run)["config"]["data"] == os.path.abspath(shards)


def test_resumed_settings_keep_the_run_and_take_the_session():
    saved = {**tiny("/data/a", "/runs/x").__dict__, "crop": [24, 32], "eval_mode": "slide",
             "eval_window": [16, 16], "lr": 0.05}
    # a CLI that typed only --epochs and --eval-mode: the window goes with the mode
    cfg = resumed(saved, Config(out="/runs/x", epochs=7, resume=True), {"out", "epochs",
                                                                        "resume", "eval_mode"},
                  "last.pt")
    assert (cfg.epochs, cfg.crop, cfg.width, cfg.lr) == (7, (24, 32), 8, 0.05)
    assert (cfg.eval_mode, cfg.eval_window, cfg.data) == ("whole", None, "/data/a")
    with pytest.raises(TrainingError, match=r"last.pt: the run was trained with --optimizer sgd; "
                                            r"this command gives --optimizer adamw\. "):
        resumed(saved, Config(optimizer="adamw", lr=0.05), {"optimizer", "lr"}, "last.pt")
    # the default lr of the run's optimizer, typed or not, is the same lr
    assert resumed({**saved, "lr": 0.01}, Config(lr=0.01), {"lr"}, "p").lr == 0.01
    assert set(ARCH_FIELDS).isdisjoint(SESSION_FIELDS)


@pytest.mark.slow
def test_resume_auto_starts_continues_and_refuses_another_config(make_dataset, tmp_path):
    images, labels, names = blocks(8)
    data = make_dataset({"train": (images, labels, names)})
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # a first launch that died before saving
    (run / "config.json").write_text("{}")
    (run / "checkpoints" / ".last.pt.tmp-123").write_bytes(b"half a checkpoint")
    cfg = tiny(data, run, epochs=1, resume="auto")
    fit(cfg)
    assert not list((run / "checkpoints").glob(".*tmp*"))  # the torn save swept away
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    fit(replace(cfg, epochs=2))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]
    with pytest.raises(TrainingError, match=r"another architecture \(width=8\); this run builds "
                                            r"width=16"):
        fit(replace(cfg, epochs=3, width=16))
    with pytest.raises(TrainingError, match="already holds a run .* pass --resume"):
        fit(replace(cfg, resume=False))


@pytest.mark.slow
def test_config_json_records_the_effective_values(make_dataset, tmp_path, monkeypatch):
    images, labels, names = blocks(4)
    data = make_dataset({"train": (images, labels, names)})
    monkeypatch.chdir(tmp_path)
    fit(tiny(os.path.relpath(data), "run", epochs=1, lr=None, weight_decay=None))
    config = _config(tmp_path / "run")["config"]
    assert (config["lr"], config["weight_decay"]) == (0.01, 1e-4)  # sgd's
    assert config["data"] == str(data) and config["out"] == str(tmp_path / "run")


# -- a run's settings as a file ---------------------------------------------------------------

@pytest.mark.slow
def test_fit_config_reruns_a_run_with_overrides(shards, tmp_path):
    run = tmp_path / "run"
    assert citytrain("fit", "--data", shards, "--out", run, *_option(FIT, "--epochs", "1"),
                     "--depth", "1").exit_code == 0
    again = citytrain("fit", "--config", run / "config.json", "--out", tmp_path / "again",
                      "--lr", "0.02", "--no-progress")
    assert again.exit_code == 0, again.output
    a, b = _config(run)["config"], _config(tmp_path / "again")["config"]
    assert b["lr"] == 0.02 and b["depth"] == 1 and b["out"] == str(tmp_path / "again")
    assert {k: v for k, v in a.items() if k not in ("lr", "out")} == \
        {k: v for k, v in b.items() if k not in ("lr", "out")}
    # without --out it would be the same run: a new start is refused
    assert "already holds a run" in fails("fit", "--config", run / "config.json")


@pytest.mark.slow
def test_a_small_config_file_and_its_mistakes(shards, tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"width": 4, "depth": 1, "crop": "32x64", "epochs": 1,
                                "batch_size": 2, "amp": "off", "workers": 0, "device": "cpu",
                                "scale": [1, 1]}))
    result = citytrain("fit", "--config", path, "--data", shards, "--out", tmp_path / "r",
                       "--no-progress")
    assert result.exit_code == 0, result.output
    config = _config(tmp_path / "r")["config"]
    assert (config["crop"], config["scale"], config["depth"]) == \
        ({"height": 32, "width": 64}, [1.0, 1.0], 1)
    path.write_text('{"widht": 4}')
    assert f"{path}: no setting 'widht' (did you mean width" in fails(
        "fit", "--config", path, "--out", tmp_path / "x")
    path.write_text('{"epochs": "ten"}')
    assert f"{path}: epochs: expected int, got 'ten'" in fails("fit", "--config", path,
                                                                "--out", tmp_path / "x")
    assert read_config_file(tmp_path / "r" / "config.json")["width"] == 4
    assert "resume" not in read_config_file(tmp_path / "r" / "config.json")
    assert "--out RUN is needed" in fails("fit", "--data", shards, code=2)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_init_takes_the_architecture_from_its_checkpoint(shards, tmp_path):
    base = tmp_path / "base"
    assert citytrain("fit", "--data", shards, "--out", base, *_option(FIT, "--epochs", "1"),
                     "--depth", "1", "--upsample", "transpose").exit_code == 0
    ckpt = base / "checkpoints" / "last.pt"
    pairs = zip(FIT[::2], FIT[1::2])  # FIT is options and their values
    args = [x for name, value in pairs if name not in ("--width", "--depth")
            for x in (name, value)] + ["--no-progress"]
    result = citytrain("fit", "--data", shards, "--out", tmp_path / "tuned", *args,
                       "--epochs", "1", "--init", ckpt)
    assert result.exit_code == 0, result.output
    assert "its architecture, encoder plain, width 4, depth 1, upsample transpose" in \
        result.output
    assert load_checkpoint(tmp_path / "tuned" / "checkpoints" / "last.pt")["arch"] == \
        load_checkpoint(ckpt)["arch"]
    out = fails("fit", "--data", shards, "--out", tmp_path / "wide", *args, "--init", ckpt,
                "--width", "8")
    assert "another architecture" in out  # told otherwise: its own choice, checked


# -- step checkpoints -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_crash_between_step_checkpoints_resumes_to_the_uninterrupted_weights(make_dataset,
                                                                               tmp_path,
                                                                               monkeypatch):
    images, labels, names = blocks(20)
    data = make_dataset({"train": (images[:16], labels[:16], names[:16]),
                         "val": (images[16:], labels[16:], names[16:])})
    # 4 steps an epoch, 3 epochs; step checkpoints at 3, 6, 9 besides the epoch ends
    cfg = tiny(data, tmp_path / "full", epochs=3, crop=(24, 32), scale=(0.75, 1.5), flip=True,
               jitter=0.2, optimizer="adamw", lr=1e-2, warmup=2, save_every=3, resume="auto")
    fit(cfg)

    real_step, steps = engine.train_step, []

    def step_then_crash(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 7:  # no SIGTERM, no save: what a lost GPU leaves
            raise RuntimeError("CUDA error: unspecified launch failure")
        return loss

    monkeypatch.setattr(engine, "train_step", step_then_crash)
    cut = replace(cfg, out=str(tmp_path / "cut"))
    with pytest.raises(RuntimeError, match="unspecified launch failure"):
        fit(cut)
    last = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (last["epoch"], last["step"], last["loader"]["batch"]) == (1, 6, 2)
    assert last["epoch_state"]["batches"] == 2 and last["metrics"] is None
    fit(cut)  # the same command again
    assert len(steps) == 7 + 6  # steps 7 to 12 again, nothing else

    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    resumed_ = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert resumed_["step"] == full["step"] == 12
    for key, value in full["model"].items():
        assert torch.equal(resumed_["model"][key], value), key
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    assert [r["epoch"] for r in _rows(tmp_path / "cut")] == ["1", "2", "3"]


KILL_DURING_SAVES = """
import sys, torch
from train.checkpoint import CheckpointWriter
writer = CheckpointWriter()
weights = torch.zeros(4_000_000)
for step in range(1, 10_000):
    weights.fill_(step)
    writer.save({"step": step, "model": {"w": weights}}, sys.argv[1])
    if step == 1:
        writer.wait()
        print("first", flush=True)
"""


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    last = tmp_path / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVES, str(last)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        deadline = time.monotonic() + 60
        while not list(last.parent.glob(".last.pt.tmp*")):  # a write under way
            assert time.monotonic() < deadline and proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    state = load_checkpoint(last)
    assert state["step"] >= 1 and torch.all(state["model"]["w"] == state["step"])
    assert list(last.parent.glob(".last.pt.tmp*"))  # the torn one, which fit sweeps away


@pytest.mark.slow
def test_resume_auto_with_init_starts_from_it_once(make_dataset, tmp_path):
    # the SLURM recipe's INIT: the first allocation fine-tunes, the next ones resume, even
    # once the checkpoint it started from is gone
    images, labels, names = blocks(8)
    data = make_dataset({"train": (images, labels, names)})
    fit(tiny(data, tmp_path / "base", epochs=1))
    ckpt = tmp_path / "init.pt"
    shutil.copy(tmp_path / "base" / "checkpoints" / "last.pt", ckpt)
    cfg = tiny(data, tmp_path / "tuned", epochs=1, init=str(ckpt), resume="auto")
    fit(cfg)
    ckpt.unlink()
    fit(replace(cfg, epochs=2))
    assert load_checkpoint(tmp_path / "tuned" / "checkpoints" / "last.pt")["epoch"] == 2
    init = _config(tmp_path / "tuned")["init"]
    assert init["checkpoint"] == str(ckpt) and init["epoch"] == 1


def test_bench_checkpoint_figures_a_save_against_each_save_every(tmp_path):
    out = tmp_path / "bench.json"
    result = citytrain("bench-checkpoint", "--width", "4", "--depth", "1", "--crop", "16x32",
                       "--batch-size", "1", "--amp", "off", "--saves", "1", "--every",
                       "1,10,100", "--dir", tmp_path, "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    assert "save holds loop" in result.output and "--save-every" in result.output
    report = json.loads(out.read_text())
    assert report["checkpoint_mb"] > 0 and report["step_source"] == "measured"
    assert [r["save_every"] for r in report["rows"]] == [1, 10, 100]
    shares = [r["sync_share"] for r in report["rows"]]
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[-1]
    assert list(tmp_path.iterdir()) == [out]  # its checkpoints are gone


@pytest.mark.slow
def test_a_second_sigterm_does_not_kill_the_save_the_first_asked_for():
    # SLURM signals every process of the job step and torchrun passes its own SIGTERM on
    with engine.Stopper().installed() as stopper:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stopper.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) == stopper._handle  # Ctrl-C: still caught


@pytest.mark.slow
def test_make_trains_memory_check_of_a_resumed_run_only_checks(make_dataset, tmp_path):
    # make train: `fit ... --resume auto --preflight-only`, then torchrun `... --no-preflight`;
    # the run's config says preflight false, the check must not train for it
    images, labels, names = blocks(8)
    data = make_dataset({"train": (images, labels, names)})
    run = tmp_path / "run"
    fit(tiny(data, run, epochs=1, preflight=False, resume="auto"))
    memory = fit(Config(out=str(run), epochs=2, resume="auto", preflight_only=True),
                 given={"out", "epochs", "resume", "preflight_only"})
    assert memory["step_gb"] > 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in _rows(run)] == ["1"]
