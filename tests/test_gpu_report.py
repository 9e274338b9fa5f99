"""`citytrain gpu-report`: every stage runs (here on the CPU, at toy sizes); no CUDA, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from train import distributed
from train.cli import main
from train.gpu_report import Sizes, run_report


def test_every_stage_runs_and_the_report_is_written(tmp_path):
    sizes = Sizes(shard=(32, 64), crop=(32, 64), samples=16, batch_size=4, width=4, depth=2,
                  workers=(0,), loader_batches=3, steps=2, fit_steps=8, amps=("off", "bf16"),
                  compile=False)
    report = run_report(tmp_path, torch.device("cpu"), sizes)
    assert [x["workers"] for x in report["loader"]] == [0]
    assert report["loader"][0]["alignment"] == 1.0  # every clear pixel names its label
    assert report["loader"][0]["samples_per_s"] > 0
    assert set(report["peaks_tflops"]) == {"fp32", "bf16"}
    rows = report["training"]
    assert [(r["amp"], r["channels_last"]) for r in rows] == [
        ("off", False), ("off", True), ("bf16", False), ("bf16", True)]
    for r in rows:
        peak = report["peaks_tflops"]["fp32" if r["amp"] == "off" else "bf16"]
        assert r["peak_tflops"] == peak and r["mfu"] == r["achieved_tflops"] / peak
    wait = report["data_wait"]
    assert wait["steps"] == 8 and wait["epochs"] == 2 and 0 <= wait["data_wait_fraction"] <= 1
    assert set(report["goals"]["met"]) == {"loader > 2x training", "bf16 >= 2.5x fp32",
                                           "MFU >= 45%", "data wait < 2%"}
    assert json.loads((tmp_path / "report.json").read_text())["device"] == "cpu"
    md = (tmp_path / "report.md").read_text()
    assert "| amp | compile | channels_last | images/s |" in md and "data wait" in md


def _no_cuda(monkeypatch, tmp_path, nodes: int = 0, smi: bool = False) -> None:
    """torch without CUDA on a machine with `nodes` GPU device files and maybe nvidia-smi."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dev = tmp_path / "dev"
    dev.mkdir()
    for i in range(nodes):
        (dev / f"nvidia{i}").touch()
    (dev / "nvidiactl").touch()  # not a GPU
    monkeypatch.setattr(distributed, "GPU_NODES", str(dev / "nvidia[0-9]*"))
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
    assert distributed.why_no_cuda().endswith("is built without CUDA: install a CUDA build of "
                                              "torch")
