"""The memory pre-flight: a step that won't fit stops at once, on every rank, with both figures
and settings that would fit; its estimate follows the batch."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
from helpers import blocks, free_port, tiny

from train import distributed, preflight
from train.config import Config, TrainingError
from train.fit import fit


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_step_that_does_not_fit_stops_before_training(make_dataset, tmp_path, monkeypatch):
    images, labels, names = blocks(8)
    data = make_dataset({"train": (images, labels, names)})
    monkeypatch.setattr(preflight, "available_memory", lambda: 0)
    monkeypatch.setattr(preflight, "_status", lambda key: 0.1e9)  # this process: 0.1 GB
    with pytest.raises(TrainingError) as err:
        fit(tiny(data, tmp_path / "run", batch_size=4, crop=(32, 48)))
    message = str(err.value)
    assert message.startswith("not enough memory: one training step at batch 4, crop 32x48 (HxW), "
                              "width 8, --amp off needs about ")
    assert "GB per process" in message and "against 0.1 GB on this host" in message
    assert "--amp bf16" in message and "--no-preflight skips this check" in message
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
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


class MadeUpGpu(preflight.GpuMemory):
    """CUDA's counter on a made-up GPU: 3 GB free, and a step's peak of 0.5 GB plus 2 kB per
    pixel of its batch (the CPU runs the steps; the counter only reports)."""

    FIXED, PER_PIXEL = 0.5e9, 2e3

    def __init__(self) -> None:
        super().__init__(torch.device("cuda", 0))
        self.events: list[str] = []
        self.pixels = 0

    def budget(self, dist):
        return 3e9, f"free on {self.device}", 1

    def reset(self) -> None:
        self.events.append("reset")

    def step(self, batch: dict) -> None:
        self.events.append("step")
        self.pixels = batch["label"].numel()

    def peak(self) -> float:
        self.events.append("peak")
        return self.FIXED + self.PER_PIXEL * self.pixels

    def release(self) -> None:
        self.events.append("release")


@pytest.mark.slow
def test_the_gpu_probe_measures_the_second_step_and_names_the_fix(monkeypatch):
    gpu = MadeUpGpu()
    real_step = preflight.train_step

    def step(model, batch, *args, **kwargs):
        gpu.step(batch)
        return real_step(model, batch, *args, **kwargs)

    monkeypatch.setattr(preflight, "train_step", step)
    cfg = Config(width=4, depth=2, amp="off", optimizer="adamw", batch_size=8)
    estimate = preflight.probe(cfg, 19, (64, 128), torch.device("cpu"), gpu)
    # the optimizer state is in the second step's peak: nothing added for it
    assert estimate.fixed == pytest.approx(gpu.FIXED) and estimate.per_pixel == gpu.PER_PIXEL
    assert gpu.events == ["reset", "step", "reset", "step", "peak", "release"] * 2
    one = distributed.Dist(0, 1, 0, torch.device("cpu"))
    # 8 x 512 x 1024 pixels: 1.1 x (0.5 + 8.4) GB, against 3 GB free
    with pytest.raises(TrainingError) as err:
        preflight.check_fits(cfg, one, 19, (512, 1024), workers=4, backend="dali", memory=gpu)
    message = str(err.value)
    assert "needs about 9.8 GB per process, 9.8 GB for this process, against 3.0 GB free on " \
           "cuda:0. It would fit with --batch-size 2, or --crop 260x524, or --width 1 " \
           "(about), or --amp bf16" in message  # no loader workers counted on a GPU
    figures = preflight.check_fits(replace(cfg, batch_size=1), one, 19, (512, 1024), 4,
                                   "dali", memory=gpu)
    assert figures["budget_gb"] == 3.0 and figures["total_gb"] == figures["step_gb"]
