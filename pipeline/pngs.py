"""Reading the dataset's PNGs: images, labelIds and instanceIds, checked and decoded.

`read_image`, `read_label_ids` and `read_instance_ids` decode with libspng (pyspng): ~40%
less CPU than Pillow on 2048x1024 images and pixel-identical to it. They check every chunk
CRC themselves, as pyspng does not; errors name the file and the cause (not a PNG, corrupt,
truncated, a mode that does not belong). A file is a `Source` of `pipeline/cityscapes.py`
(in a tree or a zip), read through its `read_bytes`.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyspng
from PIL import Image

from pipeline.cityscapes import DatasetError, Source, read_bytes

IMAGE_MODES = ("RGB", "RGBA", "L", "P")  # all decoded to RGB
LABEL_MODES = ("L", "P")  # labelIds; in a palette PNG the indices are the ids
INSTANCE_MODES = ("I;16", "L")  # 16-bit grey as Cityscapes ships them; 8-bit grey reads too
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_error(path: Source, data: bytes) -> DatasetError:
    """Why `data` is no PNG at all; Pillow names the format it is instead."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = f"({im.format})"
    except Exception:  # noqa: BLE001 - whatever it is, it is not an image Pillow knows
        kind = "(empty, or not an image)"
    return DatasetError(f"{path}: not a PNG file {kind}")


def _check_chunks(data: bytes) -> str | None:
    """Why the chunks up to the end of the pixel data are broken, or None when they are whole.

    libspng (as pyspng sets it up) ignores chunk CRCs and the zlib checksum, so a flipped bit
    in the pixel data would decode to wrong pixels without a word; checking every CRC here
    costs ~1 ms per 2048x1024 image. What follows the last IDAT chunk cannot change a pixel
    and goes unchecked, as with Pillow (a file cut inside its IEND chunk still decodes).
    """
    view, pos, idat = memoryview(data), 8, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if idat and kind != b"IDAT":
            return None
        name = kind.decode("latin-1")
        end = pos + 12 + length
        if end > len(data):
            return (f"image file is truncated: its {name} chunk at byte {pos} needs "
                    f"{12 + length} bytes, {len(data) - pos} are left")
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return f"CRC mismatch in the {name} chunk at byte {pos}"
        idat = kind == b"IDAT"
        pos = end
    return None if idat else "image file is truncated: it ends before its pixel data"


def _read_png(path: Source, modes: tuple[str, ...]) -> tuple[bytes, str, int]:
    """The bytes of a whole, undamaged PNG of one of `modes` -> (data, mode, bit depth).

    Modes are Pillow's names for the IHDR's colour type, so messages read as they did when
    Pillow decoded everything: "1", "L" or "I;16" (grey of 1, 2-8 or 16 bits), "RGB", "P",
    "LA", "RGBA" (8 or 16 bits).
    """
    data = read_bytes(path)
    if not data.startswith(PNG_SIGNATURE):
        raise _png_error(path, data)
    problem = _check_chunks(data)
    if problem is None and data[8:16] != b"\0\0\0\x0dIHDR":
        problem = "no 13-byte IHDR chunk first"
    if problem:
        raise DatasetError(f"{path}: corrupt or truncated PNG ({problem})")
    depth, colour = data[24], data[25]
    mode = {0: {1: "1", 16: "I;16"}.get(depth, "L"), 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}.get(
        colour)
    if mode is None:
        raise DatasetError(f"{path}: corrupt or truncated PNG (colour type {colour} in IHDR)")
    if mode not in modes:
        raise DatasetError(f"{path}: PNG of mode {mode}; expected {' or '.join(modes)}")
    return data, mode, depth


def _decode(path: Source, data: bytes, fmt: str | None) -> np.ndarray:
    try:
        return pyspng.load(data, fmt)
    except RuntimeError as e:  # pyspng's only complaint, for anything libspng rejects
        why = str(e).removeprefix("pyspng: ")
        raise DatasetError(f"{path}: corrupt or truncated PNG ({why})") from None


def read_image(path: Source) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a leftImg8bit PNG; DatasetError naming the file otherwise.

    Grey, palette, RGBA and 16-bit PNGs come out as Pillow's `convert("RGB")` gives them
    (grey repeated, palette looked up, alpha dropped, the high byte of 16-bit samples).
    """
    data, _, _ = _read_png(path, IMAGE_MODES)
    return _decode(path, data, "RGB")


def image_size(path: Source) -> tuple[int, int]:
    """(H, W) of a leftImg8bit PNG from its IHDR chunk, without decoding the pixels."""
    data, _, _ = _read_png(path, IMAGE_MODES)
    width, height = struct.unpack(">II", data[16:24])
    return int(height), int(width)


def read_label_ids(path: Source) -> np.ndarray:
    """(H, W) uint8 labelIds of an original label PNG: the stored sample values."""
    data, mode, depth = _read_png(path, LABEL_MODES)
    if mode == "P":  # libspng only gives palette colours, Pillow gives the indices
        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im)
        except Exception as e:  # noqa: BLE001 - every decoder complaint is about this file
            raise DatasetError(f"{path}: corrupt or truncated PNG ({e})") from None
    ids = _decode(path, data, None)
    if depth < 8:  # libspng scales 2- and 4-bit grey to 0-255; the ids are the stored values
        ids //= 255 // (2**depth - 1)
    return ids


def read_instance_ids(path: Source) -> np.ndarray:
    """(H, W) uint16 instanceIds: labelId * 1000 + k for instances, the bare labelId elsewhere.

    For 16-bit PNGs a view into the decoded buffer (not contiguous): no copy on the hot path.
    """
    data, mode, depth = _read_png(path, INSTANCE_MODES)
    ids = _decode(path, data, None)
    if ids.ndim == 3:  # libspng hands 16-bit grey out with an alpha channel; the grey is first
        return ids[..., 0]
    if depth < 8:
        ids //= 255 // (2**depth - 1)
    return ids.astype(np.uint16)
