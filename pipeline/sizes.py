"""Sizes inside the code are (H, W), as torch and numpy shapes have them.

Three places speak the other order, (W, H), and each converts here and nowhere else:
- what users type: an image's size is `--size WxH`, as image tools write it, while crops,
  windows and strides are HxW, as torch writes them (`parse`, and `text` for messages);
- the files: the manifest's config.size, a shard's source_size and a checkpoint's size are
  [W, H] (shard format_version 1): `wh` on the way out, `from_wh` on the way in;
- PIL, whose sizes are (W, H): `wh` too.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def wh(size: Sequence[int]) -> tuple[int, int]:
    """(H, W) -> (W, H), for the files and for PIL."""
    return int(size[1]), int(size[0])


def from_wh(size: Sequence[int]) -> tuple[int, int]:
    """[W, H] of a file -> (H, W)."""
    return int(size[1]), int(size[0])
