"""A rank SIGKILLed under torchrun costs a restart, not the run: torchrun (--max-restarts)
starts the group again, `fit --resume auto` continues from the last step checkpoint, and the
run ends with the weights of an uninterrupted one. Two gloo processes on the CPU."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, alive, blocks, descendants, free_port

from train.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow,  # processes started, killed and counted
              pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                 reason="needs Linux /proc")]

def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:  # timings differ between runs, nothing else may
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait_fraction")}
                for r in csv.DictReader(f)]


def torchrun(data: Path, out: Path, port: int, kill_after: int = 0,
             workers: int = 0) -> tuple[int, str, set[int]]:
    """Two ranks under torchrun (c10d rendezvous on `port`, one restart allowed); returns
    the exit status, the output and every process seen below torchrun."""
    fit = ["fit", "--data", data, "--out", out, "--epochs", "2", "--batch-size", "2",
           "--crop", "24x32", "--scale", "0.75,1.5", "--width", "4", "--depth", "2", "--amp",
           "off", "--optimizer", "adamw", "--lr", "1e-2", "--warmup", "2", "--workers", workers,
           "--backend", "torch", "--device", "cpu", "--log-every", "2", "--save-every", "3",
           "--resume", "auto", "--no-progress", "--no-preflight"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic",
         "--max-restarts=1", "--monitor-interval=0.5", "-m", "train.faults", "--kill-rank",
         "1", "--after-step", str(kill_after), *map(str, fit)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None:  # who ran below torchrun: ranks, loader workers, restarts
            seen |= set(descendants(proc.pid))
            assert time.monotonic() < deadline, "torchrun did not finish in 300 s"
            time.sleep(0.1)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    return proc.returncode, output, seen


def test_a_rank_killed_between_two_saves_costs_a_restart_not_the_run(make_dataset, tmp_path):
    images, labels, names = blocks(20)
    data = make_dataset({"train": (images[:16], labels[:16], names[:16]),
                         "val": (images[16:], labels[16:], names[16:])})
    port = free_port()
    # 16 images, 2 x 2 a step: 4 steps an epoch, 8 in all; step checkpoints at 3 and 6.
    # Rank 1 dies after step 7 (train/faults.py), as a lost GPU ends a process: the group
    # restarts from step 6, in the middle of epoch 2.
    # With a loader worker per rank (the killed rank's must end with it); the batches and
    # so the weights are the same with or without workers.
    status, output, seen = torchrun(data, tmp_path / "killed", port, kill_after=7,
                                    workers=1)
    assert status == 0, output
    assert "(torchrun restart 1 of at most 1)" in output, output
    assert "resuming" in output and "at step 6: epoch 2/2, batch 2/4 (1 done)" in output
    assert len(seen) >= 8, seen  # 2 ranks and their loader workers, twice (and helpers)
    gone = time.monotonic() + 10
    while any(alive(p) for p in seen) and time.monotonic() < gone:
        time.sleep(0.1)
    assert not [p for p in seen if alive(p)], "processes outlived torchrun"
    assert _port_free(port), "the rendezvous port is still held"

    # the same endpoint and rendezvous id again: nothing stale stands in the way
    status, output, _ = torchrun(data, tmp_path / "whole", port)
    assert status == 0, output
    assert "restart" not in output and "resuming" not in output

    killed = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    assert killed["step"] == whole["step"] == 8 and killed["epoch"] == 2
    for key, value in whole["model"].items():
        assert torch.equal(killed["model"][key], value), key
    for a, b in zip(whole["optimizer"]["state"].values(), killed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "whole")
    assert [r["epoch"] for r in _rows(tmp_path / "killed")] == ["1", "2"]
