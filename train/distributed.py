"""One process or many: torchrun's environment -> rank, world size, device, process group.

`torchrun --nproc_per_node=N -m train.cli fit ...` sets RANK, WORLD_SIZE and LOCAL_RANK (and
TORCHELASTIC_RESTART_COUNT after it restarted a failed group); without them this is a single
process and nothing is initialised. NCCL on CUDA, gloo on the CPU, so the
same code path runs in the tests as one (or two) CPU processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.constants import default_pg_timeout

# The device choice lives beside the loader, which needs it too (a layer below train);
# every module of train asks it here.
from pipeline.devices import local_device, why_no_cuda  # noqa: F401


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1
    restart_count: int = 0  # torchrun's restarts of the group so far (--max-restarts)
    max_restarts: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | torch.device = "auto") -> Dist:
    """Read torchrun's variables, pick the device, join the process group when there are peers.

    Every module gets the device from here (`Dist.device`) and never works it out again.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dev = local_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                store=_attempt_store(world_size, restart_count), **kwargs)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                local_world_size=local_world_size, restart_count=restart_count,
                max_restarts=int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)))


def _attempt_store(world_size: int, restart_count: int) -> dist.Store | None:
    """The store a group of this torchrun attempt meets in (None: torch's env:// default).

    torchrun's agent serves one store for all the group's restarts (TCPStore sharing, its
    default), and torch opens it without a prefix per attempt: after a restart the failed
    attempt's keys are still there, and a rank of the new group reads a dead rank's address
    from them (gloo: "connection refused"; NCCL: the old unique id). Each attempt gets its
    own prefix, so a restarted group meets only itself.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # rank 0 serves a new store for each attempt
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world_size, is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"cityseg/attempt_{restart_count}", store)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op for one process); returns the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks (a no-op for one process); returns the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of each rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """SyncBatchNorm for CPU processes (torch's own runs on GPUs only).

    Batch statistics are sums all-reduced by `_AllReduceSum`, whose backward sums the
    gradients of the statistics over ranks: forward and backward are those of one
    BatchNorm over the global batch, as with nn.SyncBatchNorm on CUDA. Same parameters and
    buffers as BatchNorm2d, so checkpoints do not care which one trained them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3)),
                           xf.new_tensor([x.numel() / c])])
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None \
                    else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), m)
        y = (xf - mean[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> synchronised BatchNorm: torch's on GPUs, GlooSyncBatchNorm on the CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum,
                                     child.affine, child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return model
