"""What this process may use of its host, and how its worker processes behave.

- `usable_cpus()`: the CPUs this process may run on (its affinity mask, and the CPU quota of
  its cgroup, v1 or v2), not the machine's count: a SLURM job or a container gets a share.
- `available_memory()`: what can still be allocated, the cgroup's limit included.
- `cpu_seconds()`: CPU time of this process and its children, for the benchmarks.
- `worker_setup()`: run first in every worker process (loaders, preprocessing): Ctrl-C is
  left to the parent, and a worker exits as soon as its parent dies, however it died
  (SIGKILL and the OOM killer included), instead of lingering with its memory.
- `worker_error()`: a worker's failure as the user should read it (a shard error unwrapped,
  a script without a main guard named, with both ways out).

Free of torch: the loader's reader workers import this.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import signal
import sys
import threading
from pathlib import Path

from pipeline.shards import ShardError

CGROUP = Path("/sys/fs/cgroup")


def _cgroup_dirs(controller: str) -> list[Path]:
    """This process's cgroup folders for `controller` (v2 unified, v1 per controller)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" or controller in controllers.split(","):
            root = CGROUP if controllers == "" else CGROUP / controller
            dirs += [root / path.lstrip("/"), root]  # the container may see its cgroup as /
    return [d for d in dirs if d.is_dir()]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit() -> float | None:
    """CPUs the cgroup quota allows (e.g. 2.5), or None without a quota."""
    for d in _cgroup_dirs("cpu"):
        v2 = _read(d / "cpu.max")  # "max 100000" or "250000 100000"
        if v2:
            quota, period = v2.split()
            if quota != "max":
                return int(quota) / int(period)
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0:
            return int(quota) / int(period)
    return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by its cgroup's quota (at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def available_memory() -> int:
    """Bytes that can still be allocated on this host: MemAvailable, or the cgroup's headroom
    where its limit is lower."""
    meminfo = _read(Path("/proc/meminfo")) or ""
    available = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                      if line.startswith("MemAvailable:")), None)
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for d in _cgroup_dirs("memory"):
        limit = _read(d / "memory.max") or _read(d / "memory.limit_in_bytes")
        usage = _read(d / "memory.current") or _read(d / "memory.usage_in_bytes")
        if limit and limit != "max" and usage and int(limit) < 2**60:
            available = min(available, int(limit) - int(usage))
            break
    return max(0, available)


def cpu_seconds() -> float:
    """CPU time of this process and its children, live (read from /proc where there is one)
    and finished: the figure benchmarks divide by, which other load on the machine moves
    less than wall-clock time."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    total = sum(u.ru_utime + u.ru_stime for u in usage)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # readable once the parent is gone
    os._exit(1)


def worker_setup(*_worker_id: int) -> None:
    """Run in each worker process: leave Ctrl-C to the parent; die with the parent.

    A terminal's Ctrl-C reaches the whole process group: the trainer finishes its step,
    saves and closes its loaders, which stops the workers; a worker dying of
    KeyboardInterrupt first would only print a traceback and starve that last step.
    A parent killed outright cannot stop its workers, so each watches the pipe that
    multiprocessing keeps open to its parent (the parent's "sentinel"): it reads as closed
    the moment the parent dies, and the worker exits at once, freeing its memory and shared
    segments, rather than waiting for work that will never come.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None and getattr(parent, "sentinel", None) is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True,
                         name="exit-with-parent").start()


# -- what went wrong in a worker, in words ----------------------------------------------------

def worker_error(e: Exception) -> Exception:
    """A loader worker's error, as the user should read it.

    A ShardError arrives wrapped in traceback text: unwrapped to its one line. Workers that
    could not start at all are, nearly always, a script without a main guard: said so.
    """
    mark = f"{ShardError.__module__}.{ShardError.__name__}: "
    lines = [x for x in str(e).splitlines() if x.startswith(mark)]
    if lines:
        return ShardError(lines[-1][len(mark):])
    text = str(e)
    if "Workers initialization failed" in text or "exited unexpectedly" in text:
        return RuntimeError(_workers_failed(text))
    return e


GUARD = 'if __name__ == "__main__":'


def _unguarded_main() -> str | None:
    """The main script's path when it has no main guard, else None."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        text = Path(path).read_text() if path and path.endswith(".py") else None
    except OSError:
        return None
    if text is None or re.search(r"""if\s+__name__\s*==\s*['"]__main__['"]\s*:""", text):
        return None
    return path


def _workers_failed(cause: str) -> str:
    why = ("they are spawned (safe beside CUDA), and spawn runs the main script again in "
           "each worker, so a script that builds a loader at its top level builds it again "
           "in every worker")
    script = _unguarded_main()
    if script:
        return (f"the loader's worker processes could not start: {script} has no "
                f"`{GUARD}` guard. {why[0].upper()}{why[1:]}. Put the script's code under "
                f"`{GUARD}`, or build the loader with workers=0 (read in this process)")
    return (f"the loader's worker processes could not start ({cause.strip()}). If the main "
            f"script builds the loader at its top level: {why}; put its code under `{GUARD}`, "
            "or build the loader with workers=0")


def refuse_in_starting_worker() -> None:
    """A worker re-running an unguarded script reaches `build_loader`: end it in one line."""
    if multiprocessing.parent_process() is not None and \
            getattr(multiprocessing.current_process(), "_inheriting", False):
        print(f"error: a loader worker re-ran {_unguarded_main() or 'the main script'} up to "
              f"build_loader(); put the script under `{GUARD}`", file=sys.stderr)
        raise SystemExit(1)
