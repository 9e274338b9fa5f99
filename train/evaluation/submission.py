"""A submission for the benchmark server: every image of a split predicted at the originals'
size and zipped as labelId PNGs, no label read (`citytrain evaluate --submit ZIP`)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from pipeline.files import tmp_path_for
from pipeline.labels import Mapping
from train.evaluation.full_resolution import Run, as_mapping, list_items
from train.evaluation.inference import WHOLE, Inference
from train.evaluation.loop import Scored
from train.losses import PixelLoss


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


class SubmissionPNGs:
    """(`{name}_pred.png`, its bytes) of each prediction; over the ranks, rank 0 gets them all
    (in rank order) and the others none."""

    def __init__(self, run: Run) -> None:
        self.run, self.pngs = run, []

    def add(self, scored: Scored) -> None:
        self.pngs.append((f"{scored.name}_pred.png", _png_bytes(self.run.label_png(scored.pred))))

    def all_reduce(self) -> None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(self.pngs, parts, dst=0)
        self.pngs = None if parts is None else [x for part in parts for x in part]


@torch.inference_mode()
def write_submission(
    model: torch.nn.Module,
    datadir: Path,
    split: str,
    zip_path: Path,
    *,
    mapping: Mapping | dict | str,
    mean,
    std,
    size: tuple[int, int],
    loss: PixelLoss | None = None,
    device: str | torch.device = "cpu",
    amp: str = "off",
    inference: Inference = WHOLE,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Predict every image of `split` and zip `{city}_{seq}_{frame}_pred.png` labelId PNGs at
    the originals' size into `zip_path`, as the benchmark server pairs them with its ground
    truth (cityscapesScripts' `{city}_{seq}_{frame}*.png` rule). Reads no label.

    Each rank predicts its block; rank 0 receives the PNGs and writes the zip under a
    temporary name, renamed when complete: an error anywhere leaves no zip. Returns the
    number of images.
    """
    mapping = as_mapping(mapping)
    items = list_items(datadir, split, labels=False)
    run = Run(model, mapping=mapping, mean=mean, std=std, size=size, loss=loss,
              device=device, amp=amp, inference=inference)
    pngs = SubmissionPNGs(run)
    run.accumulate(items, [pngs], rank=rank, world_size=world_size)
    if pngs.pngs is not None:
        zip_path = Path(zip_path)
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path_for(zip_path)
        try:
            # PNGs are compressed already: stored, not deflated
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
                for name, data in sorted(pngs.pngs):
                    z.writestr(name, data)
            os.replace(tmp, zip_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return len(items)
