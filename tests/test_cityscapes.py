"""Finding (image, label) pairs in the official layout, with decoys that must not count."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cityscapes import DatasetError, Pair, find_pairs, label_path_for


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def frame(root: Path, split: str, name: str, gt: str = "gtFine", label: bool = True) -> None:
    city = name.rsplit("_", 2)[0]
    touch(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
    if label:
        for suffix in ("labelIds.png", "color.png", "instanceIds.png", "polygons.json"):
            touch(root / gt / split / city / f"{name}_{gt}_{suffix}")


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "cityscapes"
    for name in ("aachen_000001_000019", "aachen_000000_000019", "bad_honnef_000000_000019"):
        frame(root, "train", name)
    frame(root, "val", "lindau_000000_000019")
    # decoys: coarse-only extra split, coarse labels, macOS and stray files
    frame(root, "train_extra", "augsburg_000000_000019", gt="gtCoarse")
    frame(root, "train", "aachen_000000_000019", gt="gtCoarse")
    touch(root / "leftImg8bit" / "train" / "aachen" / ".DS_Store")
    touch(root / "leftImg8bit" / "train" / "aachen" / "._aachen_000000_000019_leftImg8bit.png")
    touch(root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png.bak")
    touch(root / "leftImg8bit" / "train" / "aachen" / "notes.txt")
    touch(root / "leftImg8bit" / "train" / "stray_000000_000019_leftImg8bit.png")  # no city dir
    touch(root / "gtFine" / "train" / "aachen" / ".DS_Store")
    touch(root / "leftImg8bit" / ".DS_Store")
    touch(root / "README")
    return root


def test_fine_pairs_sorted_and_decoys_skipped(tree):
    pairs = find_pairs(tree, "train")
    assert [p.name for p in pairs] == [
        "aachen_000000_000019", "aachen_000001_000019", "bad_honnef_000000_000019"]
    first = pairs[0]
    assert isinstance(first, Pair) and first.city == "aachen"
    assert first.image == tree / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert first.label == tree / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    assert pairs[2].city == "bad_honnef"  # city names may contain underscores
    assert [p.name for p in find_pairs(tree, "val")] == ["lindau_000000_000019"]


def test_coarse_mode_uses_gtcoarse(tree):
    pairs = find_pairs(tree, "train_extra", mode="coarse")
    assert [p.label.name for p in pairs] == ["augsburg_000000_000019_gtCoarse_labelIds.png"]
    with pytest.raises(DatasetError, match="image without label"):
        find_pairs(tree, "train", mode="coarse")  # only one of three train frames is coarse


def test_train_extra_has_no_fine_labels(tree):
    with pytest.raises(DatasetError) as err:
        find_pairs(tree, "train_extra")
    msg = str(err.value)
    assert "augsburg_000000_000019_leftImg8bit.png: image without label" in msg
    assert "gtFine/train_extra/augsburg/augsburg_000000_000019_gtFine_labelIds.png" in msg


def test_label_path_for_matches_discovery(tree):
    for pair in find_pairs(tree, "train"):
        assert label_path_for(tree, "train", pair.name) == pair.label
    assert label_path_for(tree, "train_extra", "augsburg_000000_000019", "coarse") == (
        tree / "gtCoarse/train_extra/augsburg/augsburg_000000_000019_gtCoarse_labelIds.png")


def test_image_without_label_names_both_paths(tree):
    frame(tree, "train", "aachen_000002_000019", label=False)
    with pytest.raises(DatasetError) as err:
        find_pairs(tree, "train")
    msg = str(err.value)
    assert str(tree / "leftImg8bit/train/aachen/aachen_000002_000019_leftImg8bit.png") in msg
    assert str(tree / "gtFine/train/aachen/aachen_000002_000019_gtFine_labelIds.png") in msg


def test_label_without_image_names_both_paths(tree):
    (tree / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png").rename(
        tree / "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png")
    with pytest.raises(DatasetError) as err:
        find_pairs(tree, "val")
    msg = str(err.value)
    assert "image without label" in msg  # the renamed image is reported first
    (tree / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png").write_bytes(b"")
    with pytest.raises(DatasetError) as err:
        find_pairs(tree, "val")
    msg = str(err.value)
    assert str(tree / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png") in msg
    assert "label without image" in msg
    assert str(tree / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png") in msg


def test_missing_empty_and_wrong_roots(tmp_path, tree):
    with pytest.raises(DatasetError, match="no such folder"):
        find_pairs(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no leftImg8bit/ folder"):
        find_pairs(tmp_path / "empty", "train")
    with pytest.raises(DatasetError, match=r"leftImg8bit/test: no such split folder \(has: "
                                           r"train, train_extra, val\)"):
        find_pairs(tree, "test")
    (tree / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    touch(tree / "leftImg8bit" / "test" / "berlin" / ".DS_Store")
    with pytest.raises(DatasetError, match=r"leftImg8bit/test: no images named"):
        find_pairs(tree, "test")
    with pytest.raises(DatasetError, match="mode must be one of fine, coarse"):
        find_pairs(tree, "train", mode="medium")
