"""Scoring the shards: a split through the loader, as each epoch's validation and
`citytrain evaluate --data` do it (rank r reads the r-th contiguous block, the loader's
evaluation plan). No iIoU: shards hold no instance ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from train.evaluation.inference import Inference, infer
from train.evaluation.loop import Kept, MeanLoss, Scored, accumulate
from train.evaluation.metrics import ConfusionMatrix
from train.evaluation.results import inference_record
from train.losses import PixelLoss
from train.precision import autocast


def _scored(model: nn.Module, loader, criterion: PixelLoss, device: torch.device, amp: str,
            forward: Callable | None) -> Iterator[Scored]:
    for batch in loader:
        image, label = batch["image"], batch["label"]
        if forward is None:
            with autocast(device, amp):
                outputs = model(image)
        else:
            outputs = forward(image)
        outputs = outputs.float()
        yield Scored(criterion.predict(outputs), label, outputs=outputs, image=image)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, criterion: PixelLoss, *, device: torch.device,
             amp: str = "off", keep: int = 0, with_loss: bool = True,
             forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
             ) -> tuple[ConfusionMatrix, float | None, dict | None]:
    """Confusion matrix over the whole split (summed over ranks), mean loss per image (None
    without `with_loss`), and the first `keep` images, labels and predictions of this rank
    (for the pictures). `criterion.predict` turns outputs into classes.

    `forward(images) -> outputs` replaces the plain `model(images)` under autocast, e.g. with
    sliding windows or test-time augmentation (`shard_forward`)."""
    model.eval()
    cm = ConfusionMatrix(loader.num_classes, ignore_index=loader.ignore_index, device=device)
    loss = MeanLoss(criterion, device) if with_loss else None
    kept = Kept(keep)
    accumulate(_scored(model, loader, criterion, device, amp, forward),
               [a for a in (cm, loss, kept) if a is not None])
    return cm, None if loss is None else loss.value, kept.value


def shard_forward(model, inference: Inference, amp: str):
    """`evaluate`'s `forward` for these settings (None: the model's own forward)."""
    if inference.plain:
        return None
    s = inference

    def forward(images: torch.Tensor) -> torch.Tensor:
        return infer(model, images, mode=s.mode, window=s.window, stride=s.stride,
                     scales=s.scales, flip=s.flip, max_windows=s.max_windows, amp=amp)

    return forward


def evaluate_shards(model, loader, criterion, *, inference: Inference, amp: str, device,
                    classes, categories, scores: dict | None = None) -> dict:
    """The shard-resolution metrics of `loader`'s split (every rank its block, summed).

    `scores` of an evaluation of the same model already done with the plain forward is
    reused when `inference` is plain too.
    """
    tick = time.perf_counter()
    if scores is None or not inference.plain:
        cm, _, _ = evaluate(model, loader, criterion, device=device, amp=amp, with_loss=False,
                            forward=shard_forward(model, inference, amp))
        scores = cm.compute(classes, categories)
    seconds = time.perf_counter() - tick
    return {"split": loader.split, "resolution": "shard", "images": loader.num_samples,
            **scores, "inference": inference_record(inference, amp, loader.size),
            "seconds": seconds}
