"""The Cityscapes label table, named mappings from labelId to training class, colorizing.

This is the only copy of the table in the project. A *mapping* turns the labelIds of a
`*_gtFine_labelIds.png` into training class ids (0..K-1, 255 = ignore) through a 256-entry
lookup table; an id the mapping does not cover is an error, never a silent class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

IGNORE_INDEX = 255


class Label(NamedTuple):
    name: str
    id: int
    trainId: int  # noqa: N815 - the official field names, so tests can compare them
    category: str
    categoryId: int  # noqa: N815
    hasInstances: bool  # noqa: N815
    ignoreInEval: bool  # noqa: N815
    color: tuple[int, int, int]


# fmt: off
LABELS: tuple[Label, ...] = (
    #      name                    id  trainId  category        catId  hasInst ignore  color
    Label("unlabeled",             0,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("ego vehicle",           1,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("rectification border",  2,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("out of roi",            3,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("static",                4,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("dynamic",               5,  255, "void",          0, False, True,  (111, 74, 0)),
    Label("ground",                6,  255, "void",          0, False, True,  (81, 0, 81)),
    Label("road",                  7,    0, "flat",          1, False, False, (128, 64, 128)),
    Label("sidewalk",              8,    1, "flat",          1, False, False, (244, 35, 232)),
    Label("parking",               9,  255, "flat",          1, False, True,  (250, 170, 160)),
    Label("rail track",           10,  255, "flat",          1, False, True,  (230, 150, 140)),
    Label("building",             11,    2, "construction",  2, False, False, (70, 70, 70)),
    Label("wall",                 12,    3, "construction",  2, False, False, (102, 102, 156)),
    Label("fence",                13,    4, "construction",  2, False, False, (190, 153, 153)),
    Label("guard rail",           14,  255, "construction",  2, False, True,  (180, 165, 180)),
    Label("bridge",               15,  255, "construction",  2, False, True,  (150, 100, 100)),
    Label("tunnel",               16,  255, "construction",  2, False, True,  (150, 120, 90)),
    Label("pole",                 17,    5, "object",        3, False, False, (153, 153, 153)),
    Label("polegroup",            18,  255, "object",        3, False, True,  (153, 153, 153)),
    Label("traffic light",        19,    6, "object",        3, False, False, (250, 170, 30)),
    Label("traffic sign",         20,    7, "object",        3, False, False, (220, 220, 0)),
    Label("vegetation",           21,    8, "nature",        4, False, False, (107, 142, 35)),
    Label("terrain",              22,    9, "nature",        4, False, False, (152, 251, 152)),
    Label("sky",                  23,   10, "sky",           5, False, False, (70, 130, 180)),
    Label("person",               24,   11, "human",         6, True,  False, (220, 20, 60)),
    Label("rider",                25,   12, "human",         6, True,  False, (255, 0, 0)),
    Label("car",                  26,   13, "vehicle",       7, True,  False, (0, 0, 142)),
    Label("truck",                27,   14, "vehicle",       7, True,  False, (0, 0, 70)),
    Label("bus",                  28,   15, "vehicle",       7, True,  False, (0, 60, 100)),
    Label("caravan",              29,  255, "vehicle",       7, True,  True,  (0, 0, 90)),
    Label("trailer",              30,  255, "vehicle",       7, True,  True,  (0, 0, 110)),
    Label("train",                31,   16, "vehicle",       7, True,  False, (0, 80, 100)),
    Label("motorcycle",           32,   17, "vehicle",       7, True,  False, (0, 0, 230)),
    Label("bicycle",              33,   18, "vehicle",       7, True,  False, (119, 11, 32)),
    Label("license plate",        -1,   -1, "vehicle",       7, False, True,  (0, 0, 142)),
)
# fmt: on

LABEL_BY_NAME: dict[str, Label] = {label.name: label for label in LABELS}
LABEL_BY_ID: dict[int, Label] = {label.id: label for label in LABELS}


class MappingError(ValueError):
    """A mapping that cannot be built, or a label image it does not cover."""


@dataclass(frozen=True)
class ClassDef:
    name: str
    color: tuple[int, int, int]
    ids: tuple[int, ...]  # the labelIds that become this class
    category: str


@dataclass(frozen=True)
class Mapping:
    """labelId -> training class id. Class k is `classes[k]`; IGNORE_INDEX means ignore."""

    name: str
    class_defs: tuple[ClassDef, ...]
    ignore_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for owner, ids in [(c.name, c.ids) for c in self.class_defs] + [
            ("ignore_ids", self.ignore_ids)
        ]:
            for i in ids:
                if not 0 <= i <= 254:
                    raise MappingError(f"mapping {self.name!r}: label id {i} is outside 0..254")
                if i in seen:
                    raise MappingError(
                        f"mapping {self.name!r}: label id {i} is given to both "
                        f"{seen[i]!r} and {owner!r}"
                    )
                seen[i] = owner
        if not 1 <= len(self.class_defs) <= 255:
            raise MappingError(f"mapping {self.name!r}: needs 1 to 255 classes")

    @property
    def num_classes(self) -> int:
        return len(self.class_defs)

    @property
    def classes(self) -> list[str]:
        return [c.name for c in self.class_defs]

    @property
    def categories(self) -> list[str]:
        return [c.category for c in self.class_defs]

    @cached_property
    def palette(self) -> np.ndarray:
        """(K, 3) uint8 colour of each class."""
        return np.array([c.color for c in self.class_defs], dtype=np.uint8).reshape(-1, 3)

    @cached_property
    def lut(self) -> np.ndarray:
        """256-entry uint8 table: labelId -> class id (IGNORE_INDEX for ignored ids)."""
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for k, c in enumerate(self.class_defs):
            lut[list(c.ids)] = k
        return lut

    @cached_property
    def covered(self) -> np.ndarray:
        """256-entry bool table: True where the mapping says what a labelId becomes."""
        covered = np.zeros(256, dtype=bool)
        for c in self.class_defs:
            covered[list(c.ids)] = True
        covered[list(self.ignore_ids)] = True
        return covered

    @cached_property
    def export_ids(self) -> np.ndarray:
        """256-entry uint8 table: class id -> the labelId written in official-format PNGs."""
        table = np.zeros(256, dtype=np.uint8)  # ignore -> 0 'unlabeled'
        for k, c in enumerate(self.class_defs):
            table[k] = c.ids[0]
        return table

    def remap(self, label_ids: np.ndarray, source: str | Path = "<array>") -> np.ndarray:
        """labelIds (uint8, any shape) -> class ids; raises MappingError naming `source`."""
        if label_ids.dtype != np.uint8:
            if label_ids.size and (label_ids.min() < 0 or label_ids.max() > 255):
                raise MappingError(f"{source}: label values outside 0..255")
            label_ids = label_ids.astype(np.uint8)
        present = np.bincount(label_ids.ravel(), minlength=256) > 0
        bad = np.flatnonzero(present & ~self.covered)
        if bad.size:
            raise MappingError(
                f"{source}: label id(s) {', '.join(map(str, bad.tolist()))} are not covered "
                f"by mapping {self.name!r}; add them to a class or to ignore_ids "
                "(see --mapping FILE)"
            )
        return self.lut[label_ids]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "classes": [
                {"name": c.name, "color": list(c.color), "ids": list(c.ids), "category": c.category}
                for c in self.class_defs
            ],
            "ignore_ids": list(self.ignore_ids),
        }

    @classmethod
    def from_json(cls, data: dict, name: str = "custom") -> Mapping:
        try:
            class_defs = tuple(
                ClassDef(
                    name=str(c["name"]),
                    color=tuple(int(v) for v in c["color"]),  # type: ignore[arg-type]
                    ids=tuple(int(i) for i in c["ids"]),
                    category=str(c.get("category") or _category_of(c["ids"])),
                )
                for c in data["classes"]
            )
            ignore_ids = tuple(int(i) for i in data.get("ignore_ids", []))
        except (KeyError, TypeError, ValueError) as e:
            raise MappingError(
                f"mapping {name!r}: expected {{'classes': [{{'name', 'color', 'ids'}}], "
                f"'ignore_ids': [...]}} ({type(e).__name__}: {e})"
            ) from None
        if any(len(c.color) != 3 for c in class_defs):
            raise MappingError(f"mapping {name!r}: every colour needs 3 values")
        return cls(name=str(data.get("name", name)), class_defs=class_defs, ignore_ids=ignore_ids)


def _category_of(ids: list[int]) -> str:
    label = LABEL_BY_ID.get(int(ids[0])) if ids else None
    return label.category if label else "void"


def _trainid_mapping() -> Mapping:
    evaluated = sorted((lb for lb in LABELS if 0 <= lb.trainId < 255), key=lambda lb: lb.trainId)
    return Mapping(
        name="trainid",
        class_defs=tuple(ClassDef(lb.name, lb.color, (lb.id,), lb.category) for lb in evaluated),
        ignore_ids=tuple(lb.id for lb in LABELS if lb.id >= 0 and lb.trainId == 255),
    )


def _seed4_mapping() -> Mapping:
    # The original project's trimmed set: background first, as its dataset.py numbered them.
    kept = {"road": 1, "sky": 2, "car": 3}
    background = tuple(lb.id for lb in LABELS if lb.id >= 0 and lb.name not in kept)
    classes = [ClassDef("background", (0, 0, 0), background, "void")] + [
        ClassDef(n, LABEL_BY_NAME[n].color, (LABEL_BY_NAME[n].id,), LABEL_BY_NAME[n].category)
        for n in kept
    ]
    return Mapping(name="seed4", class_defs=tuple(classes), ignore_ids=())


BUILTIN_MAPPINGS = ("trainid", "seed4")


def get_mapping(spec: str | Path) -> Mapping:
    """A named mapping (`trainid`, `seed4`) or one read from a JSON file."""
    if str(spec) == "trainid":
        return _trainid_mapping()
    if str(spec) == "seed4":
        return _seed4_mapping()
    path = Path(spec)
    if not path.is_file():
        raise MappingError(
            f"mapping {str(spec)!r}: not one of {', '.join(BUILTIN_MAPPINGS)} and no such file"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MappingError(f"{path}: cannot read mapping JSON ({e})") from None
    return Mapping.from_json(data, name=path.stem)


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class ids (H, W) -> RGB (H, W, 3) uint8; ignore and unknown ids are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:255]
    table[: len(palette)] = palette
    return table[np.asarray(label, dtype=np.uint8)]
