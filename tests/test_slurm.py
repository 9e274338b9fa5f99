"""The SLURM recipes in examples/slurm: valid bash, and the commands they start, run against
stand-ins for srun, scontrol, cityprep and torchrun."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
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
        "--rdzv-endpoint=gpu-a07:29500", "--rdzv-id=4242", "--max-restarts=3", "-m",
        "train.cli", "fit", "--data", "/shared/cs", "--out", str(tmp_path / "run"), "--epochs",
        "200", "--workers", "8", "--resume", "auto", "--init", "runs/coarse/checkpoints/last.pt"]
    # requeued after a time limit, RUN holding a checkpoint: the same command, the trainer
    # continues (--resume auto) and --init only counts for a run's start
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    (tmp_path / "calls.txt").unlink()
    assert run("train.sbatch", stubs, tmp_path, **env) == [call]
    text = (SLURM / "train.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    assert "#SBATCH --open-mode=append" in text  # every allocation's lines in one log


SAVING_SRUN = """#!/bin/bash
# srun as the trainers behave under it: SIGTERM, a save, exit 143 (128 + SIGTERM)
printf "%q " srun "$@" >> {calls}; echo >> {calls}
trap 'echo "srun: SIGTERM, saving" >> {calls}; sleep 0.3; echo "srun: exit 143" >> {calls};
      exit 143' TERM
for _ in $(seq {loops}); do sleep 0.1; done
echo "srun: done" >> {calls}
exit {status}
"""


def start(stubs: Path, tmp_path: Path, status: int = 0, seconds: float = 60) \
        -> subprocess.Popen:
    """train.sbatch started, its srun running (for `seconds` unless signalled)."""
    calls = tmp_path / "calls.txt"
    (stubs / "srun").write_text(SAVING_SRUN.format(calls=calls, status=status,
                                                   loops=int(seconds * 10)))
    (stubs / "scontrol").write_text(
        f'#!/bin/bash\nif [ "$1" = requeue ]; then echo "scontrol $*" >> {calls}; '
        "else printf 'gpu-a07\\n'; fi\n")
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(tmp_path), "BIN": str(stubs),
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu-a07",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_RESTART_COUNT": "2", "RUN": str(tmp_path / "r")}
    proc = subprocess.Popen(["bash", str(SLURM / "train.sbatch")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (calls.is_file() and calls.read_text().startswith("srun ")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_train_requeues_itself_after_the_trainers_saved(stubs, tmp_path, signum):
    # USR1: SLURM's warning before the time limit; TERM: a preemption
    proc = start(stubs, tmp_path)
    proc.send_signal(signum)
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, log
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[1:] == ["srun: SIGTERM, saving", "srun: exit 143", "scontrol requeue 4242"]
    assert "train.sbatch: job 4242, allocation 3 on 1 node(s) from gpu-a07" in log
    assert f"train.sbatch: {signum.name} at" in log and "requeueing job 4242" in log


@pytest.mark.slow
def test_train_ends_as_the_training_ends_without_a_requeue(stubs, tmp_path):
    proc = start(stubs, tmp_path, status=3, seconds=1)  # failed past torchrun's restarts
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, log
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[1:] == ["srun: done"] and "requeue" not in log
