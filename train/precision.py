"""Precision: autocast to the dtype `--amp` names, CUDA's TF32 and cuDNN settings."""

from __future__ import annotations

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # of AMP_MODES


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """Autocast to the dtype named by `amp` ("bf16", "fp16"); "off" runs in fp32."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa) for fp32 matmuls and convolutions on Ampere and later GPUs.

    PyTorch's own defaults differ between the two (convolutions on, matmuls off); a run says
    which it wants. With `--amp bf16|fp16` it only touches the ops autocast leaves in fp32.
    These are the settings every reader understands: torch >= 2.9's per-backend
    `fp32_precision` alone would make torch's own readers of the older flags (inductor's
    autotuning, torch.utils.benchmark, cudnn.flags()) raise on the mix of old and new.
    """
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def cuda_speed_settings(device: torch.device, *, tf32: bool) -> dict:
    """TF32 as asked, and cuDNN's autotuner; returns the settings (for config.json).

    The autotuner picks each convolution's fastest algorithm for a shape once. Every training
    batch has the crop's shape (the loader pads to it) and every evaluation batch the shards'
    size, so its choices hold for the whole run. A no-op off CUDA.
    """
    if device.type != "cuda":
        return {}
    set_tf32(tf32)
    torch.backends.cudnn.benchmark = True
    return {"tf32": tf32, "cudnn_benchmark": True}
