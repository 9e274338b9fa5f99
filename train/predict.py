"""`citytrain predict`: colorized masks and overlays for any images, of any size.

Each image is resized to the training shards' size (the scale the model learned) as
preprocessing resizes, run as the inference settings say (train/evaluation/inference.py: whole or
sliding windows, scales, flip), and the outputs are upsampled bilinearly to the image's own
size before the argmax, so a mask always lies exactly on its image, as in full-resolution
evaluation. Outputs by `format`: "color" `<stem>_mask.png` (the palette's colours) and
`<stem>_overlay.png`; "trainid" `<stem>_trainid.png`, the class ids (0..K-1) as grey
values; "labelid" `<stem>_labelid.png`, the official labelIds (the mapping's `export_ids`,
as `evaluate --export-official` writes them). For a folder given as input its subfolders are
kept under `out` (Cityscapes' val: one folder per city), so equal stems in different
folders do not overwrite each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.labels import colorize
from pipeline.photometric import normalize
from pipeline.shards import MANIFEST_NAME
from train.losses import PixelLoss
from train.visualize import overlay, write_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("color", "trainid", "labelid")


class InputError(RuntimeError):
    """An input image or label file that is missing or unreadable; the message names it."""


def load_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) from any image file PIL reads; InputError naming the file otherwise."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read image ({e})") from None


def find_images(inputs: list[Path], out: Path) -> list[tuple[Path, Path]]:
    """(image, output stem path without suffix) for files and, recursively, folders."""
    out_dir = Path(out).resolve()
    found: list[tuple[Path, Path]] = []
    for inp in map(Path, inputs):
        if inp.is_dir():
            files = sorted(
                p for p in inp.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                # a rerun into a folder inside the input must not predict its own masks
                and not p.resolve().is_relative_to(out_dir)
            )
            if not files and (inp / MANIFEST_NAME).is_file():
                raise InputError(f"{inp}: holds shards, not images: predict reads image files "
                                 f"({'/'.join(IMAGE_SUFFIXES)}); `citytrain evaluate --data "
                                 f"{inp}` scores shards")
            if not files:
                raise InputError(f"{inp}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")
            found += [(p, p.relative_to(inp).parent / p.stem) for p in files]
        elif inp.is_file():
            found.append((inp, Path(inp.stem)))
        else:
            raise InputError(f"{inp}: no such file or folder")
    seen: dict[Path, Path] = {}
    for image, stem in found:
        if stem in seen:
            raise InputError(f"{image} and {seen[stem]} would both write {out / stem}_mask.png; "
                             "predict them into different --out folders")
        seen[stem] = image
    return found


@torch.inference_mode()
def predict_image(
    model: torch.nn.Module, image: np.ndarray, *, mean, std, loss: PixelLoss,
    device, size: tuple[int, int] | None = None, inference=None, amp: str = "off",
) -> np.ndarray:
    """Class ids (H, W) uint8 for one uint8 (H, W, 3) image, at the image's own size.

    `size` (H, W) is what the model sees (None: the image as it is); `inference` a
    train.evaluation.inference.Inference (None: the whole image once).
    """
    from pipeline.preprocess import resize_image
    from train.evaluation.inference import WHOLE, infer

    h, w = image.shape[:2]
    small = image if size is None else resize_image(image, tuple(size))
    s = inference or WHOLE
    outputs = infer(model, normalize(small, mean, std, device), mode=s.mode, window=s.window,
                    stride=s.stride, scales=s.scales, flip=s.flip, max_windows=s.max_windows,
                    amp=amp, out_size=(h, w))
    return loss.predict(outputs)[0].to(torch.uint8).cpu().numpy()


def predict_paths(
    model: torch.nn.Module,
    inputs: list[Path],
    out: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    loss: PixelLoss,
    device: str | torch.device = "cpu",
    size: tuple[int, int] | None = None,
    inference=None,
    amp: str = "off",
    format: str = "color",
    mapping=None,
) -> list[Path]:
    """Predict every image in `inputs` (files or folders); returns the PNGs written.

    `loss` is the model's (`build_loss(losstype, palette=...)`): its `predict` reads the
    outputs and its palette colours the masks. `size` is (H, W) of the training shards; None
    predicts at each image's own size.
    `inference` (train.evaluation.inference.Inference) sets windows, scales and flip. `format`
    (FORMATS) chooses the PNGs; "labelid" needs the checkpoint's `mapping`
    (pipeline.labels.Mapping).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if format == "labelid" and mapping is None:
        raise InputError("--format labelid needs the label mapping, which this checkpoint "
                         "does not hold; use --format trainid")
    out = Path(out)
    images = find_images(inputs, out)
    written: list[Path] = []
    was_training = model.training
    model.eval()
    try:
        for path, stem in images:
            image = load_rgb(path)
            pred = predict_image(model, image, mean=mean, std=std, loss=loss, device=device,
                                 size=size, inference=inference, amp=amp)
            if format == "trainid":
                written.append(write_png(out / f"{stem}_trainid.png", pred))
            elif format == "labelid":
                written.append(write_png(out / f"{stem}_labelid.png", mapping.export_ids[pred]))
            else:
                mask = colorize(pred, loss.palette)
                written.append(write_png(out / f"{stem}_mask.png", mask))
                written.append(write_png(out / f"{stem}_overlay.png", overlay(image, mask)))
    finally:
        model.train(was_training)
    return written
