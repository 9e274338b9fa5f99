"""Finding the (image, label) pairs of a split in the official Cityscapes layout.

    leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png
    gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png     (mode "fine")
    gtCoarse/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtCoarse_labelIds.png (mode "coarse")

Only files that follow the naming pattern count, so `.DS_Store`, macOS `._*` twins, the
`_color`/`_instanceIds`/`_polygons` siblings and stray files never become samples. An image
without its label (or a label without its image) is an error naming both paths: silently
dropping half a split would train on less data than the user thinks. `open_png` and
`read_label_ids` decode the files with errors that name them (corrupt, truncated, not a PNG).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

MODES = {"fine": "gtFine", "coarse": "gtCoarse"}
IMAGE_MODES = ("RGB", "RGBA", "L", "P")  # decoded as they are, converted to RGB by the caller
LABEL_MODES = ("L", "P")  # 8-bit labelIds; in a palette PNG the indices are the ids
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

    missing = sorted(images.keys() - labels.keys())
    if missing:
        name = missing[0]
        more = f" ({len(missing) - 1} more images lack labels)" if len(missing) > 1 else ""
        expected = root / gt / split / images[name].parent.name
        raise DatasetError(
            f"{images[name]}: image without label; expected "
            f"{expected / f'{name}_{gt}_labelIds.png'}{more}"
        )
    orphans = sorted(labels.keys() - images.keys())
    if orphans:
        name = orphans[0]
        more = f" ({len(orphans) - 1} more labels lack images)" if len(orphans) > 1 else ""
        expected = root / IMAGE_DIR / split / labels[name].parent.name
        raise DatasetError(
            f"{labels[name]}: label without image; expected "
            f"{expected / f'{name}_{IMAGE_DIR}.png'}{more}"
        )
    return [Pair(images[n], labels[n], n, city_of(n)) for n in sorted(images)]


def open_png(path: Path, modes: tuple[str, ...]) -> Image.Image:
    """Decode a PNG fully; DatasetError naming the file for anything unreadable."""
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not a PNG file (empty, or not an image)") from None
    try:
        if im.format != "PNG":
            raise DatasetError(f"{path}: not a PNG file ({im.format})")
        if im.mode not in modes:
            raise DatasetError(f"{path}: PNG of mode {im.mode}; expected {' or '.join(modes)}")
        im.load()  # PIL checks chunk CRCs and the zlib stream; load() closes the file
        return im
    except DatasetError:
        im.close()
        raise
    except Exception as e:  # noqa: BLE001 - every decoder complaint is about this one file
        im.close()
        raise DatasetError(f"{path}: corrupt or truncated PNG ({e})") from None


def read_label_ids(path: Path) -> np.ndarray:
    """(H, W) uint8 labelIds of an original label PNG."""
    return np.asarray(open_png(path, LABEL_MODES))
