"""Inference as benchmarks do it: whole image or sliding windows, multi-scale, flip.

`infer` is the one function that turns a batch of normalized images into model outputs for
`citytrain evaluate` (shard and full resolution), `citytrain predict` and the last evaluation
of `citytrain fit`. Sizes are (H, W) throughout.

- whole: the model sees each image at once.
- slide: windows of `window` (by default the training crop: `Inference.for_model`) every
  `stride`, as mmsegmentation's `slide_inference` lays them out: the last window of a row or
  column is moved back to end at the image edge (no padding), and a window larger than the
  image shrinks to it (`for_model` refuses one that covers the image at every scale: that is
  whole-image inference). Outputs are summed and divided by how many windows cover each
  pixel. Windows of all images of the batch go through the
  model `max_windows` at a time, which bounds the memory.
- scales, flip: each image is resized by every scale (bilinear; antialiased when shrinking)
  and, with flip, also mirrored; the outputs are mirrored back, resized to `out_size` and
  averaged before any argmax. Scales are relative to the size the image arrives at, which is
  the size the model was trained at (see README "Evaluation").

Outputs are averaged as they come from the model: logits for `--losstype segment`, colours
for `reconstruction` (`train.losses.PixelLoss.predict` turns either into classes).
mmsegmentation's TTA averages softmax probabilities instead; the argmax rarely differs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from pipeline import sizes
from train.precision import autocast

MODES = ("whole", "slide")


class InferenceError(ValueError):
    """Inference settings that do not go together; the message says what to pass instead."""


@dataclass(frozen=True)
class Inference:
    """How to run a model over an image (the CLI's --mode --window --stride --scales --flip)."""

    mode: str = "whole"
    window: tuple[int, int] | None = None  # (H, W), slide only
    stride: tuple[int, int] | None = None  # (H, W); None = 2/3 of the window
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    max_windows: int = 4  # windows (or whole images) per forward pass

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InferenceError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode == "slide" and self.window is not None:
            if self.stride is None:  # mmsegmentation's 512x1024 recipe: stride 341x683
                object.__setattr__(self, "stride", tuple(max(1, round(2 * v / 3))
                                                         for v in self.window))
            if any(s > w for s, w in zip(self.stride, self.window)):
                raise InferenceError(f"--stride {_hw(self.stride)} is larger than --window "
                                     f"{_hw(self.window)}: pixels between windows would be "
                                     "left out")
            if min(*self.window, *self.stride) < 1:
                raise InferenceError("--window and --stride need positive sizes")
        elif self.mode == "whole" and (self.window is not None or self.stride is not None):
            raise InferenceError("--window and --stride need --mode slide")
        if not self.scales or min(self.scales) <= 0:
            raise InferenceError(f"--scales must be positive numbers, not {self.scales}")
        if self.max_windows < 1:
            raise InferenceError("--max-windows must be at least 1")

    def for_model(self, size: tuple[int, int] | None,
                  crop: tuple[int, int] | None) -> Inference:
        """These settings for a model that sees images at `size` (H, W) at scale 1 (None: at
        each image's own size) and was trained on crops of `crop` (None: whole images).

        Slide's window defaults to the training crop, as mmsegmentation's recipes slide the
        crop they trained on. A window turned on its side against the images, or one that
        covers the whole image at every scale (sliding it is whole-image inference), is
        refused, saying what to pass.
        """
        if self.mode != "slide":
            return self
        window = self.window or (tuple(int(v) for v in crop) if crop else None)
        if window is None:
            raise InferenceError("--mode slide needs --window HxW: the model was trained on "
                                 "whole images, so there is no training crop to slide "
                                 "(e.g. --window 512x1024)")
        settings = replace(self, window=window)
        if size is None:
            return settings
        try:
            sizes.check_aspect("--window", window, "HxW", size, "the images the model sees")
        except ValueError as e:
            raise InferenceError(str(e)) from None
        top = max(self.scales)
        largest = (round(size[0] * top), round(size[1] * top))
        if window[0] >= largest[0] and window[1] >= largest[1]:
            at = f" at scale {top:g}" if top != 1 else ""
            given = "" if self.window else " (the training crop, slide's default)"
            raise InferenceError(
                f"--window {sizes.text(window)}{given} covers the whole image the model sees "
                f"({sizes.text(largest, 'WxH')} WxH, {sizes.text(largest)} HxW{at}): sliding "
                f"it is whole-image inference; pass a smaller --window HxW or --mode whole")
        return settings

    def to_json(self) -> dict:
        """As recorded in metrics.json under "inference"; window and stride named
        {"height", "width"} as every file names a size (pipeline/sizes.py)."""
        d = asdict(self)
        d["scales"] = list(self.scales)
        for key in ("window", "stride"):
            d[key] = None if d[key] is None else sizes.to_file(d[key])
        return d

    @property
    def plain(self) -> bool:
        """The model's own forward: whole image, scale 1, no flip (max_windows aside)."""
        return self.mode == "whole" and self.scales == (1.0,) and not self.flip

    @property
    def passes(self) -> int:
        """Model passes over each image per window position: scales x (flip + 1)."""
        return len(self.scales) * (2 if self.flip else 1)


WHOLE = Inference()


def _hw(size) -> str:
    return f"{size[0]}x{size[1]}"


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: every `stride`, the last moved back to end at the edge.

    mmsegmentation's grid: ceil((length - window) / stride) + 1 windows, none outside.
    """
    if window >= length:
        return [0]
    n = -(-(length - window) // stride) + 1
    return [min(i * stride, length - window) for i in range(n)]


def windows(size: tuple[int, int], window: tuple[int, int],
            stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) of every window over an image of `size`, row by row."""
    (h, w), (wh, ww) = size, (min(window[0], size[0]), min(window[1], size[1]))
    return [(y, x, y + wh, x + ww) for y in window_starts(h, wh, stride[0])
            for x in window_starts(w, ww, stride[1])]


def _forward(model: torch.nn.Module, x: torch.Tensor, amp: str) -> torch.Tensor:
    with autocast(x.device, amp):
        return model(x).float()


def _whole(model, x: torch.Tensor, amp: str, max_windows: int) -> torch.Tensor:
    return torch.cat([_forward(model, x[i:i + max_windows], amp)
                      for i in range(0, len(x), max_windows)])


def _slide(model, x: torch.Tensor, window, stride, amp: str, max_windows: int) -> torch.Tensor:
    n, _, h, w = x.shape
    boxes = windows((h, w), window, stride)
    jobs = [(i, box) for i in range(n) for box in boxes]
    out = None
    for start in range(0, len(jobs), max_windows):
        chunk = jobs[start:start + max_windows]
        crops = torch.stack([x[i, :, y0:y1, x0:x1] for i, (y0, x0, y1, x1) in chunk])
        logits = _forward(model, crops, amp)
        if out is None:
            out = logits.new_zeros((n, logits.shape[1], h, w))
        for (i, (y0, x0, y1, x1)), part in zip(chunk, logits):
            out[i, :, y0:y1, x0:x1] += part
    if len(boxes) == 1:
        return out  # one window over the whole image: exactly the whole-image result
    count = torch.zeros((h, w), dtype=out.dtype, device=out.device)
    for y0, x0, y1, x1 in boxes:
        count[y0:y1, x0:x1] += 1
    return out / count


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@torch.inference_mode()
def infer(model: torch.nn.Module, image: torch.Tensor, *, mode: str = "whole",
          window: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
          scales: tuple[float, ...] = (1.0,), flip: bool = False, max_windows: int = 4,
          amp: str = "off", out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Averaged outputs (N, C, *out_size) in fp32 for normalized images (N, 3, H, W).

    `out_size` defaults to the images' own size. The model should be in eval mode.
    """
    settings = Inference(mode, window, stride, tuple(scales), flip, max_windows)
    if settings.mode == "slide" and settings.window is None:
        raise InferenceError("slide needs a window (Inference.for_model gives the default)")
    h, w = image.shape[-2:]
    out_size = (h, w) if out_size is None else tuple(out_size)
    total = None
    for scale in settings.scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = _resize(image, size)
        for mirrored in (False, True) if settings.flip else (False,):
            x = scaled.flip(-1) if mirrored else scaled
            if settings.mode == "slide":
                out = _slide(model, x, settings.window, settings.stride, amp, max_windows)
            else:
                out = _whole(model, x, amp, max_windows)
            out = _resize(out.flip(-1) if mirrored else out, out_size)
            total = out if total is None else total.add_(out)
    return total if settings.passes == 1 else total / settings.passes
