"""Pictures for people: image | ground truth | prediction grids, overlays, PNG writing (the
evaluation's own pictures: `train/evaluation/pictures.py`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.files import atomic_write_bytes
from pipeline.labels import colorize


def as_numpy(x) -> np.ndarray:
    """A tensor (on any device) or an array, as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG atomically (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def overlay(image: np.ndarray, mask_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colorized mask over an RGB image of the same size; uint8 out."""
    image, mask_rgb = as_numpy(image), as_numpy(mask_rgb)
    if image.shape != mask_rgb.shape:
        raise ValueError(f"image {image.shape} and mask {mask_rgb.shape} differ in shape")
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * mask_rgb.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def save_grid(images, labels, preds, palette, path: Path) -> Path:
    """One PNG, a row per sample: image | ground truth | prediction, in the mapping's palette.

    images uint8 (N, H, W, 3); labels and preds class ids (N, H, W), 255 (ignore) is black.
    Arrays or tensors.
    """
    images, labels, preds = as_numpy(images), as_numpy(labels), as_numpy(preds)
    if not (images.shape[:3] == labels.shape == preds.shape and images.shape[-1] == 3):
        raise ValueError(f"images {images.shape}, labels {labels.shape} and predictions "
                         f"{preds.shape} do not match")
    rows = [
        np.concatenate([img, colorize(lab, palette), colorize(prd, palette)], axis=1)
        for img, lab, prd in zip(images.astype(np.uint8), labels, preds)
    ]
    return write_png(path, np.concatenate(rows, axis=0))
