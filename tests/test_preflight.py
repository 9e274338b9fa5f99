"""The memory pre-flight: a step that won't fit stops at once, on every rank, with both figures
and settings that would fit; its estimate follows the batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import blocks, free_port, tiny

from train import preflight
from train.config import Config, TrainingError
from train.fit import fit


def test_the_estimate_grows_with_the_batch_and_keeps_the_rng():
    # big enough that a batch's activations (~25 MB here) stand out of the process's RSS
    cfg = Config(width=16, depth=2, amp="off", optimizer="adamw")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    estimate = preflight.probe(cfg, 19, (256, 512), torch.device("cpu"))
    assert estimate.per_pixel > 0 and estimate.fixed > 0
    assert estimate.need(8, 256 * 512) > estimate.need(1, 256 * 512)
    # probing draws random numbers; fit runs it under fork_rng so the model's init is unchanged
    assert not torch.equal(before, torch.get_rng_state())


def test_a_step_that_does_not_fit_stops_before_training(make_dataset, tmp_path, monkeypatch):
    images, labels, names = blocks(8)
    data = make_dataset({"train": (images, labels, names)})
    monkeypatch.setattr(preflight, "available_memory", lambda: 0)
    monkeypatch.setattr(preflight, "_status", lambda key: 0.1e9)  # this process: 0.1 GB
    with pytest.raises(TrainingError) as err:
        fit(tiny(data, tmp_path / "run", batch_size=4, crop=(32, 48)))
    message = str(err.value)
    assert message.startswith("not enough memory: one training step at batch 4, crop 32x48, "
                              "width 8, --amp off needs about ")
    assert "GB per process" in message and "against 0.1 GB on this host" in message
    assert "--amp bf16" in message and "--no-preflight skips this check" in message
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_the_figures_go_into_config_json(make_dataset, tmp_path):
    import json

    images, labels, names = blocks(8)
    data = make_dataset({"train": (images, labels, names)})
    fit(tiny(data, tmp_path / "run", epochs=1))
    figures = json.loads((tmp_path / "run" / "config.json").read_text())["preflight"]
    assert 0 < figures["step_gb"] <= figures["total_gb"] < figures["budget_gb"]


def _rank(rank: int, port: int, cfg: dict, budget: list, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    preflight.available_memory = lambda: budget[rank]  # rank 1 sees a full host
    preflight._status = lambda key: 0.1e9
    try:
        fit(Config(**cfg))
        queue.put((rank, "trained"))
    except TrainingError as e:
        queue.put((rank, str(e)))


@pytest.mark.slow
def test_all_ranks_stop_when_one_would_not_fit(make_dataset, tmp_path):
    from dataclasses import asdict

    images, labels, names = blocks(8)
    data = make_dataset({"train": (images, labels, names)})
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    cfg = asdict(tiny(data, tmp_path / "run", batch_size=2, epochs=1))
    mp.spawn(_rank, args=(free_port(), cfg, [1e12, 0], queue), nprocs=2)
    results = dict(queue.get(timeout=60) for _ in range(2))
    assert results[0].startswith("not enough memory") and results[1].startswith("not enough")
    assert "for 2 processes on this host" in results[0]
