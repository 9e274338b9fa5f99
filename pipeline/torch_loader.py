"""The fallback loader for machines without DALI (macOS, aarch64): a torch DataLoader.

Same contract, same sample order and the same random values as the DALI loader (both come
from `pipeline.sampling` and `pipeline.augment`), the same CPU steps of the augmentations as
its CPU path (`Augment.cpu`, here in spawned worker processes) and the same colour jitter
and normalization on the device (`Loader` applies them to both): on the CPU the two backends
give identical batches.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.augment.recipe import Augment
from pipeline.host import worker_error, worker_setup
from pipeline.loader_base import Loader
from pipeline.sampling import Plan, Position, ShardReader
from pipeline.shards import ShardError


class ShardDataset(Dataset):
    """(epoch, index) -> (image uint8 HxWx3, label uint8 HxW, index, params), augmented."""

    def __init__(self, reader: ShardReader, seed: int, aug: Augment | None,
                 size: tuple[int, int]) -> None:
        self.reader, self.seed, self.aug, self.size = reader, seed, aug, size

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, label = (torch.from_numpy(a) for a in self.reader.read(index))
        params = torch.zeros(0)
        if self.aug is not None:
            p = self.aug.draw(self.seed, epoch, index, self.size)
            image, label = self.aug.cpu(image, label, p)
            params = torch.from_numpy(p)
        return image, label, index, params


class PassSampler(Sampler):
    """This rank's batches of one pass; the loader sets `start` (a Position) before each."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.start = plan, Position()

    def __len__(self) -> int:
        return self.plan.batches - self.start.batch

    def __iter__(self):
        epoch, order, bs = self.start.epoch, self.plan.order(self.start.epoch), self.plan.batch_size
        for b in range(self.start.batch, self.plan.batches):
            yield [(epoch, int(i)) for i in order[b * bs:(b + 1) * bs]]


class TorchLoader(Loader):
    backend = "torch"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sampler, self._loader = PassSampler(self.plan), None

    def _make(self) -> DataLoader:
        dataset = ShardDataset(ShardReader(self.files, self.counts), self.plan.seed, self.aug,
                               self.size)
        extra = {}
        if self.workers > 0:  # spawn, not fork: the trainer may already hold a CUDA context
            extra = dict(multiprocessing_context="spawn", persistent_workers=True,
                         worker_init_fn=worker_setup)
        return DataLoader(dataset, batch_sampler=self._sampler, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", **extra)

    def _batches(self, start: Position):
        if len(self) == 0:
            return
        if self._loader is None:
            self._loader = self._make()
        self._sampler.start = start
        batches = iter(self._loader)
        while True:
            try:
                image, label, index, params = next(batches)
            except StopIteration:
                return
            except (ShardError, RuntimeError) as e:
                self.close()
                raise worker_error(e) from None
            image = image.to(self.device, non_blocking=True)
            label = label.to(self.device, non_blocking=True)
            yield image, label, index, params if self.aug else None

    def close(self) -> None:
        self._loader = None  # its persistent workers shut down with it
