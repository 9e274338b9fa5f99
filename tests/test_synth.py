"""The synthetic city: Cityscapes layout and formats, determinism, labels that agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.labels import LABEL_BY_ID, LABEL_BY_NAME, get_mapping
from pipeline.synth import CITIES, synthesize

GT_SUFFIXES = ("labelIds.png", "color.png", "instanceIds.png", "polygons.json")


def stems(root: Path, split: str) -> list[str]:
    return sorted(p.name[: -len("_leftImg8bit.png")]
                  for p in (root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))


def frames(root: Path):
    """(image path, labelIds, instanceIds, color, polygons) of every frame."""
    for path in sorted((root / "leftImg8bit").glob("*/*/*_leftImg8bit.png")):
        split, city = path.parent.parent.name, path.parent.name
        gt = root / "gtFine" / split / city / path.name.replace("leftImg8bit.png", "gtFine_")
        yield (path, np.asarray(Image.open(f"{gt}labelIds.png")),
               np.asarray(Image.open(f"{gt}instanceIds.png")).astype(np.int64),
               np.asarray(Image.open(f"{gt}color.png")), json.loads(Path(f"{gt}polygons.json")
                                                                    .read_text()))


def png_format(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) straight from the PNG header."""
    head = Path(path).read_bytes()[:26]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"),
            head[24], head[25])


def test_exact_layout_and_names(tmp_path):
    paths = synthesize(tmp_path, train=5, val=2, size=(64, 128), seed=3)
    n = len(CITIES["train"])
    expected_train = [f"{CITIES['train'][i % n]}_{i // n:06d}_000019" for i in range(5)]
    expected_val = [f"{c}_000000_000019" for c in CITIES["val"][:2]]
    expected = [("train", s) for s in expected_train] + [("val", s) for s in expected_val]
    assert paths == [tmp_path / "leftImg8bit" / split / s.split("_")[0] / f"{s}_leftImg8bit.png"
                     for split, s in expected]
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    want = set()
    for split, s in expected:
        city = s.split("_")[0]
        want.add(f"leftImg8bit/{split}/{city}/{s}_leftImg8bit.png")
        want.update(f"gtFine/{split}/{city}/{s}_gtFine_{suffix}" for suffix in GT_SUFFIXES)
    assert files == want
    assert not set(CITIES["train"]) & set(CITIES["val"])


def test_png_formats_match_cityscapes(city):
    for path in (city / "leftImg8bit").rglob("*.png"):
        assert png_format(path) == (256, 128, 8, 2)  # RGB, 8 bit
    gt = city / "gtFine"
    for path in gt.rglob("*_labelIds.png"):
        assert png_format(path) == (256, 128, 8, 0)  # grey, 8 bit
    for path in gt.rglob("*_color.png"):
        assert png_format(path) == (256, 128, 8, 6)  # RGBA
    for path in gt.rglob("*_instanceIds.png"):
        assert png_format(path) == (256, 128, 16, 0)  # grey, 16 bit
    assert len(stems(city, "train")) == 6 and len(stems(city, "val")) == 4


@pytest.mark.slow
def test_deterministic_and_seeded(tmp_path):
    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in root.rglob("*") if p.is_file()}

    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        synthesize(tmp_path / name, train=2, val=1, size=(64, 128), seed=seed)
    a, b, c = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith("leftImg8bit.png"))
    # frames are drawn independently: more frames leave the first ones as they were
    synthesize(tmp_path / "d", train=3, val=2, size=(64, 128), seed=7)
    d = tree(tmp_path / "d")
    assert all(d[k] == v for k, v in a.items())


def test_label_ids_are_covered_by_trainid(city):
    mapping = get_mapping("trainid")
    seen = set()
    for path, ids, *_ in frames(city):
        assert ids.dtype == np.uint8
        train_ids = mapping.remap(ids, path)  # raises MappingError on an uncovered id
        assert train_ids.shape == (128, 256)
        seen.update(np.unique(ids).tolist())
    assert seen <= set(LABEL_BY_ID)
    assert 1 in seen  # ego vehicle: the ignore path gets exercised
    assert 0 not in seen  # every pixel is drawn by some polygon


def test_color_png_uses_official_colours(city):
    for _, ids, _, color, _ in frames(city):
        want = np.zeros(ids.shape + (4,), np.uint8)
        want[..., 3] = 255
        for i in np.unique(ids):
            want[ids == i, :3] = LABEL_BY_ID[int(i)].color
        np.testing.assert_array_equal(color, want)


def test_instance_ids_agree_with_label_ids(city):
    instanced = {lb.id for lb in LABEL_BY_ID.values() if lb.hasInstances}
    counted = 0
    for _, ids, inst, *_ in frames(city):
        grouped = inst >= 1000
        np.testing.assert_array_equal(inst[grouped] // 1000, ids[grouped])
        np.testing.assert_array_equal(inst[~grouped], ids[~grouped])
        # every pixel of a class with instances belongs to one, and only those classes have them
        assert np.array_equal(grouped, np.isin(ids, list(instanced)))
        counted += len(np.unique(inst[grouped]))
    assert counted >= 10  # cars, people... are told apart


def test_polygons_redraw_the_label_ids(city):
    for _, ids, _, _, polygons in frames(city):
        assert set(polygons) == {"imgHeight", "imgWidth", "objects"}
        assert (polygons["imgWidth"], polygons["imgHeight"]) == (256, 128)
        canvas = Image.new("L", (256, 128), 0)
        draw = ImageDraw.Draw(canvas)
        for obj in polygons["objects"]:
            assert set(obj) == {"label", "polygon"}
            pts = np.array(obj["polygon"])
            assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 3
            assert pts.dtype.kind == "i"
            assert pts.min() >= 0 and (pts[:, 0] <= 256).all() and (pts[:, 1] <= 128).all()
            draw.polygon([tuple(p) for p in pts.tolist()], fill=LABEL_BY_NAME[obj["label"]].id)
        np.testing.assert_array_equal(np.asarray(canvas), ids)


def test_official_scripts_read_the_polygons(city):
    """cityscapesScripts' json2labelImg turns our JSON into our labelIds and color PNGs."""
    pytest.importorskip("cityscapesscripts")
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    for path in sorted(city.rglob("*_gtFine_polygons.json"))[:3]:
        annotation = Annotation()
        annotation.fromJsonFile(str(path))
        stem = str(path)[: -len("polygons.json")]
        for encoding, suffix in (("ids", "labelIds.png"), ("color", "color.png")):
            np.testing.assert_array_equal(np.asarray(createLabelImage(annotation, encoding)),
                                          np.asarray(Image.open(stem + suffix)))


def test_common_classes_in_most_frames(city):
    names = ("road", "sky", "building", "car", "vegetation", "sidewalk")
    counts = dict.fromkeys(names, 0)
    total = 0
    for _, ids, *_ in frames(city):
        total += 1
        present = set(np.unique(ids).tolist())
        for name in names:
            counts[name] += LABEL_BY_NAME[name].id in present
    assert total == 10
    assert all(c >= 7 for c in counts.values()), counts


def test_image_is_drawn_from_the_labels(city):
    """Per-class colours a viewer expects, and class borders visible in the image."""
    means: dict[str, list] = {n: [] for n in ("sky", "road", "sidewalk", "vegetation")}
    for path, ids, *_ in frames(city):
        rgb = np.asarray(Image.open(path)).astype(float)
        for name in means:
            mask = ids == LABEL_BY_NAME[name].id
            if mask.sum() > 50:
                means[name].append(rgb[mask].mean(0))
        # the image changes more across label borders than inside regions
        edge = ids[:, 1:] != ids[:, :-1]
        step = np.abs(rgb[:, 1:] - rgb[:, :-1]).sum(-1)
        assert step[edge].mean() > 2 * step[~edge].mean()
    sky, road, walk, veg = (np.mean(means[n], 0) for n in means)
    assert sky[2] > sky[0] + 20  # blue
    assert veg[1] > veg[0] and veg[1] > veg[2]  # green
    assert walk.mean() > road.mean() + 20  # paving lighter than asphalt


@pytest.mark.parametrize("kwargs, match", [({"size": (8, 16)}, "too small"),
                                           ({"train": -1}, "negative"),
                                           ({"seed": -2}, "negative")])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthesize(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
