"""The loader: HDF5 shards -> DALI graph -> torch batches on the rank's device.

The one place that builds the DALI graph, in the style of NVIDIA nnU-Net's `dali_loader.py`:
each augmentation is a small function of (image, label) and `segmentation_graph` reads as the
recipe. A stateless per-sample callable (`ShardSource`) reads the shards in spawned worker
processes; scale, crop, flip and padding run on the GPU when there is one, else the same graph
on the CPU. Colour jitter and normalization follow on the same device, in torch
(`pipeline/photometric.py`).

Which sample goes where, and every random value of its augmentation, comes from
`pipeline/sampling.py`. The fallback for machines without DALI, `pipeline/torch_loader.py`,
shares all of this module but the geometry kernels.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.photometric import Normalizer
from pipeline.sampling import (
    Augment,
    Plan,
    ShardReader,
    check_shards,
    draw_augment,
    ignore_ctrl_c,
)
from pipeline.shards import ShardError, load_manifest


class ShardSource:
    """The per-sample callable of DALI's parallel external_source: stateless and picklable.

    The pipeline is one endless stream of batches: batch g of the stream (counted from `start`)
    is batch g % B of epoch g // B, B = batches per epoch on this rank. Positions past the end
    of a short last evaluation batch get a blank sample with index -1, cut off afterwards.
    """

    def __init__(self, reader: ShardReader, plan: Plan, aug: Augment | None,
                 size: tuple[int, int], start: int) -> None:
        self.reader, self.plan, self.aug, self.size, self.start = reader, plan, aug, size, start
        self._orders: dict[int, np.ndarray] = {}

    def __setstate__(self, state: dict) -> None:  # only ever unpickled in a DALI worker
        self.__dict__.update(state)
        ignore_ctrl_c()

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        epoch, b = divmod(self.start + info.iteration, self.plan.batches)
        if epoch not in self._orders:
            self._orders = {epoch: self.plan.order(epoch)}
        order, pos = self._orders[epoch], b * self.plan.batch_size + info.idx_in_batch
        if pos >= len(order):  # only in evaluation, which has no params output
            blank = np.zeros((*self.size, 3), np.uint8)
            return blank, blank[..., :1].copy(), np.full(1, -1, np.int64)
        index = int(order[pos])
        image, label = self.reader.read(index)
        sample = image, label[..., None], np.array([index], np.int64)
        if self.aug is None:
            return sample
        return *sample, draw_augment(self.plan.seed, epoch, index, self.size, self.aug)


# -- the graph: `params` is the per-sample vector of `draw_augment`; slicing it feeds the same
# draw to image and label. Both leave as uint8 HWC; `photometric.Normalizer` takes it from there.

def scale_crop_flip(image, label, params):
    """Resize the random source window (mirrored when flipped) to the output size.

    The label is resized with nearest, so it is never blended.
    """
    from nvidia.dali import fn, types

    roi = dict(roi_start=params[0:2], roi_end=params[2:4], roi_relative=False, size=params[4:6])
    image = fn.resize(image, **roi, interp_type=types.INTERP_LINEAR, antialias=False)
    label = fn.resize(label, **roi, interp_type=types.INTERP_NN)
    return image, label


def pad(image, label, crop):
    """Pad bottom/right up to the crop: image 0, label 255 (ignore). After the flip, so the
    padding always lands bottom/right."""
    from nvidia.dali import fn

    image = fn.pad(image, axis_names="HW", shape=list(crop), fill_value=0)
    label = fn.pad(label, axis_names="HW", shape=list(crop), fill_value=255)
    return image, label


def segmentation_graph(source, *, aug: Augment | None, gpu: bool, parallel: bool):
    """Read (CPU workers) -> to the GPU if any -> scale, crop and flip -> pad to the crop."""
    from nvidia.dali import fn

    extra = dict(parallel=True, prefetch_queue_depth=2) if parallel else {}
    n = 3 if aug is None else 4  # image, label, index (, params)
    image, label, index, *params = fn.external_source(
        source, num_outputs=n, batch=False, layout=["HWC", "HWC"] + [None] * (n - 2), **extra)
    if gpu:
        image, label = image.gpu(), label.gpu()
    if aug is None:
        return image, label, index
    image, label = scale_crop_flip(image, label, params[0])
    image, label = pad(image, label, aug.crop)
    return image, label, index, params[0]  # colour jitter and normalization: in torch


# -- the loader object -------------------------------------------------------------------------

class Loader:
    """One pass is one epoch (or what is left of it); the position survives breaks and resumes.

    Backends implement `_batches(epoch, start)`: this rank's raw batches of `epoch` from batch
    `start`, as (image uint8 NxHxWx3, label uint8 NxHxW[x1], index N, params NxP or None). A
    pass that is abandoned leaves the position where it stopped, so `state_dict()` taken then
    resumes exactly there; evaluation passes always start afresh.
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
        self.epoch, self._batch, self._resume = 0, 0, False
        self._normalize = Normalizer(self.mean, self.std, dtype)

    def __len__(self) -> int:
        return self.plan.batches

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.plan.world_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self._batch, "global_batch": self.global_batch}

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
        if len(self) and batch >= len(self):
            epoch, batch = epoch + batch // len(self), batch % len(self)
        self.epoch, self._batch, self._resume = epoch, batch, True

    def __iter__(self):
        if not self.train and not self._resume:
            self._batch = 0
        self._resume = False
        epoch, start = self.epoch, self._batch
        if start >= len(self):  # nothing to read: an empty share of the split
            self.epoch, self._batch = epoch + 1, 0
            return
        jitter = self.aug is not None and self.aug.jitter > 0
        for image, label, index, params in self._batches(epoch, start):
            image = self._normalize(image, params[:, 7:] if jitter else None)
            if self.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            label = label.reshape(label.shape[:3]).to(self.device, non_blocking=True).long()
            # the position moves on as a batch is handed out: after the last, the next epoch
            done = self._batch + 1
            self.epoch, self._batch = (epoch + 1, 0) if done == len(self) else (epoch, done)
            yield {"image": image, "label": label, "index": index.reshape(-1)}  # on the CPU

    def _batches(self, epoch: int, start: int):
        raise NotImplementedError

    def close(self) -> None:
        pass


def worker_error(e: Exception) -> Exception:
    """A worker's ShardError arrives wrapped in traceback text: unwrap it to its one line."""
    mark = f"{ShardError.__module__}.{ShardError.__name__}: "
    lines = [x for x in str(e).splitlines() if x.startswith(mark)]
    return ShardError(lines[-1][len(mark):]) if lines else e


class DaliLoader(Loader):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._iter, self._pipe, self._stream = None, None, -1

    def _build(self, start: int) -> None:
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.close()
        gpu = self.device.type == "cuda"
        if gpu and (problem := dali_cuda_mismatch()) and not _noticed.count(problem):
            print(f"warning: {problem}", file=sys.stderr)
            _noticed.append(problem)
        source = ShardSource(ShardReader(self.files, self.counts), self.plan, self.aug,
                             self.size, start)
        self._pipe = pipeline_def(segmentation_graph)(
            source, aug=self.aug, gpu=gpu, parallel=self.workers > 0,
            batch_size=self.batch_size, num_threads=max(1, self.workers),
            device_id=self.device.index if gpu else None, seed=self.plan.seed,
            py_num_workers=max(1, self.workers), py_start_method="spawn",
            prefetch_queue_depth=2)
        self._pipe.build()
        names = ["image", "label", "index"] + (["params"] if self.aug else [])
        try:  # the iterator runs the pipeline ahead at once
            self._iter = DALIGenericIterator(self._pipe, names, auto_reset=False)
        except Exception as e:
            self.close()
            raise worker_error(e) from None
        self._stream = start

    def _batches(self, epoch: int, start: int):
        per_epoch = len(self)
        if per_epoch == 0:
            return
        if self._iter is None or self._stream != epoch * per_epoch + start:
            self._build(epoch * per_epoch + start)  # a jump: skipped samples are never read
        left = len(self.plan.order(epoch)) - start * self.batch_size
        for _ in range(start, per_epoch):
            try:
                out = next(self._iter)[0]
            except Exception as e:
                raise worker_error(e) from None
            self._stream += 1
            n, left = min(self.batch_size, left), left - self.batch_size
            params = out["params"][:n] if self.aug else None
            yield out["image"][:n], out["label"][:n], out["index"][:n], params

    def close(self) -> None:
        pool = getattr(self._pipe, "_py_pool", None)
        self._iter, self._pipe, self._stream = None, None, -1
        if pool is not None:
            pool.close()


# -- building ----------------------------------------------------------------------------------

def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_cuda_mismatch() -> str | None:
    """Why the installed DALI build does not suit torch's CUDA, or None when it does."""
    import nvidia.dali

    dali = int(getattr(nvidia.dali, "__cuda_version__", 0)) // 1000
    ours = int(str(torch.version.cuda or "0").split(".")[0])
    if not dali or not ours or dali == ours:
        return None
    return (f"nvidia-dali is built for CUDA {dali} and torch for CUDA {ours}: two CUDA "
            f"runtimes in one process; install the matching build: pip install -e "
            f"'.[cuda{ours}]' (make install CUDA={ours})")


_noticed = []


def build_loader(data_dir: str | Path, split: str, batch_size: int, *, train: bool,
                 crop: tuple[int, int] = (512, 1024), scale: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, jitter: float = 0.2, mean=None, std=None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: torch.device | str = "auto",
                 workers: int | None = None, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, backend: str = "auto") -> Loader:
    """A loader over `split` of the shard folder `data_dir`; see "Loader contract" in DESIGN.md.

    `crop` is (H, W); `workers` reader processes (None: the CPUs per local rank; 0: read in
    this process); `backend` "dali", "torch" or "auto" (DALI when importable). `device` is
    the process's device as `train.distributed.setup` chose it (a string goes through the same
    `local_device`), so model and loader always agree.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, "
                         f"{rank}, {world_size}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, not {dtype}")
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"backend must be auto, dali or torch, not {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
        if backend == "torch" and not _noticed:
            print("note: nvidia.dali is not importable; loading data with the torch DataLoader "
                  "fallback", file=sys.stderr)
            _noticed.append(True)
    elif backend == "dali" and not dali_available():
        raise ImportError("backend='dali' needs nvidia-dali (Linux x86_64); use backend='torch'")
    if not isinstance(device, torch.device):
        from train.distributed import local_device  # the one owner of the device choice

        device = local_device(device)
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    files, counts, size = check_shards(data_dir, manifest, split)
    if workers is None:
        workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    plan = Plan(sum(counts), batch_size, train, rank, world_size, seed)
    aug = Augment(tuple(crop), tuple(scale), bool(flip), float(jitter)) if train else None
    cls = DaliLoader
    if backend == "torch":
        from pipeline.torch_loader import TorchLoader as cls
    return cls(data_dir, manifest, split, plan, aug, size, files, counts,
               mean=manifest["mean"] if mean is None else mean,
               std=manifest["std"] if std is None else std, device=device,
               dtype=dtype, channels_last=channels_last, workers=workers)
