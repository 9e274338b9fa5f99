"""Which samples a rank reads, in which order, with which random values; reading one sample.

Everything here is a pure function of (seed, epoch, index) and the split's size, shared by both
loader backends (`pipeline/loader.py` for DALI, `pipeline/torch_loader.py`), so a run resumed
from the loader's `state_dict()` replays the uninterrupted one exactly, on either backend.
This module is what a reader worker process imports: numpy and h5py, never torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from pipeline.host import worker_setup
from pipeline.shards import ShardError, shard_info, split_shards

# draw_augment's vector, field by field: the one place its layout is written down. Every
# reader names the field it reads (the DALI graph, pipeline.geometry, the colour matrix).
WINDOW_START = slice(0, 2)  # (y0, x0): the source window's first row and column
WINDOW_END = slice(2, 4)  # (y1, x1): one past its last; x1 < x0 when it is read mirrored
OUTPUT_SIZE = slice(4, 6)  # (h, w) the window is resized to, at most the crop
COLOUR = slice(6, 10)  # brightness, contrast, saturation, hue (in turns)
NUM_PARAMS = 10


@dataclass(frozen=True)
class Augment:
    crop: tuple[int, int]  # (H, W)
    scale: tuple[float, float]
    flip: bool
    jitter: float


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


def draw_augment(seed: int, epoch: int, index: int, size: tuple[int, int],
                 aug: Augment) -> np.ndarray:
    """The random values of one sample: source window, output size, flip, colour jitter.

    Drawn in a fixed order from (seed, epoch, index) whatever the knobs, so switching one
    knob off leaves the others' values unchanged. `size` and `aug.crop` are (H, W). The window
    is cut from the source and resized to at most the crop, so work scales with the output;
    where the scaled image is smaller than the crop, the output is smaller and gets padded.
    A flip swaps the window's x ends: resizing a mirrored window mirrors the output. The
    fields are named above (WINDOW_START ... COLOUR); `Window.of` reads the geometry.

    Output pixel i of n samples the window of `win` pixels at (i + 1/2) win / n; when win
    holds more factors of two than n, some of those points fall exactly on a border between
    two source pixels, where nearest has two answers and the GPU's float32 arithmetic and
    the CPU's each pick one. A window one pixel smaller (odd) has no such point, so the
    label is the same on every kernel.
    """
    s, uy, ux, coin, *colour = np.random.default_rng((seed, epoch, index, 1)).random(8)
    s = aug.scale[0] + s * (aug.scale[1] - aug.scale[0])
    p = np.zeros(NUM_PARAMS, np.float32)
    start, end, out = p[WINDOW_START], p[WINDOW_END], p[OUTPUT_SIZE]  # views: written below
    for axis, u in enumerate((uy, ux)):
        n = min(aug.crop[axis], max(1, round(size[axis] * s)))
        win = min(size[axis], max(1, round(n / s)))
        if win & -win > n & -n:  # more factors of two in win than in n: see below
            win -= 1
        first = int(u * (size[axis] - win + 1))
        start[axis], end[axis], out[axis] = first, first + win, n
    if aug.flip and coin < 0.5:
        start[1], end[1] = end[1], start[1]
    j = aug.jitter
    brightness_contrast_saturation = 1 - j + 2 * j * np.array(colour[:3])
    hue = (colour[3] - 0.5) * j / 2  # +-j/4 of a turn: +-18 degrees at the default 0.2
    p[COLOUR] = [*brightness_contrast_saturation, hue]
    return p


class Window(NamedTuple):
    """`draw_augment`'s geometry, as the CPU kernels read it (pipeline/geometry.py)."""

    top: int
    left: int
    bottom: int
    right: int
    height: int  # of the output
    width: int
    flip: bool

    @classmethod
    def of(cls, p) -> Window:
        (y0, x0), (y1, x1), (h, w) = (p[WINDOW_START], p[WINDOW_END], p[OUTPUT_SIZE])
        return cls(int(y0), int(min(x0, x1)), int(y1), int(max(x0, x1)), int(h), int(w),
                   bool(x0 > x1))


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
        return *sample, draw_augment(self.plan.seed, epoch, index, self.size, self.aug)



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
