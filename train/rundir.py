"""The run directory (`citytrain fit --out RUN`), written by rank 0 alone (the table of runs
that reads it back: `train/runs.py`).

    config.json      every setting, the shards' manifest config, versions
    status.json      running, stopped or done, why, how far, the best epoch (set_status)
    metrics.csv      one row per epoch (METRICS_COLUMNS)
    events.*         TensorBoard scalars: train loss/lr per step, val scores per epoch;
                     images: the val confusion matrix and per-class IoU at each validation
    checkpoints/     last.pt, best.pt (train/checkpoint.py); `--checkpoint RUN` is best.pt
    predictions/epoch_{e:03d}/val.png   image | ground truth | prediction
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import sizes
from pipeline.files import atomic_write_bytes

if TYPE_CHECKING:
    from train.engine import RunState

METRICS_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_miou", "pixel_acc",
                   "images_per_s", "data_wait_fraction")
STATUS = "status.json"
STATES = ("running", "stopped", "done")


def duration(seconds: float) -> str:
    """4.2 -> '4s', 270 -> '4m30s', 7500 -> '2h05m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _best(rows: list[dict]) -> tuple[float, int] | None:
    """(val mIoU, epoch) of the best validated row of metrics.csv, the first of equals."""
    scored = [(float(r["val_miou"]), int(r["epoch"])) for r in rows if r.get("val_miou")]
    return max(scored, key=lambda x: (x[0], -x[1])) if scored else None


def best_of(run: Path) -> tuple[float, int] | None:
    """(val mIoU, epoch) of a run's best validation, as its best.pt holds it; None without."""
    path = Path(run) / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return _best(list(csv.DictReader(f)))


SIZE_SETTINGS = ("crop", "eval_window", "eval_stride")  # (H, W) in Config


def named_sizes(config: dict) -> dict:
    """config.json's sizes as every file writes them, {"height", "width"} (pipeline/sizes.py):
    the settings' crop and windows, and the shards' size."""
    config = dict(config)
    if isinstance(config.get("config"), dict):
        config["config"] = {k: sizes.to_file(v) if k in SIZE_SETTINGS and v is not None else v
                            for k, v in config["config"].items()}
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("manifest_config"), dict):
        manifest = dict(data["manifest_config"])
        manifest["size"] = sizes.to_file(sizes.from_file(manifest["size"]))
        config["data"] = {**data, "manifest_config": manifest}
    return config


def resolve_checkpoint(path: Path) -> Path:
    """What `--checkpoint` names: a checkpoint file as it is, a run directory (or its
    checkpoints/ folder) its best.pt; other folders are a CheckpointError saying what to pass."""
    from train.checkpoint import CheckpointError

    path = Path(path)
    if not path.is_dir():
        return path
    folder = path if path.name == "checkpoints" else path / "checkpoints"
    if (folder / "best.pt").is_file():
        return folder / "best.pt"
    if (folder / "last.pt").is_file():
        raise CheckpointError(f"{path}: a run without best.pt (no validation has scored it "
                              f"yet); pass --checkpoint {folder / 'last.pt'}")
    if (path / "manifest.json").is_file():
        raise CheckpointError(f"{path}: a shard folder, not a run: pass it as --data, and as "
                              "--checkpoint a run directory (its best.pt) or a .pt file")
    raise CheckpointError(f"{path}: a folder without checkpoints/best.pt; pass a checkpoint "
                          "file or a run directory (`citytrain fit --out`)")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("cityseg", "torch", "torchvision", "numpy", "h5py", "nvidia-dali-cuda130",
                 "nvidia-dali-cuda120"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if not name.startswith("nvidia-dali"):  # one DALI build or the other
                out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None
    return out


class RunDir:
    """Files of one run. Every method is a no-op unless `enabled` (rank 0).

    On resume, metrics rows after the checkpoint's epoch are dropped (they will be redone) and
    TensorBoard purges events after its step, so a resumed run's records read as one run.
    """

    def __init__(self, out: Path, *, enabled: bool, resume_epoch: int | None = None,
                 resume_step: int | None = None, palette=None) -> None:
        self.out = Path(out)
        self.enabled = enabled
        self.metrics = self.out / "metrics.csv"
        self.writer = None
        self.palette = palette  # class colours of the IoU bars
        self.best: tuple[float, int] | None = None  # (val mIoU, epoch), as best.pt
        self.started = time.time()
        if not enabled:
            return
        (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_epoch is not None and self.metrics.is_file():
            with open(self.metrics, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(self.metrics, buf.getvalue().encode())
        self.best = _best(rows)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.out), purge_step=resume_step)

    @staticmethod
    def recorded(out: Path, key: str):
        """`key` of the config.json a run's earlier session wrote (None if unreadable)."""
        try:
            return json.loads((Path(out) / "config.json").read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None

    def write_config(self, config: dict) -> None:
        if self.enabled:
            config = {**named_sizes(config), "versions": versions(), "command": sys.argv}
            text = json.dumps(config, indent=1, default=str) + "\n"
            atomic_write_bytes(self.out / "config.json", text.encode())

    def log_epoch(self, row: dict, scores: dict | None) -> None:
        """Append the epoch's row to metrics.csv and its scores to TensorBoard."""
        if not self.enabled:
            return
        with open(self.metrics, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRICS_COLUMNS, lineterminator="\n").writerow(
                {k: "" if row.get(k) is None else row[k] for k in METRICS_COLUMNS})
        if row.get("val_miou") is not None and (self.best is None or
                                                row["val_miou"] > self.best[0]):
            self.best = (float(row["val_miou"]), int(row["epoch"]))
        step = row["step"]
        for key in ("train_loss", "images_per_s", "data_wait_fraction"):
            self.writer.add_scalar(f"epoch/{key}", row[key], step)
        for key in ("val_loss", "val_miou", "pixel_acc"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"val/{key}", row[key], step)
        for name, value in (scores or {}).get("iou", {}).items():
            if value is not None:
                self.writer.add_scalar(f"val_iou/{name}", value, step)
        if scores and "confusion" in scores:
            from train.evaluation.pictures import confusion_image, iou_image

            classes = list(scores["iou"])
            self.writer.add_image("val/confusion", confusion_image(scores["confusion"], classes),
                                  step, dataformats="HWC")
            self.writer.add_image("val/iou", iou_image(scores["iou"], self.palette, classes),
                                  step, dataformats="HWC")
        self.writer.flush()

    def set_status(self, state: str, reason: str | None, run: RunState, epochs: int) -> None:
        """status.json: `state` (running, stopped, done) and why, how far the run is, its
        best epoch, and which process on which host runs it (`citytrain runs` tells a run
        killed outright from a running one by it)."""
        if not self.enabled:
            return
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, not {state!r}")
        status = {"state": state, "reason": reason, "epoch": run.epoch, "epochs": epochs,
                  "step": run.step, "elapsed_s": round(run.elapsed, 3),
                  "best_miou": self.best[0] if self.best else None,
                  "best_epoch": self.best[1] if self.best else None,
                  "pid": os.getpid(), "host": socket.gethostname(),
                  "started": _iso(self.started), "updated": _iso(time.time())}
        atomic_write_bytes(self.out / STATUS, (json.dumps(status, indent=1) + "\n").encode())

    def save_grid(self, epoch: int, kept: dict | None, *, mean, std, palette) -> Path | None:
        if not self.enabled or not kept:
            return None
        from pipeline.photometric import denormalize
        from train.visualize import save_grid

        path = self.out / "predictions" / f"epoch_{epoch:03d}" / "val.png"
        return save_grid(denormalize(kept["image"], mean, std), kept["label"], kept["pred"],
                         palette, path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
