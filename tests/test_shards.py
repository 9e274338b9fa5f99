"""Shard contents against the source PNGs, the manifest's numbers, and the schema's guards."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label
from helpers import read_split
from PIL import Image

from pipeline.files import sha256_file
from pipeline.labels import get_mapping
from pipeline.shards import (
    FORMAT_VERSION,
    ShardError,
    ShardWriter,
    load_manifest,
    open_shard,
    sample_stats,
    shard_info,
)

TRAINID = np.array([id2label[i].trainId if i in id2label else 255 for i in range(256)])
TRAINID = np.where((TRAINID < 0) | (TRAINID > 18), 255, TRAINID).astype(np.uint8)


@pytest.mark.parametrize("split", ["train", "val"])
def test_contents_equal_an_independent_remap_and_resize(city, shards, split):
    sources = sorted((city / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    images, labels, names = read_split(shards, split)
    assert names == [p.name[: -len("_leftImg8bit.png")] for p in sources]
    for i, src in enumerate(sources):
        rgb = np.asarray(Image.open(src).convert("RGB")).astype(np.int32)
        gt = city / "gtFine" / split / src.parent.name / f"{names[i]}_gtFine_labelIds.png"
        ids = np.asarray(Image.open(gt))
        # 256x128 -> 128x64: mean of each 2x2 block, rounded half up; label: one pixel per block
        blocks = rgb[0::2, 0::2] + rgb[1::2, 0::2] + rgb[0::2, 1::2] + rgb[1::2, 1::2]
        assert np.array_equal(images[i], (blocks + 2) // 4), names[i]
        assert np.array_equal(labels[i], TRAINID[ids[1::2, 1::2]]), names[i]


def test_manifest_numbers_match_the_shards(city, shards):
    manifest = load_manifest(shards)
    mapping = get_mapping("trainid")
    assert manifest["config"]["size"] == {"height": 64, "width": 128}
    assert manifest["config"]["mapping_def"] == mapping.to_json()
    assert manifest["classes"] == mapping.classes
    assert manifest["palette"] == mapping.palette.tolist()
    assert [e["samples"] for e in manifest["splits"]["train"]["shards"]] == [4, 2]
    assert manifest["splits"]["val"]["samples"] == 4
    for split in ("train", "val"):
        for entry in manifest["splits"][split]["shards"]:
            assert sha256_file(shards / entry["file"]) == entry["sha256"]
    images, labels, _ = read_split(shards, "train")
    x = images.reshape(-1, 3) / 255.0
    assert np.allclose(manifest["mean"], x.mean(0), atol=1e-9)
    assert np.allclose(manifest["std"], x.std(0), atol=1e-9)
    assert manifest["class_pixels"] == np.bincount(labels.ravel(), minlength=256)[:19].tolist()
    assert sum(manifest["class_pixels"]) < labels.size  # some pixels are ignore (255)


def test_shard_schema_and_chunking(shards):
    path = shards / "train-00000.h5"
    info = shard_info(path)
    assert (info.split, info.num_samples, info.size, info.source_size) == (
        "train", 4, (64, 128), (128, 256))  # (H, W): 128 wide, 64 high, from 256x128
    assert info.mapping["name"] == "trainid" and info.ignore_index == 255
    with h5py.File(path, "r") as f:
        assert f["image"].dtype == np.uint8 and f["image"].chunks == (1, 64, 128, 3)
        assert f["label"].dtype == np.uint8 and f["label"].chunks == (1, 64, 128)
        assert f.attrs["format_version"] == FORMAT_VERSION


def test_sample_stats_equal_the_plain_sums():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (7, 9), dtype=np.uint8)
    label[0, 0] = 255
    s = sample_stats(image, label, 5)
    x = image.reshape(-1, 3) / 255.0
    assert np.allclose(s["sum"], x.sum(0)) and np.allclose(s["sumsq"], (x * x).sum(0))
    assert s["pixels"] == 63
    assert s["class_pixels"] == np.bincount(label[label < 5], minlength=5).tolist()


def writer(path, n=2):
    return ShardWriter(path, num_samples=n, size=(4, 8), split="train",
                       mapping=get_mapping("seed4"), source_size=(8, 16), compression="lzf")


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "train-00000.h5"
    with pytest.raises(RuntimeError, match="boom"), writer(path) as w:
        w.add(np.zeros((4, 8, 3), np.uint8), np.zeros((4, 8), np.uint8), "a_000000_000000")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ShardError, match="1 samples written, 2 expected"), writer(path) as w:
        w.add(np.zeros((4, 8, 3), np.uint8), np.zeros((4, 8), np.uint8), "a_000000_000000")
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_open_shard_names_the_broken_file(tmp_path):
    junk = tmp_path / "train-00000.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(ShardError, match=rf"^{junk}: not a readable HDF5 file"):
        with open_shard(junk):
            pass
    with pytest.raises(ShardError, match="shard missing"):
        with open_shard(tmp_path / "nope.h5"):
            pass
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:
        f.attrs["format_version"] = 0
    with pytest.raises(ShardError, match=r"old.h5: shard format_version 0, this code reads 1"):
        with open_shard(old):
            pass


def test_load_manifest_says_what_to_run(tmp_path, city, shards):
    with pytest.raises(ShardError, match=r"no manifest.json, so not a shard folder \(one holds "
                                         r"manifest.json and \{split\}-00000.h5, made by "
                                         r"`cityprep preprocess --datadir CITYSCAPES --out DIR`"):
        load_manifest(tmp_path)
    # the raw tree, given where shards belong: named, with the command that makes shards of it
    with pytest.raises(ShardError) as e:
        load_manifest(city)
    assert str(e.value) == (
        f"{city}: a Cityscapes tree (leftImg8bit/, gtFine/), not shards; make shards from it "
        f"with `cityprep preprocess --datadir {city} --out data_cache/cityscapes-1024x512` "
        "and use data_cache/cityscapes-1024x512 instead")
    with pytest.raises(ShardError, match=r"train-00000.h5: a file, not a shard folder; pass its "
                                         rf"folder {shards}"):
        load_manifest(shards / "train-00000.h5")
    (tmp_path / "train-00000.h5").write_bytes(b"")
    with pytest.raises(ShardError, match="shards but no manifest.json: an unfinished `cityprep "
                                         "preprocess`; rerun the same command"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ShardError, match="format_version 99"):
        load_manifest(tmp_path)
