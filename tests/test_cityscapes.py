"""Finding (image, label) pairs in the official layout, with decoys that must not count;
decoding them with libspng to what Pillow gives, with errors that name the file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cityscapes import DatasetError, Pair, find_images, find_pairs, label_path_for, sibling
from pipeline.pngs import PNG_SIGNATURE, read_image, read_instance_ids, read_label_ids


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


# -- decoding: libspng with Pillow's results and errors -----------------------------------------


def png_bytes(width: int, height: int, depth: int, colour: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand, for the kinds Pillow cannot write (16-bit RGB, 4-bit grey)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)


def test_images_of_every_accepted_mode_decode_as_pillow_converts_them(tmp_path, rgb):
    rgb16 = np.random.default_rng(1).integers(0, 65536, (6, 10, 3)).astype(">u2")
    kinds = {
        "rgb": Image.fromarray(rgb),
        "rgba": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "grey": Image.fromarray(rgb[..., 0]),
        "palette": Image.fromarray(rgb).quantize(7),
    }
    for kind, im in kinds.items():
        im.save(tmp_path / f"{kind}.png", transparency=3 if kind == "palette" else None)
    (tmp_path / "rgb16.png").write_bytes(png_bytes(10, 6, 16, 2, [r.tobytes() for r in rgb16]))
    for path in sorted(tmp_path.glob("*.png")):
        got = read_image(path)
        with Image.open(path) as im:
            assert got.dtype == np.uint8 and got.shape == (6, 10, 3), path.name
            assert np.array_equal(got, np.asarray(im.convert("RGB"))), path.name
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)
    assert np.array_equal(read_image(tmp_path / "rgb16.png"), (rgb16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("array, mode", [
    (np.zeros((6, 10, 2), np.uint8), "LA"),
    (np.zeros((6, 10), np.uint16), "I;16"),
    (np.zeros((6, 10), bool), "1"),
])
def test_image_modes_that_are_not_photos_are_refused(tmp_path, array, mode):
    path = tmp_path / "x_leftImg8bit.png"
    Image.fromarray(array).save(path)
    with pytest.raises(DatasetError, match=rf"^{path}: PNG of mode {mode}; "
                                           "expected RGB or RGBA or L or P$"):
        read_image(path)


def test_label_ids_are_the_stored_values_in_every_accepted_mode(tmp_path):
    ids = np.random.default_rng(0).choice(np.array([0, 7, 8, 11, 26, 33], np.uint8), (6, 10))
    Image.fromarray(ids).save(tmp_path / "grey.png")
    palette = Image.fromarray(ids, "P")  # indices = ids, whatever colours the palette holds
    palette.putpalette(np.random.default_rng(1).integers(0, 256, 768, dtype=np.uint8).tobytes())
    palette.save(tmp_path / "palette.png")
    small = ids % 16  # a 4-bit grey PNG: libspng and Pillow scale it to 0-255, the ids do not
    (tmp_path / "grey4.png").write_bytes(png_bytes(10, 6, 4, 0, [
        bytes((r[0::2] << 4) | r[1::2]) for r in small]))
    for name, want in (("grey", ids), ("palette", ids), ("grey4", small)):
        got = read_label_ids(tmp_path / f"{name}.png")
        assert got.dtype == np.uint8 and np.array_equal(got, want), name


@pytest.mark.parametrize("array, mode", [
    (np.zeros((6, 10, 3), np.uint8), "RGB"),  # a _color.png where the labelIds belong
    (np.zeros((6, 10, 4), np.uint8), "RGBA"),
    (np.zeros((6, 10), np.uint16), "I;16"),  # an _instanceIds.png
])
def test_label_modes_that_are_not_label_ids_are_refused(tmp_path, array, mode):
    path = tmp_path / "x_gtFine_labelIds.png"
    Image.fromarray(array).save(path)
    with pytest.raises(DatasetError, match=rf"^{path}: PNG of mode {mode}; expected L or P$"):
        read_label_ids(path)


def test_a_flipped_bit_in_the_pixel_data_is_an_error_not_wrong_pixels(tmp_path):
    path = tmp_path / "x_leftImg8bit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # pyspng alone ignores CRCs: it decodes 2 pixels wrong here
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"^{path}: corrupt or truncated PNG \(CRC mismatch "
                                           r"in the IDAT chunk at byte \d+\)$"):
        read_image(path)


def test_what_follows_the_pixel_data_is_not_checked_as_with_pillow(tmp_path, rgb):
    path = tmp_path / "x_leftImg8bit.png"
    Image.fromarray(rgb).save(path)
    path.write_bytes(path.read_bytes()[:-5])  # cut inside IEND: Pillow reads it, and so do we
    assert np.array_equal(read_image(path), rgb)
    with pytest.raises(DatasetError, match=rf"^{path.parent / 'gone.png'}: no such file$"):
        read_image(path.parent / "gone.png")
    path.write_bytes(PNG_SIGNATURE + b"\0\0\0\x0dIHDR")
    with pytest.raises(DatasetError, match=r"corrupt or truncated PNG \(image file is truncated"):
        read_image(path)


def test_instance_ids_are_the_stored_16_bit_values(tmp_path, city):
    for path in sorted((city / "gtFine").rglob("*_instanceIds.png"))[:3]:
        ids = read_instance_ids(path)
        assert ids.dtype == np.uint16
        np.testing.assert_array_equal(ids, np.asarray(Image.open(path)))
        assert (ids > 1000).any()  # cars, people: real instance ids, not clipped
    assert sibling(Path("a/x_gtFine_labelIds.png"), "instanceIds.png") == \
        Path("a/x_gtFine_instanceIds.png")
    small = np.array([[0, 7, 26], [11, 26, 255]], np.uint8)  # 8-bit grey reads too
    Image.fromarray(small).save(tmp_path / "eight.png")
    np.testing.assert_array_equal(read_instance_ids(tmp_path / "eight.png"), small)
    Image.new("RGB", (4, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(DatasetError, match="rgb.png: PNG of mode RGB; expected I;16 or L"):
        read_instance_ids(tmp_path / "rgb.png")


def test_images_of_a_split_without_labels(tmp_path, city):
    from pipeline.synth import synthesize

    synthesize(tmp_path, train=0, val=0, test=2, size=(32, 64))
    assert [n for n, _ in find_images(tmp_path, "test")] == ["berlin_000000_000019",
                                                            "bielefeld_000000_000019"]
    assert not (tmp_path / "gtFine").exists()
    with pytest.raises(DatasetError, match=r"leftImg8bit/val: no such split folder \(has: test\)"):
        find_images(tmp_path, "val")
    assert len(find_images(city, "val")) == 4
