"""The run directory (`citytrain fit --out RUN`), written by rank 0 alone.

    config.json      every setting, the shards' manifest config, versions
    metrics.csv      one row per epoch (METRICS_COLUMNS)
    events.*         TensorBoard scalars: train loss/lr per step, val scores per epoch;
                     images: the val confusion matrix and per-class IoU at each validation
    checkpoints/     last.pt, best.pt (train/checkpoint.py)
    predictions/epoch_{e:03d}/val.png   image | ground truth | prediction
"""

from __future__ import annotations

import csv
import io
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from pipeline.files import atomic_write_bytes

METRICS_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_miou", "pixel_acc",
                   "images_per_s", "data_wait_fraction")


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
            config = {**config, "versions": versions(), "command": sys.argv}
            text = json.dumps(config, indent=1, default=str) + "\n"
            atomic_write_bytes(self.out / "config.json", text.encode())

    def log_epoch(self, row: dict, scores: dict | None) -> None:
        """Append the epoch's row to metrics.csv and its scores to TensorBoard."""
        if not self.enabled:
            return
        with open(self.metrics, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRICS_COLUMNS, lineterminator="\n").writerow(
                {k: "" if row.get(k) is None else row[k] for k in METRICS_COLUMNS})
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
            from train.visualize import confusion_image, iou_image

            classes = list(scores["iou"])
            self.writer.add_image("val/confusion", confusion_image(scores["confusion"], classes),
                                  step, dataformats="HWC")
            self.writer.add_image("val/iou", iou_image(scores["iou"], self.palette, classes),
                                  step, dataformats="HWC")
        self.writer.flush()

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
