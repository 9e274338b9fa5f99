"""Which device a process uses: the one place that decides it.

It sits in pipeline, the lower layer, because the loader also turns a device the user typed
("auto", "cuda") into the process's device; `train.distributed` (the process group) and
every module of train ask it through there, so model and loader always agree.
"""

from __future__ import annotations

import glob
import os
import shutil

import torch

DEVICES = ("auto", "cpu", "cuda")  # what a user types; "cuda:N" works too
GPU_NODES = "/dev/nvidia[0-9]*"  # the NVIDIA driver's device files, one per GPU


def why_no_cuda() -> str:
    """Why torch sees no CUDA device, in words: the machine has none, or has one torch cannot
    use. A driver older than torch's CUDA needs makes `torch.cuda.is_available()` false while
    the GPU is there for everything else (its device files, nvidia-smi)."""
    found = sorted(glob.glob(GPU_NODES)) or [shutil.which("nvidia-smi")]
    if found[0] is None:
        return "this machine has no CUDA GPU"
    if torch.version.cuda is None:
        return (f"this machine has an NVIDIA GPU ({found[0]}), but torch {torch.__version__} "
                "is built without CUDA: install a CUDA build of torch")
    return (f"this machine has an NVIDIA GPU ({found[0]}), but torch {torch.__version__} "
            f"cannot use it: most often the NVIDIA driver is older than torch's CUDA "
            f"{torch.version.cuda} needs (nvidia-smi shows the newest CUDA the driver takes); "
            "update the driver, or install torch's wheels for that CUDA (e.g. cu126) and "
            "the DALI build beside them (make install CUDA=12)")


def local_device(device: str | torch.device = "auto", local_rank: int | None = None) \
        -> torch.device:
    """This process's device: the one place that decides it.

    "auto" is this rank's GPU when CUDA is there, else the CPU. A GPU without an index is
    cuda:(LOCAL_RANK % visible GPUs): with every GPU of a node visible that is
    cuda:LOCAL_RANK, and with one visible GPU per process (SLURM `--gpus-per-task=1`, or
    CUDA_VISIBLE_DEVICES set per rank) it is cuda:0 for every rank.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: no CUDA device is available: {why_no_cuda()}")
    count = torch.cuda.device_count()
    if device.index is not None:
        if device.index >= count:
            raise RuntimeError(f"--device {device}: only {count} CUDA device(s) are visible")
        return device
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local_rank % count)
