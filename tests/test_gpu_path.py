"""What a GPU node needs, proved on the CPU: one device per process, no host sync per step,
a true data-wait share, resume on another number of processes, --compile refused under DDP."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import blocks, tiny

import pipeline.augment
from pipeline import loader_bench
from pipeline.loader import build_loader
from pipeline.sampling import Position
from train import distributed, engine, optim, precision
from train import fit as fit_module
from train import session as session_module
from train.checkpoint import load_checkpoint, save_checkpoint
from train.engine import EpochEnd, RunState, Stopper, TrainingError, train_one_epoch
from train.fit import fit
from train.losses import build_loss
from train.models import registry
from train.models.plain import UNet


class _Placed(Exception):
    """Raised by the stand-in model once fit has put it on a device."""


@pytest.mark.parametrize("visible, local_rank, expected", [
    (1, 0, 0), (1, 3, 0), (1, 7, 0),  # one GPU per process: SLURM --gpus-per-task=1
    *[(8, r, r) for r in range(8)],  # all eight GPUs of a node visible to every rank
])
def test_model_and_loader_get_the_same_gpu(make_dataset, monkeypatch, visible, local_rank,
                                          expected):
    images, labels, names = blocks(4)
    data = make_dataset({"train": (images, labels, names)})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(fit_module, "cuda_speed_settings", lambda device, tf32: {})
    gpu = torch.device("cuda", expected)

    dist = distributed.setup("auto")
    assert dist.device == gpu and dist.local_rank == local_rank
    # a user's own script names only "cuda": the loader resolves it the same way
    for device in (dist.device, "cuda", "auto"):
        loader = build_loader(data, "train", 2, train=True, device=device, backend="torch",
                              workers=0)
        assert loader.device == gpu

    seen = {}
    real_build = fit_module.build_loader

    def recording_build(*args, **kwargs):
        loader = real_build(*args, **kwargs)
        seen.setdefault("loaders", []).append(loader.device)
        return loader

    class PlacedModel(UNet):
        def to(self, device, *args, **kwargs):
            seen["model"] = device
            raise _Placed

    monkeypatch.setattr(fit_module, "build_loader", recording_build)
    monkeypatch.setitem(registry._BUILDERS, "plain", PlacedModel)
    with pytest.raises(_Placed):
        fit(replace(tiny(data, "unused"), device="auto", workers=0, preflight=False))
    assert seen == {"loaders": [gpu], "model": gpu}


def test_a_gpu_rank_joins_nccl_and_trains_its_gpu_under_ddp(make_dataset, monkeypatch):
    """Rank 1 of 2 on a node with 2 GPUs: NCCL with this rank's device, torch's SyncBatchNorm,
    DDP over that device; the model and loss stay on the CPU here, the rest is fit's own."""
    images, labels, names = blocks(8)
    data = make_dataset({"train": (images, labels, names)})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for key, value in dict(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2).items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(fit_module, "cuda_speed_settings", lambda device, tf32: {})
    seen = {}
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda **kwargs: seen.update(group=kwargs))

    def on_the_cpu(module):
        module.to = lambda *args, **kwargs: module  # what a GPU would hold stays here
        return module

    real_convert, real_loss = distributed.convert_sync_batchnorm, fit_module.build_loss
    monkeypatch.setattr(distributed, "convert_sync_batchnorm",
                        lambda model, device: on_the_cpu(real_convert(model, device)))
    monkeypatch.setattr(fit_module, "build_loss",
                        lambda *args, **kwargs: on_the_cpu(real_loss(*args, **kwargs)))

    def ddp(model, device_ids):
        seen.update(device_ids=device_ids, norms={type(m).__name__ for m in model.modules()
                                                  if "Norm" in type(m).__name__})
        raise _Placed

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp)
    with pytest.raises(_Placed):
        fit(replace(tiny(data, "unused", batch_size=2), device="auto", preflight=False))
    gpu = torch.device("cuda", 1)
    assert seen["group"].pop("store") is None  # no torchrun agent here: the env:// store
    assert seen == {"group": {"backend": "nccl", "rank": 1, "world_size": 2, "device_id": gpu},
                    "device_ids": [1], "norms": {"SyncBatchNorm"}}


def test_an_absent_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cuda: no CUDA device is available"):
        distributed.local_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="cuda:5: only 2 CUDA device"):
        distributed.local_device("cuda:5")
    assert distributed.local_device("cpu") == torch.device("cpu")


BLOCKING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
AUGMENT = str(Path(pipeline.augment.__file__).parent)


@pytest.mark.slow
def test_training_steps_do_not_wait_for_the_device(make_dataset, tmp_path, monkeypatch):
    """Every call that would make the host wait for a GPU, counted over real epochs."""
    images, labels, names = blocks(24)
    data = make_dataset({"train": (images, labels, names)})
    calls: list[str] = []
    counting = [False]
    for name in BLOCKING:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, _real=real, _name=name, **kwargs):
            # the augmentations' CPU steps are the CPU path of the loader: never run for a GPU
            # (the colour matrix, beside them, runs on every path and is counted)
            code = sys._getframe(1).f_code
            cpu_step = AUGMENT in code.co_filename and code.co_name in ("cpu", "cpu_batch")
            if counting[0] and not cpu_step:
                calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    real_epoch = engine.train_one_epoch

    def counted_epoch(*args, **kwargs):
        counting[0] = True
        try:
            return real_epoch(*args, **kwargs)
        finally:
            counting[0] = False

    monkeypatch.setattr(session_module, "train_one_epoch", counted_epoch)
    # every augmentation and the clipping on: none of them may read a value back
    cfg = tiny(data, tmp_path / "run", epochs=2, batch_size=2, crop=(24, 32), scale=(0.75, 1.5),
               flip=True, jitter=0.2, clip_grad=1.0, log_every=4)
    fit(cfg)
    steps = 2 * 12
    syncs = 2 * 3  # 12 steps an epoch, read back every 4
    assert calls == ["tolist"] * syncs, calls
    assert len(calls) / steps == 0.25


class FakeLoader:
    """Ready-made batches, each after `delay` seconds (a loader that keeps up: 0); its
    position moves on as each is handed out, as a real loader's does."""

    def __init__(self, batches: list[dict], delay: float) -> None:
        self.batches, self.delay, self.position = batches, delay, Position()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            self.position = self.position.next(len(self))
            yield batch


@pytest.mark.slow
@pytest.mark.parametrize("delay, device_seconds, low, high", [
    (0.0, 0.1, 0.0, 0.1),  # an instant loader, while the "GPU" catches up at each sync
    (0.3, 0.0, 0.5, 1.0),  # a loader that is the bottleneck
])
def test_data_wait_share_is_the_time_blocked_on_the_loader(monkeypatch, delay, device_seconds,
                                                           low, high):
    """On an asynchronous device the step's work is done while the host waits at the sync;
    that wait is step time, and only `next(loader)` counts as waiting for data."""
    torch.manual_seed(0)
    model = UNet(19, width=4, depth=1)
    batches = [{"image": torch.randn(2, 3, 8, 8), "label": torch.randint(0, 19, (2, 8, 8))}
               for _ in range(8)]
    real_reduce = distributed.all_reduce_sum

    def device_catching_up(tensor):
        time.sleep(device_seconds * (len(tensor) - 2))  # the queued steps finish now
        return real_reduce(tensor)

    monkeypatch.setattr(distributed, "all_reduce_sum", device_catching_up)
    cfg = tiny("unused", "unused", log_every=4, epochs=1)
    loader = FakeLoader(batches, delay)
    state = RunState(loader, total_steps=8)
    dist = distributed.Dist(0, 1, 0, torch.device("cpu"))
    criterion = build_loss("segment", palette=[[0, 0, 0]] * 19)
    optimizer = optim.build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    engine.train_step(model, batches[0], criterion, optimizer, scaler, amp="off")  # warm up
    assert train_one_epoch(model, loader, criterion, optimizer, scaler,
                           cfg=cfg, dist=dist, state=state,
                           stopper=Stopper()) is EpochEnd.DONE
    sums = state.epoch_sums
    assert sums.batches == 8 and state.step == 8
    share = sums.wait / sums.seconds
    assert low <= share <= high, share
    # the clock every rank agrees on lags by the last sync, which the next window counts; it
    # holds the first batch's wait (the loader starting up), which the epoch's sums leave out
    assert 0 < state.elapsed <= sums.seconds + delay + 0.05


class QueuedDevice:
    """A GPU as its host sees it: each step runs for `step_seconds` after its launch, and
    the event recorded after it (`engine.step_marker`) is done once that time has passed."""

    def __init__(self, step_seconds: float) -> None:
        self.step_seconds, self.done_at = step_seconds, 0.0

    def record(self) -> None:
        self.done_at = time.perf_counter() + self.step_seconds

    def query(self) -> bool:
        return time.perf_counter() >= self.done_at


@pytest.mark.parametrize("step_seconds, batches_waited", [
    (0.5, 0),  # GPU-bound: next() blocks in the launch queue while the last step runs
    (0.0, 7),  # the device is idle every time the loader keeps the host waiting
])
def test_data_wait_counts_only_what_the_device_waited_for(monkeypatch, step_seconds,
                                                          batches_waited):
    """A loader whose `next()` blocks 0.05 s every batch: data wait where the device has run
    dry (always on the second line; on the first only before the first step). The first
    batch, the loader's start-up, is data wait in neither."""
    delay = 0.05
    device = QueuedDevice(step_seconds)
    monkeypatch.setattr(engine, "step_marker", lambda _: device)
    model = UNet(19, width=4, depth=1)
    batches = [{"image": torch.randn(2, 3, 8, 8), "label": torch.randint(0, 19, (2, 8, 8))}
               for _ in range(8)]
    cfg = tiny("unused", "unused", log_every=4, epochs=1)
    loader = FakeLoader(batches, delay)
    state = RunState(loader, total_steps=8)
    criterion = build_loss("segment", palette=[[0, 0, 0]] * 19)
    optimizer = optim.build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_one_epoch(model, loader, criterion, optimizer, scaler, cfg=cfg,
                    dist=distributed.Dist(0, 1, 0, torch.device("cpu")), state=state,
                    stopper=Stopper())
    assert state.step == 8
    assert batches_waited * delay <= state.epoch_sums.wait < (batches_waited + 2) * delay


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 3, 20])
def test_non_finite_loss_names_its_step_whatever_the_cadence(make_dataset, tmp_path,
                                                             monkeypatch, log_every):
    images, labels, names = blocks(12)
    data = make_dataset({"train": (images, labels, names)})
    real_step, steps = engine.train_step, []

    def poisoned(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        steps.append(1)
        return loss * float("inf") if len(steps) == 5 else loss

    monkeypatch.setattr(engine, "train_step", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss \(inf\) at epoch 2, step 5 "
                                            rf"\(losses are read every --log-every {log_every}"):
        fit(tiny(data, tmp_path / "run", epochs=3, batch_size=4, log_every=log_every))
    assert len(steps) == (6 if log_every in (3, 20) else 5)  # the end of the window, or now
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["epoch"] == 1


def _saved_on_eight_gpus(path, epoch: int, batch: int, global_batch: int) -> None:
    """Rewrite a CPU checkpoint as if 8 CUDA processes had written it mid-epoch."""
    state = load_checkpoint(path)
    state["rng"]["cuda"] = [torch.ByteTensor(16).fill_(k) for k in range(8)]
    state["loader"] = {"epoch": epoch, "batch": batch, "global_batch": global_batch}
    state.update(epoch=epoch, step=epoch * 3 + batch, world_size=8)
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format",
                                                                       "format_version")})


@pytest.mark.slow
def test_resume_on_fewer_processes_continues_or_says_what_would(make_dataset, tmp_path):
    images, labels, names = blocks(24)
    data = make_dataset({"train": (images, labels, names)})
    run = tmp_path / "run"
    fit(tiny(data, run, epochs=1, batch_size=8))
    last = run / "checkpoints" / "last.pt"
    # 8 processes x 1 image stopped after 2 of 3 global batches of epoch 2: 16 images read
    _saved_on_eight_gpus(last, epoch=1, batch=2, global_batch=8)
    with pytest.raises(TrainingError, match=r"cannot resume exactly: the checkpoint stopped 16 "
                                            r"images into epoch 2 .* global batch of 6 "
                                            r"\(6 per process x 1\) does not divide 16; "
                                            r"resume with --batch-size 8"):
        fit(tiny(data, run, epochs=2, batch_size=6, resume=True))
    row = fit(tiny(data, run, epochs=2, batch_size=4, resume=True))  # 16 / 4: batch 4 of 6
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == 2 and resumed["step"] == 12  # 2 x 6 steps of 4, restated
    assert resumed["loader"] == {"epoch": 2, "batch": 0, "global_batch": 4}
    assert "cuda" not in resumed["rng"]  # a CPU run keeps no CUDA state
    assert row["epoch"] == 2


def test_compile_with_ddp_and_sync_batchnorm_is_refused_with_the_reason():
    two = distributed.Dist(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    cfg = tiny("unused", "unused-run", compile=True)
    with pytest.raises(TrainingError, match="--compile with several processes needs "
                                            "--no-sync-bn: SyncBatchNorm"):
        fit_module._fit(cfg, two)


def _fp16_like_run(optimizer, model, steps: int = 3) -> None:
    """Steps under a GradScaler whose first step overflows and is skipped, as fp16's often do."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**18)
    x = torch.ones(2, 3, 8, 8)
    for i in range(steps):
        optimizer.zero_grad()
        loss = model(x).float().mean() * (1e36 if i == 0 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def test_fused_sgd_survives_a_skipped_first_step():
    """On CUDA the optimizer is fused; its momentum must not start from uninitialised memory
    when GradScaler skips the first step (the fused CPU kernel shows the same)."""
    cfg = tiny("unused", "unused")
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 4, 3)
        _fp16_like_run(optim.build_optimizer(model, cfg, fused=fused), model)
        runs.append(model.weight.detach().clone())
    torch.testing.assert_close(runs[1], runs[0])


def test_a_checkpoint_of_another_kernel_resumes_under_the_grad_scaler():
    """A CPU run's optimizer state loaded into a fused (CUDA) optimizer keeps it fused."""
    cfg = tiny("unused", "unused")
    model = torch.nn.Conv2d(3, 4, 3)
    plain = optim.build_optimizer(model, cfg, fused=False)
    _fp16_like_run(plain, model, steps=2)
    fused = optim.build_optimizer(model, cfg, fused=True)
    optim.load_optimizer_state(fused, plain.state_dict())
    assert all(group["fused"] for group in fused.param_groups)
    _fp16_like_run(fused, model, steps=2)  # GradScaler hands it its device-side inf check
    assert torch.isfinite(model.weight).all()


def _steps(optimizer, model, steps: range) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)  # fused kernels take its inf check
    for i in steps:
        optimizer.zero_grad()
        scaler.scale(model(torch.full((2, 3, 8, 8), 0.1 * i)).square().mean()).backward()
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_cpu_checkpoint_resumes_onto_the_fused_kernels_of_a_gpu(optimizer):
    """A CPU run's optimizer state loaded into the fused optimizer CUDA builds: every state
    lands on its parameter's device, AdamW's `step` included (the fused kernel reads it there;
    a GPU shown by the meta device), and the run goes on as if never interrupted."""
    cfg = tiny("unused", "unused", optimizer=optimizer, lr=0.01)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _steps(optim.build_optimizer(model, cfg, fused=False), model, range(4))
    whole = model.weight.detach().clone()

    model.load_state_dict(start)
    first = optim.build_optimizer(model, cfg, fused=False)
    _steps(first, model, range(2))
    saved = first.state_dict()
    gpu = torch.nn.Conv2d(3, 4, 3, device="meta")
    on_gpu = optim.build_optimizer(gpu, cfg, fused=True)
    optim.load_optimizer_state(on_gpu, saved)
    placed = [(name, v.device.type) for p in gpu.parameters()
              for name, v in on_gpu.state[p].items()]
    assert placed and all(device == "meta" for _, device in placed), placed
    fused = optim.build_optimizer(model, cfg, fused=True)
    optim.load_optimizer_state(fused, saved)
    assert all(group["fused"] for group in fused.param_groups)
    _steps(fused, model, range(2, 4))
    torch.testing.assert_close(model.weight.detach(), whole, rtol=1e-5, atol=1e-6)


def test_loader_bench_stops_its_clock_once_the_gpu_is_done(monkeypatch):
    """On a GPU a batch leaves the loader with its kernels queued: timed without a
    synchronize, bench-loader would report the host's throughput."""
    waits = []

    def synchronize(device):  # the GPU finishing the kernels queued so far
        waits.append(device)
        time.sleep(0.2)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    gpu = torch.device("cuda", 0)
    batches = iter([{"label": torch.zeros(2, 4, 4)}] * 5)
    samples, seconds, _ = loader_bench._time(batches, 3, warmup=2, device=gpu)
    assert samples == 6 and waits == [gpu, gpu] and 0.2 <= seconds < 0.4


def test_cuda_settings_are_made_as_asked():
    """TF32 and cuDNN's autotuner, set for a CUDA device (flags: the CPU can set them), in the
    settings every reader of them understands; off CUDA nothing is touched."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    try:
        assert precision.cuda_speed_settings(torch.device("cpu"), tf32=False) == {}
        assert torch.backends.cudnn.allow_tf32 == saved[1]
        for tf32 in (True, False):
            settings = precision.cuda_speed_settings(torch.device("cuda", 0), tf32=tf32)
            assert settings == {"tf32": tf32, "cudnn_benchmark": True}
            assert torch.backends.cuda.matmul.allow_tf32 is tf32
            assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cudnn.benchmark
            with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=tf32):
                pass  # what torch.utils.benchmark and inductor do with them
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]


def test_gpu_processes_get_torchs_sync_batchnorm_with_the_same_weights():
    model = UNet(19, width=4, depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synced = distributed.convert_sync_batchnorm(model, torch.device("cuda", 0))
    kinds = {type(m) for m in synced.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    after = synced.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.slow
def test_compile_trains_like_eager_and_saves_the_plain_weights(make_dataset, tmp_path,
                                                               monkeypatch):
    """`fit --compile`, one tiny step and its evaluation: torch.compile's capture and
    AOTAutograd (backend "aot_eager": what a GPU generates, Triton kernels, a CPU cannot show
    anyway) train the step eager does, and the checkpoint holds the model's own weights."""
    compiled, real = [], torch.compile

    def compile_(model, **kwargs):
        compiled.append(type(model).__name__)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    images, labels, names = blocks(4)
    data = make_dataset({"train": (images, labels, names),
                         "val": (images[:2], labels[:2], names[:2])})
    rows = [fit(tiny(data, tmp_path / f"run-{c}", epochs=1, width=4, depth=1, compile=c,
                     grid_samples=0)) for c in (False, True)]
    assert compiled == ["UNet", "UNet"]  # the model that trains and the one that evaluates
    assert rows[1]["step"] == 1
    for key in ("train_loss", "val_loss"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-4)
    plain, saved = (load_checkpoint(tmp_path / f"run-{c}/checkpoints/last.pt")["model"]
                    for c in (False, True))
    assert list(saved) == list(plain)  # no torch.compile wrapper in the names
