"""Nothing outlives its parent: loader workers (both backends, train and val), a killed fit's
whole tree, preprocessing workers; and worker processes stay light (no torch in a reader)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BACKENDS, REPO, alive, descendants

from pipeline.loader import dali_available

pytestmark = [pytest.mark.slow,  # processes started, killed and counted
              pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                 reason="needs Linux /proc")]

def shared_segments(pids: list[int]) -> set[str]:
    """The /dev/shm files these processes have mapped (semaphores, DALI's segments)."""
    names = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        names |= {line.split()[-1] for line in maps.splitlines() if "/dev/shm/" in line}
    return {n.removesuffix(" (deleted)") for n in names}


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def kill_parent_and_check(proc: subprocess.Popen, min_workers: int) -> None:
    """SIGKILL the parent alone, as the OOM killer does; its tree must be gone in 10 s."""
    tree = descendants(proc.pid)
    assert len(tree) >= min_workers, tree
    segments = shared_segments([proc.pid, *tree])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not any(alive(p) for p in tree), 10,
             f"still alive 10 s after their parent's SIGKILL: "
             f"{[p for p in tree if alive(p)]}")
    wait_for(lambda: not any(Path(s).exists() for s in segments), 5,
             f"shared memory left behind: {[s for s in segments if Path(s).exists()]}")
    assert not list(Path("/dev/shm").glob("nvidia_dali_*"))


LOADER_DRIVER = """
import sys, time
from pipeline.loader import build_loader
if __name__ == "__main__":
    data, split, backend = sys.argv[1:]
    loader = build_loader(data, split, 2, train=split == "train", crop=(32, 64), workers=2,
                          backend=backend, device="cpu")
    next(iter(loader))
    print("ready", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_loader_workers_die_with_their_process(shards, backend, split, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(LOADER_DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(shards), split, backend],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        kill_parent_and_check(proc, min_workers=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_fit_leaves_no_process_behind(shards, backend, tmp_path):
    out = tmp_path / "run"
    args = ["fit", "--data", shards, "--out", out, "--epochs", "1000", "--batch-size", "2",
            "--crop", "32x64", "--width", "4", "--depth", "2", "--amp", "off", "--workers", "2",
            "--backend", backend, "--device", "cpu", "--no-progress", "--no-preflight"]
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        # two epochs done: both loaders have run their workers (the val loader's are gone
        # again after each evaluation, so at most the train loader's are alive)
        wait_for(lambda: (out / "metrics.csv").is_file()
                 and (out / "metrics.csv").read_text().count("\n") >= 3, 180, "no epoch done")
        kill_parent_and_check(proc, min_workers=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


PREPROCESS_DRIVER = """
import sys, time
import pipeline.shards as shards
add = shards.ShardWriter.add
def slow_add(self, *args):  # keep the workers busy long enough to be orphaned
    time.sleep(0.5)
    add(self, *args)
shards.ShardWriter.add = slow_add
from pipeline.preprocess import preprocess
preprocess(sys.argv[1], sys.argv[2], size=(32, 64), shard_size=1, workers=2, progress=False)
"""


def test_preprocess_workers_die_with_their_parent(city, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", PREPROCESS_DRIVER, str(city),
                             str(tmp_path / "out")], cwd=REPO, start_new_session=True)
    try:
        wait_for(lambda: len(descendants(proc.pid)) >= 2, 60, "the workers never started")
        kill_parent_and_check(proc, min_workers=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali not installed")
def test_dali_reader_workers_do_not_import_torch(shards, tmp_path):
    # spawn re-runs the main module's top level in each worker: imports go under the guard,
    # as `train.cli` and `pipeline.cli` keep theirs light
    script = tmp_path / "driver.py"
    script.write_text(LOADER_DRIVER.replace("from pipeline.loader import build_loader\n", "")
                      .replace('    data, split, backend = sys.argv[1:]',
                               '    from pipeline.loader import build_loader\n'
                               '    data, split, backend = sys.argv[1:]'))
    proc = subprocess.Popen([sys.executable, str(script), str(shards), "train", "dali"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = [p for p in descendants(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2
        for pid in workers:
            assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text(), "torch in a reader"
            assert rss_mb(pid) < 250
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


UNGUARDED = """
from pipeline.loader import build_loader
loader = build_loader({data!r}, "train", 2, train=True, crop=(32, 64), workers=1,
                      backend={backend!r}, device="cpu")
next(iter(loader))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_script_without_main_guard_is_told_the_cause_and_both_ways_out(shards, backend,
                                                                        tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(UNGUARDED.format(data=str(shards), backend=backend))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, start_new_session=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{script} has no `if __name__ == \"__main__\":` guard" in last, proc.stderr
    assert "workers=0" in last and "spawn runs the main script again" in last
    assert "Workers initialization failed" not in last
