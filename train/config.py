"""Every setting of a training run, with its default, and the errors a run raises.

Kept free of torch on purpose: `train/cli.py` imports it at start-up, and so does every loader
worker process that `spawn` starts, since spawn re-imports the main module (`train.cli` under
torchrun or `python -m`): a worker that only reads shards should not pay ~500 MB for torch.
"""

from __future__ import annotations

from dataclasses import dataclass

AMP_MODES = ("bf16", "fp16", "off")


@dataclass
class Config:
    # data (pipeline/loader.py)
    data: str = ""
    train_split: str = "train"  # "+" joins several: train+train_extra
    out: str = "runs/unet"
    crop: tuple[int, int] | None = (512, 1024)  # H, W of training crops; None = whole images
    scale: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: float = 0.2
    workers: int | None = None
    backend: str = "auto"
    # model (train/models: `citytrain models` lists them) and loss
    encoder: str = "plain"  # the U-Net from scratch, or a torchvision backbone
    weights: str = "imagenet"  # imagenet | none | PATH: a torchvision encoder's start
    decoder: tuple[int, ...] | None = None  # an encoder's decoder widths; None: its default
    encoder_lr_mult: float = 1.0  # the encoder's LR is the peak LR times this
    width: int = 64  # plain only
    depth: int = 4  # plain only
    upsample: str = "bilinear"  # plain only
    losstype: str = "segment"
    class_weights: bool = False  # ENet weights from the manifest's class pixel counts
    # optimisation
    epochs: int = 100
    batch_size: int = 8  # per process
    optimizer: str = "sgd"  # sgd | adamw
    lr: float | None = None  # None: 0.01 for sgd, 1e-3 for adamw
    weight_decay: float | None = None  # None: 1e-4 for sgd, 1e-2 for adamw
    momentum: float = 0.9
    warmup: int = 0  # iterations of linear warmup before the poly decay
    clip_grad: float | None = None  # max global gradient norm
    time_limit: float | None = None  # seconds: the schedule ends and training stops by then
    # precision and speed
    amp: str = "bf16"  # bf16 | fp16 | off
    tf32: bool = True  # TF32 for fp32 matmuls and convolutions on CUDA (Ampere and later)
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = True  # SyncBatchNorm across processes (DDP)
    device: str = "auto"
    # the evaluation after the last epoch (train/evaluation.py, train/inference.py)
    eval_mode: str = "whole"  # whole | slide
    eval_window: tuple[int, int] | None = None  # H, W of the sliding windows
    eval_stride: tuple[int, int] | None = None  # H, W; None: 2/3 of the window
    eval_scales: tuple[float, ...] = (1.0,)
    eval_flip: bool = False
    # bookkeeping
    log_every: int = 20  # steps between host syncs: loss, stop flag and clock across ranks
    eval_every: int = 1
    grid_samples: int = 4
    seed: int = 0
    resume: bool = False
    init: str | None = None  # fine-tune: start from this checkpoint's weights (only)
    init_head: str = "keep"  # keep | reset: the last layer from the checkpoint, or fresh
    progress: bool = True
    preflight: bool = True  # measure one step's memory before training, stop if it won't fit
    preflight_only: bool = False  # only that: `make train` checks once, before torchrun

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (0.01 if self.optimizer == "sgd" else 1e-3)

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.optimizer == "sgd" else 1e-2


class TrainingError(RuntimeError):
    """A run that cannot start or cannot go on; the message says why and what to do."""


class Interrupted(TrainingError):
    """Stopped by a signal after saving; `signum` lets the CLI exit as that signal would."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class AgreedError(TrainingError):
    """Raised on every rank with the same message (the ranks agreed on it): rank 0 alone
    prints it."""
