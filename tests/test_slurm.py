"""The SLURM recipes in examples/slurm: valid bash, and the commands they start, run against
stand-ins for srun, scontrol, cityprep and torchrun."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parents[1] / "examples" / "slurm"


@pytest.mark.parametrize("script", ["preprocess.sbatch", "train.sbatch"])
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def stubs(tmp_path) -> Path:
    """Commands that write their arguments, one line per call, to calls.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("cityprep", "srun"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/bash\nprintf "%q " {name} "$@" >> "{tmp_path}/calls.txt"\n'
                        f'echo >> "{tmp_path}/calls.txt"\n')
        stub.chmod(0o755)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/bash\nprintf 'gpu-a07\\ngpu-a08\\n'\n")
    scontrol.chmod(0o755)
    return bin_dir


def run(script: str, stubs: Path, cwd: Path, **env) -> list[list[str]]:
    environ = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(cwd), "BIN": str(stubs),
               **env}
    result = subprocess.run(["bash", str(SLURM / script)], cwd=cwd, env=environ,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = (stubs.parent / "calls.txt").read_text().splitlines()
    return [shlex.split(line) for line in calls]


def test_preprocess_array_task_writes_its_part(stubs, tmp_path):
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_CPUS_PER_TASK": "32",
           "DATADIR": "/data/cityscapes", "OUT": "/shared/cs-1024x512"}
    [call] = run("preprocess.sbatch", stubs, tmp_path, **env)
    assert call == ["cityprep", "preprocess", "--datadir", "/data/cityscapes", "--out",
                    "/shared/cs-1024x512", "--size", "1024x512", "--mode", "fine", "--split",
                    "train", "--split", "val", "--workers", "32", "--part", "3/8", "--quiet"]
    (tmp_path / "calls.txt").unlink()
    env.update(SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_MIN="0", MODE="coarse",
               SPLITS="train train_extra val")  # an array counted from 0
    [call] = run("preprocess.sbatch", stubs, tmp_path, **env)
    assert call[call.index("--part") + 1] == "1/8"
    assert " ".join(call).count("--split") == 3 and "train_extra" in call
    text = (SLURM / "preprocess.sbatch").read_text()
    assert "#SBATCH --array=1-" in text


def test_train_starts_one_torchrun_per_node_meeting_on_the_first(stubs, tmp_path):
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-a[07-08]",
           "SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "8", "DATA": "/shared/cs",
           "RUN": str(tmp_path / "run"), "INIT": "runs/coarse/checkpoints/last.pt"}
    [call] = run("train.sbatch", stubs, tmp_path, **env)
    torchrun = call.index(f"{stubs}/torchrun")
    assert call[:torchrun] == ["srun", "--nodes=2", "--ntasks-per-node=1",
                               "--kill-on-bad-exit=1"]
    assert call[torchrun + 1:] == [
        "--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu-a07:29500", "--rdzv-id=4242", "-m", "train.cli", "fit", "--data",
        "/shared/cs", "--out", str(tmp_path / "run"), "--epochs", "200", "--workers", "8",
        "--init", "runs/coarse/checkpoints/last.pt"]
    # resubmitted after a time limit: the run's own checkpoint, never --init with --resume
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    (tmp_path / "calls.txt").unlink()
    [call] = run("train.sbatch", stubs, tmp_path, **env)
    assert call[-1] == "--resume" and "--init" not in call
