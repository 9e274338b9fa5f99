"""Checkpoints: a resumed run equals an uninterrupted one; loading is safe and fails clearly."""

from __future__ import annotations

import csv
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import REPO, blocks, tiny

from pipeline.loader import dali_available
from train import engine
from train.checkpoint import (
    CheckpointError,
    check_arch,
    check_classes,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.engine import Interrupted
from train.fit import fit
from train.models.plain import UNet


def _rows(run) -> list[dict]:
    with open(run / "metrics.csv") as f:
        # timings differ between runs; everything computed from the data must not
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait_fraction")}
                for r in csv.DictReader(f)]


@pytest.mark.slow
def test_resume_after_sigterm_matches_an_uninterrupted_run(make_dataset, tmp_path, monkeypatch):
    images, labels, names = blocks(16)
    data = make_dataset({"train": (images[:12], labels[:12], names[:12]),
                         "val": (images[12:], labels[12:], names[12:])})
    # every random knob on: augmentation, shuffling, AdamW state, warmup, clipping
    cfg = tiny(data, tmp_path / "full", epochs=3, crop=(24, 32), scale=(0.75, 1.5), flip=True,
               jitter=0.2, optimizer="adamw", lr=1e-2, warmup=2, clip_grad=1.0)
    fit(cfg)

    real_step, steps = engine.train_step, []

    def step_then_signal(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) in (2, 6):  # mid epoch 1; after the last step of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(engine, "train_step", step_then_signal)
    cut = tiny(data, tmp_path / "cut", **{k: getattr(cfg, k) for k in (
        "epochs", "crop", "scale", "flip", "jitter", "optimizer", "lr", "warmup", "clip_grad")})
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM in epoch 1/3, batch 2/3 \(0 done\), "
                                          "step 2, "):
        fit(cut)
    assert load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["loader"]["batch"] == 2
    # at an epoch's last step: its validation is done, then the run stops there
    with pytest.raises(Interrupted, match="stopped by SIGTERM after epoch 2/3, step 6, "):
        fit(cut.__class__(**{**cut.__dict__, "resume": True}))
    fit(cut.__class__(**{**cut.__dict__, "resume": True}))
    assert len(steps) == 9  # 3 epochs x 3 batches, none repeated or skipped

    full = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    resumed = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")
    assert (resumed["epoch"], resumed["step"]) == (full["epoch"], full["step"]) == (3, 9)
    for key, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6, msg=key)
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], rtol=0, atol=1e-9)
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    assert len(_rows(tmp_path / "full")) == 3


def test_a_finished_run_refuses_a_fresh_start_and_resume_needs_a_checkpoint(make_dataset,
                                                                           tmp_path):
    images, labels, names = blocks(4)
    data = make_dataset({"train": (images, labels, names)})
    with pytest.raises(engine.TrainingError, match="no checkpoint to resume from"):
        fit(tiny(data, tmp_path / "run", epochs=1, resume=True))
    fit(tiny(data, tmp_path / "run", epochs=1))
    with pytest.raises(engine.TrainingError, match="already holds a run"):
        fit(tiny(data, tmp_path / "run", epochs=1))
    with pytest.raises(engine.TrainingError, match=r"another architecture \(width=8\); this "
                                                   r"run builds width=16\. A resumed run"):
        fit(tiny(data, tmp_path / "run", epochs=2, width=16, resume=True))


def test_checkpoint_is_plain_data_and_loads_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    model = UNet(3, width=4, depth=1)
    save_checkpoint(path, {"model": model.state_dict(), "arch": model.config, "rng": rng_state(),
                           "classes": ["a", "b", "c"]})
    raw = torch.load(path, weights_only=True)  # raises if anything but plain data got in
    assert raw["format"] == "cityseg-checkpoint" and raw["arch"]["width"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_with_code_in_it_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "cityseg-checkpoint", "format_version": 1, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused to load: .*posix.system"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, message", [
    (None, "no such checkpoint"),
    (b"not a checkpoint at all", "not a readable checkpoint"),
    ({"model": {}}, "not a citytrain checkpoint"),
    ({"format": "cityseg-checkpoint", "format_version": 99}, "format_version 99"),
])
def test_bad_checkpoint_files_fail_with_the_file_named(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"x.pt: .*{message}"):
        load_checkpoint(path)


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, {"step": 2, "bad": lambda: 0})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "r.pt", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2:] == again[2:]


def test_architecture_and_class_mismatches_name_both_sides(tmp_path):
    state = {"arch": UNet(19, width=32, depth=4).config, "classes": ["road", "sidewalk"]}
    with pytest.raises(CheckpointError, match=r"depth=4, width=32\); this run builds depth=3, "
                                              r"width=16"):
        check_arch(state, UNet(19, width=16, depth=3).config, tmp_path / "c.pt")
    check_arch(state, UNet(19, width=32, depth=4).config, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"predicts 2 classes \(road, sidewalk\) but "
                                              r"data/x has 4 \(background, road, sky, car\)"):
        check_classes(state, ["background", "road", "sky", "car"], tmp_path / "c.pt", "data/x")


CTRL_C_DRIVER = """
import signal, sys
# a test run from a background shell inherits SIGINT ignored, and so would the loader's
# workers; a terminal's Ctrl-C is not ignored anywhere
signal.signal(signal.SIGINT, signal.default_int_handler)
from train.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("backend", [
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI")),
    "torch"])
@pytest.mark.slow
def test_ctrl_c_with_loader_workers_saves_and_exits_cleanly(shards, tmp_path, backend):
    out = tmp_path / "run"
    args = ["fit", "--data", shards, "--out", out, "--epochs", "1000", "--batch-size", "2",
            "--crop", "32x64", "--width", "4", "--depth", "2", "--amp", "off", "--workers", "1",
            "--backend", backend, "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_DRIVER, *map(str, args)], cwd=REPO,
                            start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.csv"
    while not metrics.exists() or len(_rows(out)) < 2:  # the workers are up and serving
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and "continue with --resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert (out / "checkpoints" / "last.pt").is_file()
    while True:  # the loader's worker processes end with the run
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "loader workers outlived the run"
        time.sleep(0.05)


def test_a_resume_checks_the_shards_statistics_of_an_older_checkpoint_too(tmp_path):
    from train.checkpoint import check_data

    here = {"size": [128, 64], "mapping": "trainid", "shards_mean": [0.3, 0.3, 0.3],
            "shards_std": [0.2, 0.2, 0.2]}
    older = {"size": [128, 64], "mapping": "trainid", "mean": [0.4, 0.3, 0.3],
             "std": [0.2, 0.2, 0.2]}  # before shards_mean: its mean is the shards'
    with pytest.raises(CheckpointError, match=r"other shards than d \(mean \[0.4, 0.3, 0.3\] "
                                              r"there, \[0.3, 0.3, 0.3\] here\)"):
        check_data(older, here, tmp_path / "c.pt", "d")
    check_data({**older, "mean": [0.3, 0.3, 0.3]}, here, tmp_path / "c.pt", "d")
    # a pretrained model's mean/std are its weights', not the shards'
    check_data({**older, "normalization": "ResNet18_Weights.IMAGENET1K_V1"}, here,
               tmp_path / "c.pt", "d")
