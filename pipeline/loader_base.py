"""The loader object both backends share: one pass is one epoch, the position, `state_dict()`,
and the batches as docs/design.md gives them (normalized images, int64 labels on the device).

A backend (`pipeline/loader.py`'s DALI graph, `pipeline/torch_loader.py`'s DataLoader) only
brings this rank's raw batches; everything after them happens here, the same for both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.augment.recipe import Augment
from pipeline.photometric import Normalizer
from pipeline.sampling import Plan, Position


class Loader:
    """One pass is one epoch (or what is left of it); the position survives breaks and resumes.

    Backends implement `_batches(start)`: this rank's raw batches from `start` (a `Position`)
    to the end of its epoch, as (image uint8 NxHxWx3, label uint8 NxHxW[x1], index N, params
    NxP or None). `position` is the one record of where the loader stands: it moves on as
    each batch is handed out (past an epoch's last batch it is the next epoch's first), a
    pass that is abandoned leaves it where it stopped, so `state_dict()` taken then resumes
    exactly there; the trainer asks it rather than counting. A jump (`load_state_dict`, an
    evaluation pass, which always starts at the split's first batch) goes through `_seek`,
    which tells the backend (`_jumped`) to drop what it read ahead.
    """

    def __init__(self, data_dir: Path, manifest: dict, split: str, plan: Plan,
                 aug: Augment | None, size: tuple[int, int], files: list[str],
                 counts: list[int], *, mean, std, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, workers: int) -> None:
        self.data_dir, self.manifest, self.split, self.plan, self.aug = (
            data_dir, manifest, split, plan, aug)
        self.size, self.files, self.counts, self.workers = size, files, counts, workers
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.classes = list(manifest["classes"])
        self.num_classes = len(self.classes)
        self.palette = np.asarray(manifest["palette"], dtype=np.uint8)
        self.ignore_index = int(manifest.get("ignore_index", 255))
        self.num_samples, self.batch_size, self.train = (
            plan.num_samples, plan.batch_size, plan.train)
        self.position = Position()
        self._normalize = Normalizer(self.mean, self.std, dtype)

    def __len__(self) -> int:
        return self.plan.batches

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.plan.world_size

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def state_dict(self) -> dict:
        return {"epoch": self.position.epoch, "batch": self.position.batch,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped, also with another number of processes.

        Global batch b of an epoch is the b-th block of one permutation whatever the world
        size, so a position carries over exactly when this run's global batch divides the
        images already read this epoch; otherwise it is a ValueError saying so.
        """
        epoch, batch = int(state["epoch"]), int(state.get("batch", 0))
        saved = int(state.get("global_batch", self.global_batch))
        if batch and saved != self.global_batch:
            read = batch * saved
            if read % self.global_batch:
                raise ValueError(
                    f"the checkpoint stopped {read} images into epoch {epoch + 1} ({batch} "
                    f"global batches of {saved}); this run's global batch of "
                    f"{self.global_batch} ({self.batch_size} per process x "
                    f"{self.plan.world_size}) does not divide {read}")
            batch = read // self.global_batch
        at = Position(epoch, batch)
        self._seek(Position.at(at.stream(len(self)), len(self)) if len(self) else at)

    def _seek(self, position: Position) -> None:
        """Stand at `position`; a backend reading ahead from elsewhere starts again there."""
        if position != self.position:
            self._jumped()
        self.position = position

    def __iter__(self):
        if not self.train:
            self._seek(Position(self.position.epoch, 0))
        start = self.position
        if start.batch >= len(self):  # nothing to read: an empty share of the split
            self.position = Position(start.epoch + 1, 0)
            return
        jitter = self.aug is not None and self.aug.jitter > 0
        for image, label, index, params in self._batches(start):
            image = self._normalize(image, params[:, self.aug.fields("colour")] if jitter else None)
            if self.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            label = label.reshape(label.shape[:3]).to(self.device, non_blocking=True).long()
            # the position moves on as a batch is handed out: after the last, the next epoch
            self.position = self.position.next(len(self))
            yield {"image": image, "label": label, "index": index.reshape(-1)}  # on the CPU

    def _batches(self, start: Position):
        raise NotImplementedError

    def _jumped(self) -> None:
        """The position moved by other means than handing batches out."""

    def close(self) -> None:
        pass
