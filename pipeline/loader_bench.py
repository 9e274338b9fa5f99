"""`cityprep bench-loader`: the training loader against the original project's PNG loader.

Both sides deliver the same thing, training batches of normalized float crops with int64
labels, from the same frames, with the same number of worker processes, timed in one run after
a warm-up (pipeline build and worker start-up excluded) on a warm page cache:

- shards: `pipeline.loader.build_loader` at the contract's defaults (random scale 0.5-2,
  512x1024 crop, flip, colour jitter, normalization) on the preprocessed shards;
- original: the seed project's dataset over the source PNGs (the manifest's
  `config.source_root`): PIL decode, resize to the shards' size, random crop and flip,
  `to_tensor`, labelIds remapped by its per-id loop, in a torch DataLoader.

MB/s counts the bytes each side reads (shard arrays, or PNG files); CPU ms/sample counts this
process and its worker processes (Linux), a figure that other load on the machine moves less
than samples/s.
"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from pipeline import sizes
from pipeline.cityscapes import find_pairs
from pipeline.host import cpu_seconds
from pipeline.labels import LABELS, Mapping, get_mapping
from pipeline.loader import build_loader
from pipeline.shards import ShardError, load_manifest


class PngCityscapes(Dataset):
    """The original project's `CityscapesDataset.__getitem__` (goldbattle/pytorch_unet), at our
    sizes: decode both PNGs with PIL, resize, random crop, flip, `to_tensor`, and remap the
    labelIds with its per-id loop (`mask_to_class`). Its vertical flip and RGB target are left
    out, which only makes it faster."""

    def __init__(self, pairs, lut: np.ndarray, size: tuple[int, int],
                 crop: tuple[int, int]) -> None:
        self.pairs, self.size = pairs, size  # (H, W), as TF.resize takes it
        self.crop = (min(crop[0], size[0]), min(crop[1], size[1]))
        self.mapping = {label.id: int(lut[label.id]) for label in LABELS if label.id >= 0}

    def __len__(self) -> int:
        return len(self.pairs)

    def mask_to_class(self, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(mask.shape, dtype=torch.uint8)
        for k, v in self.mapping.items():
            out[mask == k] = v
        return out

    def __getitem__(self, index: int):
        image = Image.open(self.pairs[index].image).convert("RGB")
        target = Image.open(self.pairs[index].label).convert("L")
        image = TF.resize(image, size=self.size, interpolation=TF.InterpolationMode.BILINEAR)
        target = TF.resize(target, size=self.size, interpolation=TF.InterpolationMode.NEAREST)
        i, j, h, w = transforms.RandomCrop.get_params(image, output_size=self.crop)
        image, target = TF.crop(image, i, j, h, w), TF.crop(target, i, j, h, w)
        if random.random() > 0.5:
            image, target = TF.hflip(image), TF.hflip(target)
        target = torch.from_numpy(np.array(target, dtype=np.uint8))
        return TF.to_tensor(image), self.mask_to_class(target).long()


def _endless(loader):
    while True:
        yield from loader


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(batches, n: int, warmup: int, device: torch.device | None = None) \
        -> tuple[int, float, float]:
    """Samples, seconds and CPU seconds for `n` batches after `warmup` untimed ones.

    On a GPU a batch is handed out while its kernels are still queued: the clock starts and
    stops with the device done, or it would time the host alone.
    """
    for _ in range(warmup):
        next(batches)
    _synchronize(device)
    samples, start, cpu = 0, time.perf_counter(), cpu_seconds()
    for batch in itertools.islice(batches, n):
        labels = batch["label"] if isinstance(batch, dict) else batch[1]
        samples += len(labels)
    _synchronize(device)
    return samples, time.perf_counter() - start, cpu_seconds() - cpu


def _row(name: str, workers: int, batch: int, samples: int, seconds: float, cpu: float,
         sample_bytes: float) -> dict:
    return {"loader": name, "workers": workers, "batch": batch, "samples_s": samples / seconds,
            "mb_s": samples * sample_bytes / seconds / 1e6, "cpu_ms": 1000 * cpu / samples}


def bench_loader(data_dir: Path, *, batch_size: int = 4, workers: int | None = None,
                 crop: tuple[int, int] = (512, 1024), batches: int = 30, warmup: int = 3,
                 baseline: bool = True, backend: str = "auto") -> list[dict]:
    """Time both loaders; one row per loader: samples/s and MB/s read.

    This process stands in for the trainer and only consumes batches; its torch runs on one
    thread so that OpenMP's spinning threads do not take the cores the loaders' workers need.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench(Path(data_dir), batch_size, workers, crop, batches, warmup, baseline,
                      backend)
    finally:
        torch.set_num_threads(threads)


def _bench(data_dir: Path, batch_size: int, workers: int | None, crop: tuple[int, int],
           batches: int, warmup: int, baseline: bool, backend: str) -> list[dict]:
    manifest = load_manifest(data_dir)
    h, w = sizes.from_file(manifest["config"]["size"])
    loader = build_loader(data_dir, "train", batch_size, train=True, crop=crop, workers=workers,
                          backend=backend)
    if len(loader) == 0:
        raise ShardError(f"{data_dir}: fewer than {batch_size} training samples")
    timing = _time(_endless(loader), batches, warmup, loader.device)
    kind = f"{type(loader).__name__}, {loader.device.type}"
    rows = [_row(f"shards ({kind})", loader.workers, batch_size, *timing, w * h * 4)]
    loader.close()
    if not baseline:
        return rows
    root = manifest["config"].get("source_root")
    if not root or not Path(root).is_dir():
        raise ShardError(f"{data_dir}/manifest.json: source_root {root!r} is not a folder; "
                         "the baseline needs the source PNGs")
    mapping_def = manifest["config"].get("mapping_def")
    mapping = (Mapping.from_json(mapping_def) if mapping_def
               else get_mapping(manifest["config"]["mapping"]))
    pairs = find_pairs(Path(root), "train")
    if not all(isinstance(s, Path) for p in pairs for s in (p.image, p.label)):
        raise ShardError(f"{root}: holds the official zips; the baseline, the original "
                         "project's loader, reads extracted PNG files: extract them there, or "
                         "pass --no-baseline")
    dataset = PngCityscapes(pairs, mapping.lut, (h, w), crop)
    png = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                     num_workers=loader.workers, persistent_workers=loader.workers > 0)
    timing = _time(_endless(png), batches, warmup)
    read = np.mean([p.image.stat().st_size + p.label.stat().st_size for p in pairs])
    rows.append(_row("original (PNG + DataLoader)", loader.workers, batch_size, *timing, read))
    del png  # its persistent workers exit with it
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'loader':34s} {'workers':>7s} {'batch':>5s} {'samples/s':>10s} {'MB/s read':>10s} "
             f"{'CPU ms/sample':>14s}"]
    for r in rows:
        lines.append(f"{r['loader']:34s} {r['workers']:7d} {r['batch']:5d} "
                     f"{r['samples_s']:10.1f} {r['mb_s']:10.1f} {r['cpu_ms']:14.1f}")
    if len(rows) == 2:
        new, old = rows
        lines.append(f"speed-up: {new['samples_s'] / old['samples_s']:.1f}x samples/s, "
                     f"{old['cpu_ms'] / new['cpu_ms']:.1f}x less CPU per sample")
    return "\n".join(lines)
