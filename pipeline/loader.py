"""The loader: HDF5 shards -> DALI graph -> torch batches on the rank's device.

The one place that builds the DALI graph: `segmentation_graph` reads the samples and runs
the recipe's augmentations on them in order, each an object in `pipeline/augment/` with its
DALI step and its CPU step. A stateless per-sample callable (`ShardSource`) reads the shards
in spawned worker processes; scale, crop, flip and padding run in the graph on the GPU when
there is one, else their CPU steps run on the batch in torch. Colour jitter and
normalization follow on the same device, in torch (`pipeline/photometric.py`).

Which sample goes where comes from `pipeline/sampling.py`, every random value of its
augmentation from `pipeline/augment/recipe.py`. The loader object both backends share
(position, state, handing batches out) is `pipeline/loader_base.py`; the fallback for
machines without DALI is `pipeline/torch_loader.py`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline import sizes
from pipeline.augment.recipe import Augment
from pipeline.devices import local_device
from pipeline.host import refuse_in_starting_worker, usable_cpus, worker_error
from pipeline.loader_base import Loader
from pipeline.sampling import Plan, Position, ShardReader, ShardSource, check_shards
from pipeline.shards import load_manifest
from pipeline.torch_loader import TorchLoader


def segmentation_graph(source, *, aug: Augment | None, gpu: bool, parallel: bool,
                       geometry: bool | None = None):
    """Read (CPU workers) -> to the GPU -> the recipe's per-sample ops, in order.

    `params` is each sample's vector of `Augment.draw`; every op reads its own floats of it,
    so image and label share one draw. Both leave as uint8 HWC; colour jitter and the
    normalization follow in torch (`Loader`). Without a GPU the graph only reads: DALI's CPU
    resize is slow, so the ops' CPU steps run on the batch in torch's uint8 kernels (the
    same as the torch backend). `geometry` (default: `gpu`) puts the ops in the graph; the
    tests run that on DALI's CPU operators against the CPU steps.
    """
    from nvidia.dali import fn

    extra = dict(parallel=True, prefetch_queue_depth=2) if parallel else {}
    n = 3 if aug is None else 4  # image, label, index (, params)
    outputs = fn.external_source(source, num_outputs=n, batch=False,
                                 layout=["HWC", "HWC"] + [None] * (n - 2), **extra)
    image, label, index = outputs[:3]
    if aug is None:
        return (image.gpu(), label.gpu(), index) if gpu else (image, label, index)
    params = outputs[3]
    if not (gpu if geometry is None else geometry):  # the CPU loader: the ops in torch
        return image, label, index, params
    if gpu:
        image, label = image.gpu(), label.gpu()
    for op, p in aug.steps(params):  # ScaleCropFlip, Pad: `Augment.ops`
        image, label = op.dali(image, label, p)
    return image, label, index, params


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._iter, self._pipe = None, None  # a running pipeline delivers `position` next

    def _build(self, start: Position) -> None:
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.close()
        gpu = self.device.type == "cuda"
        source = ShardSource(ShardReader(self.files, self.counts), self.plan, self.aug,
                             self.size, start.stream(len(self)))
        self._pipe = pipeline_def(segmentation_graph)(
            source, aug=self.aug, gpu=gpu, parallel=self.workers > 0,
            batch_size=self.batch_size, num_threads=max(1, self.workers),
            device_id=self.device.index if gpu else None, seed=self.plan.seed,
            py_num_workers=max(1, self.workers), py_start_method="spawn",
            prefetch_queue_depth=2)
        names = ["image", "label", "index"] + (["params"] if self.aug else [])
        try:  # building starts the workers; the iterator runs the pipeline ahead at once
            self._pipe.build()
            self._iter = DALIGenericIterator(self._pipe, names, auto_reset=False)
        except Exception as e:
            self.close()
            raise worker_error(e) from None

    def _batches(self, start: Position):
        per_epoch = len(self)
        if per_epoch == 0:
            return
        if self._iter is None:  # new, or after a jump: skipped samples are never read
            self._build(start)
        left = len(self.plan.order(start.epoch)) - start.batch * self.batch_size
        for _ in range(start.batch, per_epoch):
            try:
                out = next(self._iter)[0]
            except Exception as e:
                raise worker_error(e) from None
            n, left = min(self.batch_size, left), left - self.batch_size
            image, label, params = out["image"][:n], out["label"][:n], None
            if self.aug:
                params = out["params"][:n]
                if self.device.type != "cuda":
                    image, label = self.aug.cpu_batch(image, label, params)
            yield image, label, out["index"][:n], params

    def _jumped(self) -> None:
        self.close()  # its pipeline reads ahead from where it was

    def close(self) -> None:
        pool = getattr(self._pipe, "_py_pool", None)
        self._iter, self._pipe = None, None
        if pool is not None:
            pool.close()


# -- building ----------------------------------------------------------------------------------

BACKENDS = ("auto", "dali", "torch")  # "auto": DALI when importable


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

# A reader worker reads and pickles a sample in about a millisecond; four keep ahead of any
# GPU's appetite (~150 images/s at 512x1024 on an H100) many times over.
READERS_PER_RANK = 4


def default_workers(backend: str) -> int:
    """Worker processes per loader when none are asked for.

    This process's share of the CPUs it may use (affinity and cgroup quota, divided among
    the local ranks). DALI's workers only read (the geometry runs on the GPU, or in the
    trainer on a CPU), so a few are enough; the torch backend's workers also resize.
    """
    share = max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return min(share, READERS_PER_RANK) if backend == "dali" else share


def padded_share(size: tuple[int, int], aug: Augment) -> float:
    """Mean share of a training crop that is padding, over the random scale's range."""
    shares = []
    for s in np.linspace(aug.scale[0], aug.scale[1], 101):
        h, w = (min(c, max(1, round(n * s))) for c, n in zip(aug.crop, size))
        shares.append(1 - h * w / (aug.crop[0] * aug.crop[1]))
    return float(np.mean(shares))


def build_loader(data_dir: str | Path, split: str, batch_size: int, *, train: bool,
                 crop: tuple[int, int] = (512, 1024), scale: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, jitter: float = 0.2, mean=None, std=None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: torch.device | str = "auto",
                 workers: int | None = None, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, backend: str = "auto") -> Loader:
    """A loader over `split` of the shard folder `data_dir`; the contract is in docs/design.md.

    `crop` is (H, W); `workers` reader processes (None: `default_workers`; 0: read in this
    process); `backend` "dali", "torch" or "auto" (DALI when importable). `device` is
    the process's device as `train.distributed.setup` chose it (a string goes through the same
    `pipeline.devices.local_device`), so model and loader always agree.
    """
    refuse_in_starting_worker()
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, "
                         f"{rank}, {world_size}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, not {dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be auto, dali or torch, not {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
        if backend == "torch" and not _noticed:
            print("note: nvidia.dali is not importable; loading data with the torch DataLoader "
                  "fallback", file=sys.stderr)
            _noticed.append(True)
    elif backend == "dali" and not dali_available():
        raise ImportError("backend='dali' needs nvidia-dali (Linux x86_64); use backend='torch'")
    if not isinstance(device, torch.device) or (device.type == "cuda" and device.index is None):
        device = local_device(device)  # the one choice of a device, as train's setup makes it
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    files, counts, size = check_shards(data_dir, manifest, split)
    if workers is None:
        workers = default_workers(backend)
    plan = Plan(sum(counts), batch_size, train, rank, world_size, seed)
    aug = Augment(tuple(crop), tuple(scale), bool(flip), float(jitter)) if train else None
    if aug is not None and rank == 0 and (aug.crop[0] > size[0] or aug.crop[1] > size[1]):
        print(f"warning: crop {aug.crop[0]}x{aug.crop[1]} (HxW) is larger than the shards "
              f"({sizes.both(size)}) in {data_dir}: on average {padded_share(size, aug):.0%} "
              f"of each training sample is padding, which trains nothing; use --crop "
              f"{min(aug.crop[0], size[0])}x{min(aug.crop[1], size[1])} or preprocess at a "
              "larger --size", file=sys.stderr)
    if backend == "dali" and device.type == "cuda" and (problem := dali_cuda_mismatch()) \
            and not _noticed.count(problem):
        print(f"warning: {problem}", file=sys.stderr)
        _noticed.append(problem)
    cls = TorchLoader if backend == "torch" else DaliLoader
    return cls(data_dir, manifest, split, plan, aug, size, files, counts,
               mean=manifest["mean"] if mean is None else mean,
               std=manifest["std"] if std is None else std, device=device,
               dtype=dtype, channels_last=channels_last, workers=workers)
