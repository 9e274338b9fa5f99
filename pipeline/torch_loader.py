"""The fallback loader for machines without DALI (macOS, aarch64): torch DataLoader + v2 transforms.

Same contract, same sample order and the same random values as the DALI graph (both come from
`pipeline.sampling`), and the same colour jitter and normalization on the device (`Loader`
applies them to both); only the geometry kernels differ: torchvision's v2 functionals on an
`Image` and a `Mask` (nearest, never blended) in spawned worker processes.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.loader import Loader, worker_error
from pipeline.sampling import Augment, Plan, ShardReader, draw_augment, ignore_ctrl_c
from pipeline.shards import ShardError


def scale_crop_flip(image, label, p):
    """The window of `draw_augment` resized to its output size; swapped x ends mean mirrored."""
    top, bottom, h, w = int(p[0]), int(p[2]), int(p[4]), int(p[5])
    left, right = sorted((int(p[1]), int(p[3])))
    image = F.crop(image, top, left, bottom - top, right - left)
    label = F.crop(label, top, left, bottom - top, right - left)
    image = F.resize(image, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=False)
    label = F.resize(label, [h, w], interpolation=InterpolationMode.NEAREST_EXACT)
    if p[6] > 0.5:
        image, label = F.horizontal_flip(image), F.horizontal_flip(label)
    return image, label


def pad(image, label, crop):
    """Pad bottom/right up to the crop: image 0, label 255 (ignore)."""
    h, w = image.shape[-2:]
    padding = [0, 0, crop[1] - w, crop[0] - h]  # left, top, right, bottom
    return F.pad(image, padding, fill=0), F.pad(label, padding, fill=255)


class ShardDataset(Dataset):
    """(epoch, index) -> (image uint8 HxWx3, label uint8 HxW, index, params), augmented."""

    def __init__(self, reader: ShardReader, seed: int, aug: Augment | None,
                 size: tuple[int, int]) -> None:
        self.reader, self.seed, self.aug, self.size = reader, seed, aug, size

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, label = self.reader.read(index)
        # HWC seen as CHW: channels_last strides, which torch resizes fastest
        image = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        label = tv_tensors.Mask(torch.from_numpy(label))
        params = torch.zeros(0)
        if self.aug is not None:
            p = draw_augment(self.seed, epoch, index, self.size, self.aug)
            image, label = scale_crop_flip(image, label, p)
            image, label = pad(image, label, self.aug.crop)
            params = torch.from_numpy(p)
        hwc = image.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous()
        return hwc, label.as_subclass(torch.Tensor), index, params


class PassSampler(Sampler):
    """This rank's batches of one pass; the loader sets `epoch` and `start` before each pass."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.epoch, self.start = plan, 0, 0

    def __len__(self) -> int:
        return self.plan.batches - self.start

    def __iter__(self):
        order, bs = self.plan.order(self.epoch), self.plan.batch_size
        for b in range(self.start, self.plan.batches):
            yield [(self.epoch, int(i)) for i in order[b * bs:(b + 1) * bs]]


class TorchLoader(Loader):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sampler, self._loader = PassSampler(self.plan), None

    def _make(self) -> DataLoader:
        dataset = ShardDataset(ShardReader(self.files, self.counts), self.plan.seed, self.aug,
                               self.size)
        extra = {}
        if self.workers > 0:  # spawn, not fork: the trainer may already hold a CUDA context
            extra = dict(multiprocessing_context="spawn", persistent_workers=True,
                         worker_init_fn=ignore_ctrl_c)
        return DataLoader(dataset, batch_sampler=self._sampler, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", **extra)

    def _batches(self, epoch: int, start: int):
        if len(self) == 0:
            return
        if self._loader is None:
            self._loader = self._make()
        self._sampler.epoch, self._sampler.start = epoch, start
        batches = iter(self._loader)
        while True:
            try:
                image, label, index, params = next(batches)
            except StopIteration:
                return
            except ShardError as e:
                raise worker_error(e) from None
            image = image.to(self.device, non_blocking=True)
            label = label.to(self.device, non_blocking=True)
            yield image, label, index, params if self.aug else None

    def close(self) -> None:
        self._loader = None  # its persistent workers shut down with it
