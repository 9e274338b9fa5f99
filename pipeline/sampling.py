"""Which samples a rank reads, in which order, with which random values; reading one sample.

Everything here is a pure function of (seed, epoch, index) and the split's size (the random
values of an augmentation come from its recipe, `pipeline/augment/recipe.py`), shared by both
loader backends (`pipeline/loader.py` for DALI, `pipeline/torch_loader.py`), so a run resumed
from the loader's `state_dict()` replays the uninterrupted one exactly, on either backend.
This module is what a reader worker process imports: numpy and h5py, never torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.augment.recipe import Augment
from pipeline.host import worker_setup
from pipeline.shards import ShardError, shard_info, split_shards


@dataclass(frozen=True)
class Plan:
    """This rank's share of the split, per epoch.

    Training: a permutation drawn from (seed, epoch), the same on every rank, cut to a whole
    number of global batches and dealt out by global rank. Evaluation: rank r reads the r-th
    contiguous block of the split, so the ranks together read each sample exactly once.
    """

    num_samples: int
    batch_size: int
    train: bool
    rank: int = 0
    world_size: int = 1
    seed: int = 0

    @property
    def batches(self) -> int:
        if self.train:
            return self.num_samples // (self.batch_size * self.world_size)
        return -(-len(self.order(0)) // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in the order they are served."""
        n, r, w = self.num_samples, self.rank, self.world_size
        if not self.train:
            return np.arange(r * n // w, (r + 1) * n // w)
        used = n // (self.batch_size * w) * self.batch_size * w
        return np.random.default_rng((self.seed, epoch)).permutation(n)[r:used:w]


@dataclass(frozen=True)
class Position:
    """Where a loader stands: batch `batch` of epoch `epoch` is the next it hands out.

    A loader's batches are one endless stream: batch g of the stream is batch g % B of epoch
    g // B, B being this rank's batches per epoch. `stream` and `at` convert between the two;
    nothing else does that arithmetic.
    """

    epoch: int = 0
    batch: int = 0

    def stream(self, per_epoch: int) -> int:
        return self.epoch * per_epoch + self.batch

    @classmethod
    def at(cls, stream: int, per_epoch: int) -> Position:
        epoch, batch = divmod(stream, per_epoch)
        return cls(epoch, batch)

    def next(self, per_epoch: int) -> Position:
        return Position.at(self.stream(per_epoch) + 1, per_epoch)


def _read_sample(ds: h5py.Dataset, i: int) -> np.ndarray:
    """Sample i of an image or label dataset, which holds one chunk per sample.

    An unfiltered chunk (compression "none") is the sample's bytes as they are: read it
    directly, past HDF5's selection machinery, in a third of the time `ds[i]` takes.
    """
    if ds.chunks != (1, *ds.shape[1:]) or ds.id.get_create_plist().get_nfilters():
        return ds[i]
    out = np.empty(ds.shape[1:], ds.dtype)
    ds.id.read_direct_chunk((i,) + (0,) * (ds.ndim - 1), out=out.reshape(-1))
    return out


class ShardReader:
    """Sample `index` of a split -> (image HxWx3, label HxW); files open lazily per process."""

    def __init__(self, files: list[str], counts: list[int]) -> None:
        self.files, self.offsets = list(files), np.cumsum([0, *counts])
        self._handles: dict[int, h5py.File] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # never ship an open HDF5 handle

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        i = index - int(self.offsets[k])
        try:
            if k not in self._handles:
                self._handles[k] = h5py.File(self.files[k], "r")
            f = self._handles[k]
            return _read_sample(f["image"], i), _read_sample(f["label"], i)
        except OSError as e:
            raise ShardError(f"{self.files[k]}: sample {i} unreadable ({e}); "
                             "run `cityprep verify`") from None


class ShardSource:
    """The per-sample callable of DALI's parallel external_source: stateless and picklable.

    The pipeline is the loader's stream of batches (`Position`) from stream batch `start` on.
    Positions past the end of a short last evaluation batch get a blank sample with index -1,
    cut off afterwards.
    """

    def __init__(self, reader: ShardReader, plan: Plan, aug: Augment | None,
                 size: tuple[int, int], start: int) -> None:
        self.reader, self.plan, self.aug, self.size, self.start = reader, plan, aug, size, start
        self._orders: dict[int, np.ndarray] = {}

    def __setstate__(self, state: dict) -> None:  # only ever unpickled in a DALI worker
        self.__dict__.update(state)
        worker_setup()

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        at = Position.at(self.start + info.iteration, self.plan.batches)
        epoch = at.epoch
        if epoch not in self._orders:
            self._orders = {epoch: self.plan.order(epoch)}
        order, pos = self._orders[epoch], at.batch * self.plan.batch_size + info.idx_in_batch
        if pos >= len(order):  # only in evaluation, which has no params output
            blank = np.zeros((*self.size, 3), np.uint8)
            return blank, blank[..., :1].copy(), np.full(1, -1, np.int64)
        index = int(order[pos])
        image, label = self.reader.read(index)
        sample = image, label[..., None], np.array([index], np.int64)
        if self.aug is None:
            return sample
        return *sample, self.aug.draw(self.plan.seed, epoch, index, self.size)



def check_shards(data_dir: Path, manifest: dict, split: str) -> tuple[list, list, tuple]:
    """Open every shard of the split now, so a bad file fails here and not in a worker."""
    files, counts, size = [], [], None
    for path, n in split_shards(data_dir, manifest, split):
        info = shard_info(path)
        if info.num_samples != n:
            raise ShardError(f"{path}: holds {info.num_samples} samples, the manifest says {n}; "
                             "run `cityprep verify` or preprocess again")
        if size is not None and info.size != size:
            raise ShardError(f"{path}: images are {info.size}, other shards {size} (H, W)")
        files.append(str(path))
        counts.append(n)
        size = info.size
    if size is None:
        raise ShardError(f"{data_dir}: split {split!r} has no shards")
    return files, counts, size
