"""The preprocessing job: exact contents, determinism, resume after SIGKILL, parts, bad input."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label
from helpers import KW, REPO, SIZE, assert_clean, leftovers, make_tree, read_split, write_png
from PIL import Image

from pipeline.cityscapes import DatasetError
from pipeline.labels import Mapping, MappingError, get_mapping
from pipeline.preprocess import PreprocessError, preprocess
from pipeline.shards import ShardWriter, load_manifest
from pipeline.sizes import wh


def image_path(root: Path, name: str, split: str = "train") -> Path:
    return root / "leftImg8bit" / split / name.split("_")[0] / f"{name}_leftImg8bit.png"


def label_path(root: Path, name: str, split: str = "train") -> Path:
    return root / "gtFine" / split / name.split("_")[0] / f"{name}_gtFine_labelIds.png"


def to_trainid(ids: np.ndarray) -> np.ndarray:
    table = np.array([id2label[i].trainId if i in id2label else 255 for i in range(256)])
    table[(table < 0) | (table > 18)] = 255
    return table[ids].astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree") / "cityscapes")


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> Path:
    """One uninterrupted run, the yardstick for resumed and split runs."""
    out = tmp_path_factory.mktemp("ref") / "out"
    preprocess(tree, out, **KW)
    return out


def test_general_size_uses_antialiased_image_and_nearest_label(tree, tmp_path):
    out = tmp_path / "out"
    size = (12, 24)  # 64x32 -> 24x12 is not an integer factor
    preprocess(tree, out, size=size, shard_size=4, workers=1, progress=False)
    images, labels, names = read_split(out, "train")
    for i, name in enumerate(names):
        src = Image.open(image_path(tree, name))
        assert np.array_equal(images[i], np.asarray(src.resize(wh(size), Image.BILINEAR)))
        ids = np.asarray(Image.open(label_path(tree, name)).resize(wh(size), Image.NEAREST))
        assert np.array_equal(labels[i], to_trainid(ids))


def test_integer_factor_path_picks_the_same_label_pixels_as_pil_nearest(tree, reference):
    _, labels, names = read_split(reference, "train")
    for i, name in enumerate(names):
        ids = np.asarray(Image.open(label_path(tree, name)).resize(wh(SIZE), Image.NEAREST))
        assert np.array_equal(labels[i], to_trainid(ids))


def test_workers_do_not_change_a_byte(tree, reference, tmp_path):
    manifest = preprocess(tree, tmp_path / "out", **{**KW, "workers": 2})
    assert manifest == load_manifest(reference)  # sha256 per shard: identical files


def test_rerun_keeps_verified_shards_and_redoes_a_corrupt_one(tree, reference, tmp_path):
    out = tmp_path / "out"
    first = preprocess(tree, out, **KW)
    shards = sorted(out.glob("*.h5"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    with open(shards[1], "r+b") as f:  # flip bytes inside the image data
        f.seek(shards[1].stat().st_size // 2)
        f.write(b"\xff" * 64)
    second = preprocess(tree, out, **KW)
    assert second == first == load_manifest(reference)
    changed = [p.name for p in shards if p.stat().st_mtime_ns != stamps[p.name]]
    assert changed == [shards[1].name]
    assert sorted(p.name for p in out.iterdir()) == sorted([*stamps, "manifest.json"])


DRIVER = """
import sys, time
import pipeline.shards as shards
add = shards.ShardWriter.add
def slow_add(self, *args):  # give the kill something to interrupt
    time.sleep(0.2)
    add(self, *args)
shards.ShardWriter.add = slow_add
from pipeline.preprocess import preprocess
preprocess(sys.argv[1], sys.argv[2], size=(16, 32), shard_size=2, workers=2, progress=False)
"""


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tree, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tree), str(out)], cwd=REPO,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while True:  # freeze the job; kill it once some shards are done and one is half-written
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline
        os.killpg(proc.pid, signal.SIGSTOP)
        if list(out.glob("*.h5")) and list(out.glob(".*.h5.tmp-*")):
            break
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()

    manifest = preprocess(tree, out, **KW)
    assert manifest == load_manifest(reference)
    for split in ("train", "val"):
        for got, want in zip(read_split(out, split), read_split(reference, split)):
            assert np.array_equal(np.asarray(got), np.asarray(want))
    assert leftovers(out) == [] and not (out / ".cityprep").exists()


CLI_DRIVER = """
import signal, sys, time
# a test run from a background shell inherits SIGINT ignored; a terminal's Ctrl-C is not
signal.signal(signal.SIGINT, signal.default_int_handler)
import pipeline.shards as shards
add = shards.ShardWriter.add
def slow_add(self, *args):
    time.sleep(0.2)
    add(self, *args)
shards.ShardWriter.add = slow_add
from pipeline.cli import main
main(["preprocess", "--datadir", sys.argv[1], "--out", sys.argv[2], "--size", "32x16",
      "--shard-size", "2", "--workers", "2", "--quiet"])
"""


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes(tree, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", CLI_DRIVER, str(tree), str(out)], cwd=REPO,
                            start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.h5")):
        assert proc.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Error: interrupted; rerun the same command to continue" in err
    assert "Traceback" not in err
    assert not (out / "manifest.json").exists() and leftovers(out) == []
    assert preprocess(tree, out, **KW) == load_manifest(reference)


def test_seed4_mapping(tree, tmp_path):
    manifest = preprocess(tree, tmp_path / "out", **KW, mapping="seed4")
    assert manifest["classes"] == ["background", "road", "sky", "car"]
    _, labels, names = read_split(tmp_path / "out", "train")
    seed4 = {"road": 1, "sky": 2, "car": 3}
    table = np.array([seed4.get(id2label[i].name, 0) if i in id2label else 255
                      for i in range(256)], np.uint8)
    for i, name in enumerate(names):
        ids = np.asarray(Image.open(label_path(tree, name)))[1::2, 1::2]
        assert np.array_equal(labels[i], table[ids])
    assert sum(manifest["class_pixels"]) == labels.size  # seed4 ignores nothing


def test_parts_merge_in_any_order(tree, reference, tmp_path):
    out = tmp_path / "out"
    assert preprocess(tree, out, **KW, part=(2, 2)) is None  # part 1 has not run yet
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.h5")) == [
        "train-00001.h5", "val-00000.h5"]  # every second shard of the job
    manifest = preprocess(tree, out, **KW, part=(1, 2))
    assert manifest == load_manifest(reference)
    # a part rerun after the fact changes nothing
    assert preprocess(tree, out, **KW, part=(2, 2)) == manifest
    assert leftovers(out) == [] and not (out / ".cityprep").exists()


def test_adding_a_split_later_keeps_the_first(tree, reference, tmp_path):
    out = tmp_path / "out"
    preprocess(tree, out, splits=["val"], **KW)
    manifest = preprocess(tree, out, splits=["train"], **KW)
    assert manifest == load_manifest(reference)


# -- bad input: one clear error, nothing half-written ----------------------------------------


def corrupt_keeping_crcs(path: Path) -> None:
    """Garbage inside the first IDAT chunk with valid CRCs: only the zlib stream is wrong."""
    data = bytearray(path.read_bytes())
    pos = 8
    while True:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            data[pos + 8 : pos + 8 + length] = b"\x07" * length
            data[pos + 8 + length : pos + 12 + length] = struct.pack(
                ">I", zlib.crc32(bytes(data[pos + 4 : pos + 8 + length])))
            break
        pos += 12 + length
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
     r"corrupt or truncated PNG \(image file is truncated"),
    (lambda p: p.write_bytes(b""), "not a PNG file"),
    (lambda p: Image.new("RGB", (64, 32)).save(p, format="BMP"), r"not a PNG file \(BMP\)"),
    (lambda p: p.write_bytes(p.read_bytes()[:200] + b"\x00" * 8 + p.read_bytes()[208:]),
     "corrupt or truncated PNG"),
    (corrupt_keeping_crcs, "corrupt or truncated PNG"),
])
@pytest.mark.parametrize("which", ["image", "label"])
def test_corrupt_or_truncated_png(tmp_path, damage, message, which):
    root = make_tree(tmp_path / "cs", counts=(("train", 3),))
    name = "bochum_000001_000019"  # last by name: the second shard
    target = (image_path if which == "image" else label_path)(root, name)
    damage(target)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=rf"^{target}: ({message})"):
        preprocess(root, out, splits=["train"], **KW)
    assert_clean(out)
    assert sorted(p.name for p in out.glob("*.h5")) == ["train-00000.h5"]  # complete, kept


def test_size_mismatch(tmp_path):
    root = make_tree(tmp_path / "cs", counts=(("train", 2),))
    label = label_path(root, "bochum_000001_000019")
    write_png(label, np.full((30, 64), 7, np.uint8))
    with pytest.raises(DatasetError, match=rf"^{image_path(root, 'bochum_000001_000019')} is "
                                           rf"64x32 but its label {label} is 64x30 \(WxH\)$"):
        preprocess(root, tmp_path / "out", splits=["train"], **KW)
    assert_clean(tmp_path / "out")
    assert list((tmp_path / "out").glob("*.h5")) == []


def test_label_that_is_not_labelids(tmp_path):
    root = make_tree(tmp_path / "cs", counts=(("train", 2),))
    label = label_path(root, "aachen_000000_000019")
    write_png(label, np.zeros((32, 64, 3), np.uint8))  # a colour PNG where labelIds belong
    with pytest.raises(DatasetError, match=rf"^{label}: PNG of mode RGB; expected L or P$"):
        preprocess(root, tmp_path / "out", splits=["train"], **KW)
    assert_clean(tmp_path / "out")


def test_uncovered_label_id(tmp_path):
    root = make_tree(tmp_path / "cs", counts=(("train", 2),))
    label = label_path(root, "aachen_000000_000019")
    ids = np.asarray(Image.open(label)).copy()
    ids[3, 5] = 77
    write_png(label, ids)
    with pytest.raises(MappingError, match=rf"^{label}: label id\(s\) 77 are not covered by "
                                           "mapping 'trainid'"):
        preprocess(root, tmp_path / "out", splits=["train"], **KW)
    assert_clean(tmp_path / "out")


def test_missing_and_empty_datadir_write_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=rf"^{tmp_path / 'nope'}: no such folder"):
        preprocess(tmp_path / "nope", out, **KW)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no leftImg8bit/ folder"):
        preprocess(tmp_path / "empty", out, **KW)
    assert not out.exists()


def test_split_without_images_and_image_without_label(tmp_path):
    root = make_tree(tmp_path / "cs", counts=(("train", 2),))
    (root / "leftImg8bit" / "val" / "lindau").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"leftImg8bit/val: no images named"):
        preprocess(root, tmp_path / "out", **KW)
    label_path(root, "bochum_000001_000019").unlink()
    with pytest.raises(DatasetError, match="bochum_000001_000019_leftImg8bit.png: image without "
                                           "label; expected .*bochum_000001_000019_gtFine"):
        preprocess(root, tmp_path / "out", splits=["train"], **KW)
    assert not (tmp_path / "out").exists()


def test_folder_of_another_config_is_refused_untouched(tree, tmp_path):
    out = tmp_path / "out"
    preprocess(tree, out, **KW)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PreprocessError, match=rf"^{out}: holds shards of another config \(size "
                                              r"32x16; this run asks for size 16x8\); choose "
                                              "another --out, or delete the folder"):
        preprocess(tree, out, **{**KW, "size": (8, 16)})
    with pytest.raises(PreprocessError, match=r"\(mapping 'trainid'; this run asks for mapping "
                                              r"'seed4'\)"):
        preprocess(tree, out, **KW, mapping="seed4")
    with pytest.raises(PreprocessError, match=r"\(compression none, shard_size 2; this run asks "
                                              r"for compression lzf, shard_size 3\)"):
        preprocess(tree, out, **{**KW, "shard_size": 3}, compression="lzf")
    spec = get_mapping("trainid").to_json()
    edited = Mapping.from_json({**spec, "ignore_ids": spec["ignore_ids"] + [99]})
    with pytest.raises(PreprocessError, match="mapping 'trainid' with another definition"):
        preprocess(tree, out, **KW, mapping=edited)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_folder_with_shards_of_unknown_origin_is_refused(tree, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000.h5").write_bytes(b"not mine")
    with pytest.raises(PreprocessError, match="holds shards but no manifest.json"):
        preprocess(tree, out, **KW)


def test_interrupted_part_refuses_another_config(tree, tmp_path):
    out = tmp_path / "out"
    preprocess(tree, out, **KW, part=(1, 2))  # no manifest yet: the job record guards
    with pytest.raises(PreprocessError, match="another config"):
        preprocess(tree, out, **{**KW, "shard_size": 3}, part=(2, 2))


def test_full_disk(tree, tmp_path, monkeypatch):
    add = ShardWriter.add
    calls = []

    def add_until_full(self, *args):
        calls.append(1)
        if len(calls) > 3:  # the second shard runs out of space
            raise OSError(errno.ENOSPC, "No space left on device")
        add(self, *args)

    monkeypatch.setattr(ShardWriter, "add", add_until_full)  # workers are forked: they see it
    out = tmp_path / "out"
    with pytest.raises(PreprocessError, match=r"train-00001.h5: disk full \(no space left on "
                                              r"device\).*finished shards are kept"):
        preprocess(tree, out, **KW)
    assert_clean(out)
    assert sorted(p.name for p in out.glob("*.h5")) == ["train-00000.h5"]
    monkeypatch.setattr(ShardWriter, "add", add)
    assert preprocess(tree, out, **KW)["splits"]["train"]["samples"] == 6


def test_bad_arguments(tree, tmp_path):
    with pytest.raises(PreprocessError, match="part 3/2"):
        preprocess(tree, tmp_path / "out", **KW, part=(3, 2))
    with pytest.raises(PreprocessError, match="compression must be one of none, lzf, gzip"):
        preprocess(tree, tmp_path / "out", **KW, compression="zstd")
    with pytest.raises(MappingError, match="not one of trainid, seed4"):
        preprocess(tree, tmp_path / "out", **KW, mapping="nope")
    assert not (tmp_path / "out").exists()
