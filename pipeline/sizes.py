"""Sizes inside the code are (H, W), as torch and numpy shapes have them.

One rule for each kind of size, the same in every command, `--help`, message and file:
- an image's size (`--size` of synth, preprocess, predict, models, bench-inference; the
  shards', the originals', the model's input) is typed and printed WxH, as image tools write
  it: `parse(text, "WxH")`, `text(size, "WxH")`;
- a crop, window or stride (`--crop`, `--window`, `--stride`, `--eval-window`) is typed and
  printed HxW, as torch writes a shape: `parse(text, "HxW")`;
- a file names the sides: `{"height": 512, "width": 1024}` (`to_file`, `from_file`), in
  manifest.json, config.json, metrics.json, checkpoints and inspect-shard's JSON; files written
  before that hold an image size as the list [W, H], which `from_file` still reads. Inside an
  HDF5 shard `source_size` stays the array [W, H] (shard format_version 1).
- PIL's sizes are (W, H): `wh`.

A message names the order next to a size ("1024x512 (WxH)") where it could be read either
way; `check_aspect` refuses a size whose orientation is the images' turned by 90 degrees, the
usual sign of the two sides typed the wrong way round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ORDERS = ("HxW", "WxH")


def parse(text: str, order: str) -> tuple[int, int]:
    """'1024x512' typed in `order` -> (H, W); ValueError saying what was expected."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    try:
        a, b = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        a = b = 0
    if a <= 0 or b <= 0:
        example = "512x1024" if order == "HxW" else "1024x512"
        raise ValueError(f"expected {order} with positive integers (e.g. {example}), got "
                         f"{text!r}")
    return (a, b) if order == "HxW" else (b, a)


def text(size: Sequence[int], order: str = "HxW") -> str:
    """(H, W) -> '512x1024' (HxW) or '1024x512' (WxH), as the user would type it."""
    h, w = size
    return f"{h}x{w}" if order == "HxW" else f"{w}x{h}"


def both(size: Sequence[int]) -> str:
    """(H, W) -> '1024x512 (WxH), 512x1024 (HxW)': for a message about the order itself."""
    return f"{text(size, 'WxH')} (WxH), {text(size, 'HxW')} (HxW)"


def wh(size: Sequence[int]) -> tuple[int, int]:
    """(H, W) -> (W, H), for PIL and a shard's source_size attribute."""
    return int(size[1]), int(size[0])


def to_file(size: Sequence[int]) -> dict[str, int]:
    """(H, W) -> {"height": H, "width": W}, as every JSON file and checkpoint writes a size."""
    return {"height": int(size[0]), "width": int(size[1])}


def from_file(value: Mapping | Sequence[int]) -> tuple[int, int]:
    """A size read from a file -> (H, W): {"height", "width"}, or the [W, H] list of an image
    size in files written before sizes had names."""
    if isinstance(value, Mapping):
        return int(value["height"]), int(value["width"])
    return int(value[1]), int(value[0])


def from_wh(size: Mapping | Sequence[int]) -> tuple[int, int]:
    """[W, H] (PIL, a shard's source_size) -> (H, W); a named size as `from_file` reads it."""
    return from_file(size)


def orientation(size: Sequence[int]) -> str:
    h, w = size
    return "landscape" if w > h else "portrait" if h > w else "square"


def check_aspect(option: str, size: Sequence[int], order: str, reference: Sequence[int],
                 what: str) -> None:
    """ValueError when `size` (H, W), typed as `option` in `order`, is portrait where
    `reference` (H, W), the size of `what` (plural: "the images of D"), is landscape, or the
    reverse: naming both orders and the size meant."""
    (h, w), (rh, rw) = size, reference
    if (h - w) * (rh - rw) >= 0:  # same orientation, or one of them square
        return
    raise ValueError(
        f"{option} {text(size, order)} is {orientation(size)} but {what} are "
        f"{orientation(reference)} "
        f"({both(reference)}); {option} is {order} (the sides typed the other way round?): "
        f"did you mean {option} {text((w, h), order)}?")
