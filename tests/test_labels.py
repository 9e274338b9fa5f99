"""The label table and mappings against cityscapesScripts' own definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cityscapesscripts.helpers import labels as cs

from pipeline.labels import (
    IGNORE_INDEX,
    LABEL_BY_ID,
    LABELS,
    MappingError,
    colorize,
    get_mapping,
)


def test_table_equals_cityscapesscripts():
    ours = [tuple(lb) for lb in LABELS]
    theirs = [tuple(lb) for lb in cs.labels]
    assert ours == theirs  # names, ids, trainIds, categories, category ids, flags, colours


def test_trainid_mapping_is_the_official_19_classes():
    m = get_mapping("trainid")
    official = sorted((lb for lb in cs.labels if 0 <= lb.trainId < 255), key=lambda lb: lb.trainId)
    assert m.classes == [lb.name for lb in official]
    assert m.num_classes == 19
    assert m.categories == [lb.category for lb in official]
    assert m.palette.tolist() == [list(lb.color) for lb in official]
    for lb in cs.labels:
        if lb.id < 0:
            continue
        expected = lb.trainId if 0 <= lb.trainId < 255 else IGNORE_INDEX
        assert m.lut[lb.id] == expected, lb.name
        assert m.covered[lb.id]
        if expected != IGNORE_INDEX:
            assert m.export_ids[expected] == lb.id  # predictions export back to labelIds
    assert not m.covered[34:].any()


def test_seed4_mapping():
    m = get_mapping("seed4")
    assert m.classes == ["background", "road", "sky", "car"]
    ids = np.array([cs.name2label[n].id for n in ("road", "sky", "car", "building", "person",
                                                  "unlabeled", "license plate")
                    if cs.name2label[n].id >= 0], dtype=np.uint8)
    assert m.remap(ids).tolist() == [1, 2, 3, 0, 0, 0]
    assert m.remap(np.arange(34, dtype=np.uint8)).tolist() == [
        {"road": 1, "sky": 2, "car": 3}.get(LABEL_BY_ID[i].name, 0) for i in range(34)]
    assert m.palette[1:].tolist() == [list(cs.name2label[n].color) for n in ("road", "sky", "car")]


def test_uncovered_id_is_an_error_naming_the_file():
    m = get_mapping("trainid")
    label = np.full((4, 4), 7, np.uint8)
    label[0, 0], label[1, 1] = 40, 99
    with pytest.raises(MappingError, match=r"x_gtFine_labelIds.png: label id\(s\) 40, 99 are "
                                           r"not covered by mapping 'trainid'"):
        m.remap(label, "x_gtFine_labelIds.png")


def test_json_mapping(tmp_path):
    spec = {"classes": [{"name": "drivable", "color": [10, 20, 30], "ids": [7, 9]},
                        {"name": "obstacle", "color": [200, 0, 0], "ids": [24, 25, 26]}],
            "ignore_ids": [0, 1, 2, 3]}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(spec))
    m = get_mapping(path)
    assert m.name == "mine" and m.classes == ["drivable", "obstacle"]
    assert m.categories == ["flat", "human"]  # from the first id when not given
    assert m.remap(np.array([7, 9, 24, 26, 0, 3], np.uint8)).tolist() == [0, 0, 1, 1, 255, 255]
    with pytest.raises(MappingError, match=r"label id\(s\) 11 are not covered by mapping 'mine'"):
        m.remap(np.array([7, 11], np.uint8), "f.png")
    again = type(m).from_json(m.to_json())
    assert again == m


@pytest.mark.parametrize("spec, message", [
    ({"classes": [{"name": "a", "color": [1, 2, 3], "ids": [7]},
                  {"name": "b", "color": [1, 2, 3], "ids": [7]}]}, "given to both 'a' and 'b'"),
    ({"classes": [{"name": "a", "ids": [7]}]}, "expected"),
    ({"classes": [{"name": "a", "color": [1, 2], "ids": [7]}]}, "every colour needs 3 values"),
    ({"classes": []}, "needs 1 to 255 classes"),
    ({"classes": [{"name": "a", "color": [1, 2, 3], "ids": [300]}]}, "outside 0..254"),
])
def test_bad_json_mappings(tmp_path, spec, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(MappingError, match=message):
        get_mapping(path)


def test_unknown_mapping_and_unreadable_file(tmp_path):
    with pytest.raises(MappingError, match="not one of trainid, seed4 and no such file"):
        get_mapping("trainids")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(MappingError, match="broken.json: cannot read mapping JSON"):
        get_mapping(tmp_path / "broken.json")


def test_colorize_uses_palette_and_blacks_out_ignore():
    m = get_mapping("trainid")
    label = np.array([[0, 13], [255, 18]], np.uint8)
    rgb = colorize(label, m.palette)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == list(cs.name2label["road"].color)
    assert rgb[0, 1].tolist() == list(cs.name2label["car"].color)
    assert rgb[1, 0].tolist() == [0, 0, 0]
    assert rgb[1, 1].tolist() == list(cs.name2label["bicycle"].color)
