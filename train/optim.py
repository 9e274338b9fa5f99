"""The optimizer and its schedule: SGD or AdamW in parameter groups, the LR at each step, and
loading a saved optimizer onto this run's kernels (fused on CUDA)."""

from __future__ import annotations

import torch
from torch import nn

from train.config import Config, TrainingError

OPTIMIZERS = ("sgd", "adamw")  # what build_optimizer builds


def lr_factor(step: int, total_steps: int, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warmup, then poly(0.9) decay to zero at the last step (or when time runs out)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 1.0 - max(progress, time_fraction)) ** 0.9


def build_optimizer(model: nn.Module, cfg: Config, *, fused: bool | None = None) \
        -> torch.optim.Optimizer:
    """SGD or AdamW over the model; `fused` kernels (None: on CUDA).

    Each group's `lr_scale` multiplies the scheduled LR: `cfg.encoder_lr_mult` for the
    parameters under `encoder.` (pretrained features want smaller steps than a fresh decoder).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    parts = [([p for _, p in params], 1.0)]
    if cfg.encoder_lr_mult != 1.0:
        encoder = [p for n, p in params if n.startswith("encoder.")]
        if not encoder:
            raise TrainingError(f"--encoder-lr-mult: the {cfg.encoder} model has no "
                                "pretrained encoder (no parameters under encoder.)")
        # the rest first: param_groups[0]["lr"] is the schedule's LR that metrics.csv logs
        parts = [([p for n, p in params if not n.startswith("encoder.")], 1.0),
                 (encoder, cfg.encoder_lr_mult)]
    groups = []
    for part, scale in parts:
        # Weight decay on conv kernels only: decaying BatchNorm scales and biases just hurts.
        groups += [{"params": [p for p in part if p.ndim >= 2], "lr_scale": scale,
                    "weight_decay": cfg.resolved_weight_decay()},
                   {"params": [p for p in part if p.ndim < 2], "lr_scale": scale,
                    "weight_decay": 0.0}]
    # On CUDA the fused kernels take GradScaler's inf check on the device; the others read it
    # back (`found_inf.item()`) every fp16 step, and the host waits for the GPU there.
    if fused is None:
        fused = next(model.parameters()).device.type == "cuda"
    fused = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.resolved_lr(), momentum=cfg.momentum, **fused)
        if fused and cfg.momentum:
            # Fused SGD makes its momentum buffers on the first step with empty_like and skips
            # writing them when GradScaler finds an overflow (common in fp16's first steps):
            # garbage momentum for the whole run. Zero buffers give the same first step
            # (buf = momentum * 0 + grad) and survive a skipped one.
            for _, p in params:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return opt
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.resolved_lr(), **fused)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {cfg.optimizer!r}")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, keeping this run's kernel choice (fused or not).

    The saved param groups replace the optimizer's own, `fused` included: a checkpoint of a
    CPU run would turn a CUDA optimizer built fused into a non-fused one that GradScaler still
    hands its device-side inf check to, and the first fp16 step would fail. The choice goes
    into the saved groups before loading, because torch places each state by them: AdamW's
    `step` stays on the CPU for a non-fused group and moves to the parameter's device for a
    fused one, where the fused kernel reads it.
    """
    kernels = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    optimizer.load_state_dict({**state, "param_groups": [{**group, **kernels}
                                                         for group in state["param_groups"]]})
