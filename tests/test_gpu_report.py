"""`citytrain gpu-report`: every stage runs (here on the CPU, at toy sizes); no CUDA, exit 2."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

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


def test_without_cuda_it_says_so_in_one_line_and_exits_2(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["gpu-report", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "citytrain gpu-report needs a CUDA GPU, and this machine has none (make bench "
        "measures the CPU)"]
    assert not (tmp_path / "r").exists()
