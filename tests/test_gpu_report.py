"""`citytrain gpu-report`: every stage runs (here on the CPU, at toy sizes); no CUDA, exit 2."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from pipeline import devices
from pipeline import loader as loader_module
from train import distributed, gpu_report
from train.cli import main
from train.gpu_report import Sizes, run_report

TOY = Sizes(shard=(32, 64), crop=(32, 64), samples=16, batch_size=4, width=4, depth=2,
           workers=(0,), loader_batches=3, steps=2, fit_steps=8, amps=("off", "bf16"),
           compile=False, encoder="resnet18")


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("report")
    return out, run_report(out, torch.device("cpu"), TOY)


@pytest.mark.slow
def test_every_stage_runs_and_the_report_is_written(toy_report):
    tmp_path, report = toy_report
    assert [x["workers"] for x in report["loader"]] == [0]
    assert report["loader"][0]["alignment"] == 1.0  # every clear pixel names its label
    assert report["loader"][0]["samples_per_s"] > 0
    assert set(report["peaks_tflops"]) == {"fp32", "bf16"}
    rows = report["training"]
    assert [(r["encoder"], r["amp"], r["channels_last"]) for r in rows] == [
        ("plain", "off", False), ("plain", "off", True), ("plain", "bf16", False),
        ("plain", "bf16", True), ("resnet18", "bf16", False), ("resnet18", "bf16", True)]
    for r in rows:
        peak = report["peaks_tflops"]["fp32" if r["amp"] == "off" else "bf16"]
        assert r["peak_tflops"] == peak and r["mfu"] == r["achieved_tflops"] / peak
    wait = report["data_wait"]
    assert wait["steps"] == 8 and wait["epochs"] == 2 and 0 <= wait["data_wait_fraction"] <= 1
    assert set(report["goals"]["met"]) == {"loader > 2x training", "bf16 >= 2.5x fp32",
                                           "MFU >= 45%", "data wait < 2%",
                                           "encoder >= 700 img/s"}
    assert json.loads((tmp_path / "report.json").read_text())["device"] == "cpu"
    md = (tmp_path / "report.md").read_text()
    assert "| model | amp | compile | channels_last | images/s |" in md and "data wait" in md
    assert "| resnet18 | bf16 | False | True |" in md
    assert report["skipped"] == [] and "Skipped" not in md


@pytest.mark.slow
def test_a_rerun_reuses_its_shards_and_a_spent_budget_cuts_what_runs(toy_report, tmp_path):
    out, _ = toy_report
    shards, cpu = out / "shards", torch.device("cpu")
    written = (shards / "manifest.json").stat().st_mtime_ns
    assert gpu_report.synthetic_shards(shards, TOY) == shards
    assert (shards / "manifest.json").stat().st_mtime_ns == written  # written once
    # the budget's end already passed: the loader's timing stops after one batch, and a fit
    # with no time left stops inside its first epoch, which the figure leaves out
    assert gpu_report.measure_loader(shards, cpu, TOY, 0, until=0.0)["samples_per_s"] > 0
    assert gpu_report.measure_data_wait(shards, cpu, TOY, tmp_path, time_limit=1e-9) == {
        "skipped": "the time budget ended the fit in its first epoch"}
    budget = gpu_report.Budget(60.0)
    assert gpu_report._data_wait_phase(shards, cpu, TOY, tmp_path, budget, [
        {"amp": "off", "step_time_s": 0.1}]) == {"skipped": "time budget"}
    assert budget.skipped == ["data wait (no bf16 step time to plan the fit by)"]


@pytest.mark.slow
def test_the_command_measures_on_the_gpu_within_its_budget(toy_report, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    asked = []
    monkeypatch.setattr(gpu_report, "run_report",
                        lambda out, device, sizes: asked.append((out, device, sizes.budget_s))
                        or toy_report[1])
    result = CliRunner().invoke(main, ["gpu-report", "--out", str(tmp_path), "--budget", "99"])
    assert result.exit_code == 0, result.output
    assert asked == [(tmp_path, torch.device("cuda", 0), 99.0)]
    assert result.output.startswith("# gpu-report: cpu, ")
    assert result.output.endswith(f"wrote {tmp_path / 'report.md'} and "
                                  f"{tmp_path / 'report.json'}\n")


def test_the_gpu_peaks_are_measured_with_tf32_off_then_on_and_left_off(monkeypatch):
    """The MFU table's fp32 peak is true fp32, its tf32 peak TF32's; the rows after it run
    with TF32 off."""
    seen = []
    monkeypatch.setattr(gpu_report, "measure_matmul_tflops", lambda device, amp: seen.append(
        (amp, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)) or 1.0)
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        peaks = gpu_report.measure_peaks(torch.device("cuda", 0), ("bf16", "off"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
    assert list(peaks) == ["bf16", "fp32", "tf32"]
    assert seen == [("bf16", False, False), ("off", False, False), ("off", True, True)]


@pytest.mark.slow
def test_fit_and_the_report_load_with_the_same_number_of_readers(tmp_path, monkeypatch):
    """The loader row and the data-wait fit both take `fit`'s default readers."""
    monkeypatch.setattr(loader_module, "usable_cpus", lambda: 3)
    seen = []
    real = gpu_report.build_loader
    monkeypatch.setattr(gpu_report, "build_loader",
                        lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    report = run_report(tmp_path, torch.device("cpu"), replace(TOY, workers=(None,)))
    assert [x["workers"] for x in report["loader"]] == [3]
    assert json.loads((tmp_path / "fit/config.json").read_text())["config"]["workers"] is None
    assert {x.workers for x in seen} == {3}


def _slow_bench(**kwargs) -> dict:
    time.sleep(4.0)
    return {**{k: kwargs[k] for k in ("encoder", "amp", "compile", "channels_last")},
            "images_per_s": 4.0, "step_time_s": 1.0, "achieved_tflops": 0.1, "peak_tflops": 1.0,
            "mfu": 0.1, "peak_memory_mb": 1.0, "memory_kind": "process RSS",
            "gflops_per_image": 1.0}


@pytest.mark.slow
def test_the_report_keeps_to_its_budget_when_a_phase_is_slow(tmp_path, monkeypatch):
    """Training rows of 4 s each in a 12 s report: what would not fit is skipped, named."""
    monkeypatch.setattr(gpu_report, "run_bench", _slow_bench)
    sizes = replace(TOY, encoder=None, amps=("bf16", "off"), budget_s=12.0, fit_startup_s=1.0,
                    compile=True, compile_s=30.0)
    report = run_report(tmp_path, torch.device("cpu"), sizes)
    assert report["seconds"] <= sizes.budget_s
    done = [r for r in report["training"] if "skipped" not in r]
    assert 1 <= len(done) <= 2 and len(report["training"]) == 6  # 4 rows, 2 compiled
    assert report["data_wait"] == {"skipped": "time budget"}
    assert len(report["skipped"]) == 7 - len(done)  # the rows left out and the fit
    assert [s.split(" (")[0] for s in report["skipped"][-3:]] == [
        "data wait", "training plain bf16 compiled", "training plain bf16 compiled channels_last"]
    md = (tmp_path / "report.md").read_text()
    assert "Skipped to keep to the 12 s budget: " in md and "data wait (needs about" in md
    assert "fit, bf16: skipped (time budget)" in md
    assert report["goals"]["met"]["data wait < 2%"] is None


def _no_cuda(monkeypatch, tmp_path, nodes: int = 0, smi: bool = False) -> None:
    """torch without CUDA on a machine with `nodes` GPU device files and maybe nvidia-smi."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dev = tmp_path / "dev"
    dev.mkdir()
    for i in range(nodes):
        (dev / f"nvidia{i}").touch()
    (dev / "nvidiactl").touch()  # not a GPU
    monkeypatch.setattr(devices, "GPU_NODES", str(dev / "nvidia[0-9]*"))
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    if smi:
        (bin_ / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_ / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))


def test_without_cuda_it_says_so_in_one_line_and_exits_2(monkeypatch, tmp_path):
    _no_cuda(monkeypatch, tmp_path)
    result = CliRunner().invoke(main, ["gpu-report", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "citytrain gpu-report needs a CUDA GPU (make bench measures the CPU): this machine "
        "has no CUDA GPU"]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("nodes, smi", [(2, False), (0, True), (1, True)])
def test_a_gpu_torch_cannot_use_is_named_with_the_driver_as_the_likely_cause(
        monkeypatch, tmp_path, nodes, smi):
    """A driver older than torch's CUDA: no CUDA for torch, but the GPU is plainly there."""
    _no_cuda(monkeypatch, tmp_path, nodes, smi)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    result = CliRunner().invoke(main, ["gpu-report", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    seen = tmp_path / ("dev/nvidia0" if nodes else "bin/nvidia-smi")
    assert result.output.strip().splitlines() == [
        "citytrain gpu-report needs a CUDA GPU (make bench measures the CPU): this machine "
        f"has an NVIDIA GPU ({seen}), but "
        f"torch {torch.__version__} cannot use it: most often the NVIDIA driver is older than "
        "torch's CUDA 13.0 needs (nvidia-smi shows the newest CUDA the driver takes); update "
        "the driver, or install torch's wheels for that CUDA (e.g. cu126) and the DALI build "
        "beside them (make install CUDA=12)"]
    # the same words wherever a run asks for the GPU, and for a torch without CUDA at all
    with pytest.raises(RuntimeError, match=r"--device cuda: no CUDA device is available: this "
                                           r"machine has an NVIDIA GPU .* cannot use it"):
        distributed.local_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert devices.why_no_cuda().endswith("is built without CUDA: install a CUDA build of "
                                              "torch")
