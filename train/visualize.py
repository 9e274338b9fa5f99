"""Pictures for people: image | ground truth | prediction grids, overlays, PNG writing."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.labels import colorize
from pipeline.shards import atomic_write_bytes


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG atomically (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalized float NCHW (the loader's `(x/255 - mean)/std`) -> uint8 NHWC."""
    x = image.detach().float().cpu()
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = ((x * s + m) * 255.0).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def overlay(image: np.ndarray, mask_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colorized mask over an RGB image of the same size; uint8 out."""
    image, mask_rgb = _numpy(image), _numpy(mask_rgb)
    if image.shape != mask_rgb.shape:
        raise ValueError(f"image {image.shape} and mask {mask_rgb.shape} differ in shape")
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * mask_rgb.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def save_grid(images, labels, preds, palette, path: Path) -> Path:
    """One PNG, a row per sample: image | ground truth | prediction, in the mapping's palette.

    images uint8 (N, H, W, 3); labels and preds class ids (N, H, W), 255 (ignore) is black.
    Arrays or tensors.
    """
    images, labels, preds = _numpy(images), _numpy(labels), _numpy(preds)
    if not (images.shape[:3] == labels.shape == preds.shape and images.shape[-1] == 3):
        raise ValueError(f"images {images.shape}, labels {labels.shape} and predictions "
                         f"{preds.shape} do not match")
    rows = [
        np.concatenate([img, colorize(lab, palette), colorize(prd, palette)], axis=1)
        for img, lab, prd in zip(images.astype(np.uint8), labels, preds)
    ]
    return write_png(path, np.concatenate(rows, axis=0))
