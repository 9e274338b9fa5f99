"""`citytrain runs`: the table of the runs under a folder, read from their run directories
(`train/rundir.py` writes them): what each run is, how far it got, its best and its last
evaluation, its time and its state (a run whose process is gone is said to be killed).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from train.rundir import STATUS, best_of, duration

SCORES = ("miou", "iiou", "category_miou", "category_iiou")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _state(run: Path, status: dict, config: dict) -> tuple[str, str | None, dict]:
    """(state, why, progress) of a run: its status.json; for a run of an older version,
    its last checkpoint against the epochs it was asked for."""
    if status:
        state, why = status.get("state", "stopped"), status.get("reason")
        if state == "running" and status.get("host") == socket.gethostname() and \
                not _alive(int(status.get("pid", 0))):
            state, why = "stopped", "killed (its process is gone)"
        elif state == "running" and status.get("host") != socket.gethostname():
            why = f"on {status.get('host')}"
        return state, why, status
    last = run / "checkpoints" / "last.pt"
    if not last.is_file():
        return "stopped", "no checkpoint", {}
    import torch

    try:  # mmap: only the small values are read, not the weights
        ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a table of runs shows what it can
        return "stopped", "unreadable last.pt", {}
    progress = {"epoch": ckpt.get("epoch"), "elapsed_s": ckpt.get("elapsed")}
    epochs = (config.get("config") or {}).get("epochs")
    done = epochs is not None and (ckpt.get("epoch") or 0) >= epochs
    return ("done" if done else "stopped"), None, progress


def _last_evaluation(run: Path) -> tuple[str | None, dict]:
    """The newest RUN/eval-*/metrics.json: (its folder's name, its scores)."""
    found = sorted((p for p in run.glob("eval-*/metrics.json") if p.is_file()),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        return None, {}
    return found[-1].parent.name, _read_json(found[-1])


def run_summary(run: Path, root: Path | None = None) -> dict:
    """One row of `citytrain runs`: what a run is, how far it got, its best, its last
    evaluation's four scores, its time and state."""
    run = Path(run)
    config = _read_json(run / "config.json")
    settings = config.get("config") or {}
    status = _read_json(run / STATUS)
    state, why, progress = _state(run, status, config)
    best = best_of(run)
    folder, metrics = _last_evaluation(run)
    name = str(run.relative_to(root)) if root is not None and run != root and \
        run.is_relative_to(root) else str(run)
    return {
        "run": name, "path": str(run),
        "encoder": settings.get("encoder") or (config.get("model") or {}).get("encoder")
        or "plain",
        "epoch": progress.get("epoch"), "epochs": status.get("epochs", settings.get("epochs")),
        "best_miou": best[0] if best else None, "best_epoch": best[1] if best else None,
        "evaluation": folder, **{k: metrics.get(k) for k in SCORES},
        "elapsed_s": progress.get("elapsed_s"), "state": state, "reason": why,
    }


def find_runs(root: Path) -> list[Path]:
    """Every run directory at or under `root` (a folder with metrics.csv and config.json)."""
    root = Path(root)
    found = {p.parent for p in root.rglob("metrics.csv") if (p.parent / "config.json").is_file()}
    if (root / "metrics.csv").is_file() and (root / "config.json").is_file():
        found.add(root)
    return sorted(found)


def format_runs(rows: list[dict]) -> str:
    """The table: one line per run."""
    def score(v) -> str:
        return "-" if v is None else f"{v:.4f}"

    header = ["run", "encoder", "epochs", "best mIoU", "at", "last evaluation", "mIoU", "iIoU",
              "cat mIoU", "cat iIoU", "time", "state"]
    lines = [header]
    for r in rows:
        epochs = f"{'-' if r['epoch'] is None else r['epoch']}/{r['epochs'] or '-'}"
        said = r["reason"] and r["reason"] != "epochs"  # done with its epochs: just done
        state = r["state"] + (f" ({r['reason']})" if said else "")
        lines.append([r["run"], r["encoder"], epochs, score(r["best_miou"]),
                      "-" if r["best_epoch"] is None else str(r["best_epoch"]),
                      r["evaluation"] or "-", *(score(r[k]) for k in SCORES),
                      "-" if r["elapsed_s"] is None else duration(r["elapsed_s"]), state])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {2, 3, 4, 6, 7, 8, 9, 10}  # numbers
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)
