"""Finding the (image, label) pairs of a split in the official Cityscapes layout.

    leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png
    gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png     (mode "fine")
    gtCoarse/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtCoarse_labelIds.png (mode "coarse")

Only files that follow the naming pattern count, so `.DS_Store`, macOS `._*` twins, the
`_color`/`_instanceIds`/`_polygons` siblings and stray files never become samples. An image
without its label (or a label without its image) is an error naming both paths: silently
dropping half a split would train on less data than the user thinks.

`read_image` and `read_label_ids` decode the PNGs with libspng (pyspng): ~40% less CPU than
Pillow on 2048x1024 images and pixel-identical to it. They check every chunk CRC themselves,
as pyspng does not; errors name the file and the cause (not a PNG, corrupt, truncated, a
mode that does not belong).
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyspng
from PIL import Image

MODES = {"fine": "gtFine", "coarse": "gtCoarse"}
IMAGE_MODES = ("RGB", "RGBA", "L", "P")  # all decoded to RGB
LABEL_MODES = ("L", "P")  # labelIds; in a palette PNG the indices are the ids
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_DIR = "leftImg8bit"
_STEM = r"(?P<name>(?P<city>[A-Za-z][A-Za-z0-9_-]*?)_\d{6}_\d{6})"
IMAGE_RE = re.compile(rf"^{_STEM}_leftImg8bit\.png$")


class DatasetError(ValueError):
    """A Cityscapes tree that is missing, empty or inconsistent; the message names the paths."""


class Pair(NamedTuple):
    image: Path
    label: Path
    name: str  # {city}_{seq:06d}_{frame:06d}
    city: str


def _gt_dir(mode: str) -> str:
    if mode not in MODES:
        raise DatasetError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    return MODES[mode]


def city_of(name: str) -> str:
    return name.rsplit("_", 2)[0]


def image_path_for(root: Path, split: str, name: str) -> Path:
    return Path(root) / IMAGE_DIR / split / city_of(name) / f"{name}_leftImg8bit.png"


def label_path_for(root: Path, split: str, name: str, mode: str = "fine") -> Path:
    """The original labelIds PNG of sample `name` (used for full-resolution evaluation)."""
    gt = _gt_dir(mode)
    return Path(root) / gt / split / city_of(name) / f"{name}_{gt}_labelIds.png"


def _scan(split_dir: Path, pattern: re.Pattern) -> dict[str, Path]:
    """name -> path for the matching files in the city folders of one split folder."""
    found = {}
    if split_dir.is_dir():
        for path in sorted(split_dir.glob("*/*")):
            m = pattern.match(path.name)
            if m and path.is_file():
                found[m["name"]] = path
    return found


def find_pairs(root: Path, split: str, mode: str = "fine") -> list[Pair]:
    """The (image, label) pairs of `split`, sorted by name; DatasetError when the tree is wrong."""
    root = Path(root)
    gt = _gt_dir(mode)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (expected a Cityscapes tree)")
    if not (root / IMAGE_DIR).is_dir():
        raise DatasetError(
            f"{root}: no {IMAGE_DIR}/ folder; expected the Cityscapes layout "
            f"{IMAGE_DIR}/{{split}}/{{city}}/*_{IMAGE_DIR}.png and {gt}/{{split}}/{{city}}/"
        )
    split_dir = root / IMAGE_DIR / split
    if not split_dir.is_dir():
        have = sorted(p.name for p in (root / IMAGE_DIR).iterdir() if p.is_dir())
        raise DatasetError(f"{split_dir}: no such split folder (has: {', '.join(have) or 'none'})")
    images = _scan(split_dir, IMAGE_RE)
    if not images:
        raise DatasetError(
            f"{split_dir}: no images named {{city}}_{{seq}}_{{frame}}_{IMAGE_DIR}.png "
            "in its city folders"
        )
    label_re = re.compile(rf"^{_STEM}_{gt}_labelIds\.png$")
    labels = _scan(root / gt / split, label_re)

    _unpaired(images, labels, "image without label", "images lack labels",
              root / gt / split, f"_{gt}_labelIds.png")
    _unpaired(labels, images, "label without image", "labels lack images",
              root / IMAGE_DIR / split, f"_{IMAGE_DIR}.png")
    return [Pair(images[n], labels[n], n, city_of(n)) for n in sorted(images)]


def _unpaired(these: dict[str, Path], those: dict[str, Path], problem: str, plural: str,
              other_split: Path, other_suffix: str) -> None:
    """The first of `these` without a partner in `those` is an error naming both paths."""
    lonely = sorted(these.keys() - those.keys())
    if lonely:
        name = lonely[0]
        more = f" ({len(lonely) - 1} more {plural})" if len(lonely) > 1 else ""
        expected = other_split / these[name].parent.name / f"{name}{other_suffix}"
        raise DatasetError(f"{these[name]}: {problem}; expected {expected}{more}")


def _png_error(path: Path, data: bytes) -> DatasetError:
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


def _read_png(path: Path, modes: tuple[str, ...]) -> tuple[bytes, str, int]:
    """The bytes of a whole, undamaged PNG of one of `modes` -> (data, mode, bit depth).

    Modes are Pillow's names for the IHDR's colour type, so messages read as they did when
    Pillow decoded everything: "1", "L" or "I;16" (grey of 1, 2-8 or 16 bits), "RGB", "P",
    "LA", "RGBA" (8 or 16 bits).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
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


def _decode(path: Path, data: bytes, fmt: str | None) -> np.ndarray:
    try:
        return pyspng.load(data, fmt)
    except RuntimeError as e:  # pyspng's only complaint, for anything libspng rejects
        why = str(e).removeprefix("pyspng: ")
        raise DatasetError(f"{path}: corrupt or truncated PNG ({why})") from None


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a leftImg8bit PNG; DatasetError naming the file otherwise.

    Grey, palette, RGBA and 16-bit PNGs come out as Pillow's `convert("RGB")` gives them
    (grey repeated, palette looked up, alpha dropped, the high byte of 16-bit samples).
    """
    data, _, _ = _read_png(path, IMAGE_MODES)
    return _decode(path, data, "RGB")


def read_label_ids(path: Path) -> np.ndarray:
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


# -- instance ids and unlabelled splits (full-resolution evaluation, test-server submissions) --

INSTANCE_MODES = ("I;16", "L")  # 16-bit grey as Cityscapes ships them; 8-bit grey reads too


def instance_path_for(label: Path) -> Path:
    """The `*_instanceIds.png` beside a `*_labelIds.png`, as cityscapesScripts finds it."""
    label = Path(label)
    return label.with_name(label.name.replace("_labelIds.png", "_instanceIds.png"))


def read_instance_ids(path: Path) -> np.ndarray:
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


def find_images(root: Path, split: str) -> list[tuple[str, Path]]:
    """(name, image) of every image of `split`, sorted by name, without looking for labels.

    For the test split, whose labels are not public.
    """
    split_dir = Path(root) / IMAGE_DIR / split
    images = _scan(split_dir, IMAGE_RE)
    if not images:
        raise DatasetError(f"{split_dir}: no images named {{city}}_{{seq}}_{{frame}}_"
                           f"{IMAGE_DIR}.png in its city folders")
    return sorted(images.items())
