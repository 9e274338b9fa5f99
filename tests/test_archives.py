"""The official zips as input: the same shards as from the extracted tree, damaged downloads
named, a missing split or mode named by the archive that holds it, handles per process."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import KW, assert_clean, make_tree, pack_official

from pipeline import archives
from pipeline.cityscapes import DatasetError, Member, find_pairs, read_bytes, sibling
from pipeline.cli import main
from pipeline.pngs import read_image, read_label_ids
from pipeline.preprocess import preprocess
from pipeline.shards import load_manifest

ZIP = "leftImg8bit_trainvaltest.zip"


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.h5"))}


def same_but_source(a: dict, b: dict) -> bool:
    strip = lambda m: {**m, "config": {**m["config"], "source_root": None}}  # noqa: E731
    return strip(a) == strip(b)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree") / "cityscapes")


@pytest.fixture(scope="module")
def zips(tree, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("zips") / "downloads"
    pack_official(tree, dest)
    return dest


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    preprocess(tree, out, **KW)
    return out


@pytest.mark.slow
def test_shards_from_the_synthetic_city_zips_are_byte_identical(city, tmp_path):
    zipped = tmp_path / "downloads"
    assert sorted(p.name for p in pack_official(city, zipped)) == [
        "gtFine_trainvaltest.zip", ZIP]
    kw = dict(size=(64, 128), shard_size=4, progress=False)
    a = preprocess(city, tmp_path / "a", workers=1, **kw)
    b = preprocess(zipped, tmp_path / "b", workers=2, **kw)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert same_but_source(a, b)
    assert b["config"]["source_root"] == str(zipped.resolve())  # the datadir, either way


def test_parts_over_zips_equal_one_run_over_the_tree(zips, reference, tmp_path):
    out = tmp_path / "out"
    assert preprocess(zips, out, **KW, part=(2, 2)) is None
    manifest = preprocess(zips, out, **{**KW, "workers": 2}, part=(1, 2))
    assert shard_bytes(out) == shard_bytes(reference)
    assert same_but_source(manifest, load_manifest(reference))


def test_a_tree_job_resumed_from_the_zips_keeps_every_shard(tree, zips, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    preprocess(zips, out, **KW)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == stamps


def test_images_zipped_labels_extracted(tree, reference, tmp_path):
    mixed = tmp_path / "mixed"
    pack_official(tree, mixed, only=(ZIP,))
    shutil.copytree(tree / "gtFine", mixed / "gtFine")
    pairs = find_pairs(mixed, "train")
    assert isinstance(pairs[0].image, Member) and isinstance(pairs[0].label, Path)
    preprocess(mixed, tmp_path / "out", **KW)
    assert shard_bytes(tmp_path / "out") == shard_bytes(reference)


def test_members_name_themselves_and_read_as_the_files_do(tree, zips):
    pair = find_pairs(zips, "val")[0]
    member = f"leftImg8bit/val/aachen/{pair.name}_leftImg8bit.png"
    assert pair.image == Member(zips / ZIP, member)
    assert str(pair.image) == f"{zips / ZIP}:{member}"
    assert str(pair.label) == (f"{zips / 'gtFine_trainvaltest.zip'}:gtFine/val/aachen/"
                               f"{pair.name}_gtFine_labelIds.png")
    files = find_pairs(tree, "val")[0]
    assert np.array_equal(read_image(pair.image), read_image(files.image))
    assert np.array_equal(read_label_ids(pair.label), read_label_ids(files.label))
    assert read_bytes(pair.label) == files.label.read_bytes()
    # the frame's other files, as a reader of instanceIds would find them, in either source
    assert sibling(pair.label, "color.png") == Member(
        zips / "gtFine_trainvaltest.zip", f"gtFine/val/aachen/{pair.name}_gtFine_color.png")
    assert sibling(files.label, "color.png") == files.label.with_name(
        f"{pair.name}_gtFine_color.png")
    with pytest.raises(DatasetError, match=rf"^{zips / 'gtFine_trainvaltest.zip'}:gtFine/val/"
                                           rf"aachen/{pair.name}_gtFine_color.png: no such file "
                                           "in the archive$"):
        read_bytes(sibling(pair.label, "color.png"))


def test_archives_are_recognised_by_what_they_hold(tree, tmp_path):
    pack_official(tree, tmp_path / "d")
    (tmp_path / "d" / ZIP).rename(tmp_path / "d" / "download (1).zip")
    with zipfile.ZipFile(tmp_path / "d" / "notes.zip", "w") as z:  # not Cityscapes: ignored
        z.writestr("notes/train/a/b.txt", "x")
    pairs = find_pairs(tmp_path / "d", "train")
    assert pairs[0].image.archive == tmp_path / "d" / "download (1).zip"
    assert len(pairs) == 6


def test_the_same_split_extracted_and_zipped_is_refused(tree, zips, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(zips, both)
    shutil.copytree(tree / "leftImg8bit", both / "leftImg8bit")
    with pytest.raises(DatasetError, match=rf"^{both}: leftImg8bit/train is both in "
                                           rf"{both / 'leftImg8bit/train'} and in {both / ZIP}; "
                                           r"keep one of them \(move the other away\)$"):
        find_pairs(both, "train")
    shutil.copy(both / ZIP, both / "copy.zip")
    shutil.rmtree(both / "leftImg8bit")
    with pytest.raises(DatasetError, match=rf"leftImg8bit/val is both in {both / 'copy.zip'} "
                                           rf"and in {both / ZIP}"):
        find_pairs(both, "val")


def test_a_missing_split_or_mode_names_the_archive_that_holds_it(tree, tmp_path):
    d = tmp_path / "d"
    pack_official(tree, d, only=(ZIP,))
    with pytest.raises(DatasetError, match=rf"^{d}: split val needs gtFine_trainvaltest.zip for "
                                           r"its gtFine labels \(found gtFine: nothing\)$"):
        find_pairs(d, "val")
    with pytest.raises(DatasetError, match=rf"^{d}: split train_extra needs "
                                           r"leftImg8bit_trainextra.zip \(found leftImg8bit: "
                                           rf"{ZIP} \(train, val\)\)$"):
        find_pairs(d, "train_extra", mode="coarse")
    with pytest.raises(DatasetError, match=rf"^{d}: split val needs gtCoarse.zip for its "
                                           "gtCoarse labels"):
        find_pairs(d, "val", mode="coarse")
    pack_official(tree, d, only=("gtFine_trainvaltest.zip",))
    (d / "leftImg8bit" / "train_extra" / "x").mkdir(parents=True)  # images of train_extra ...
    (d / "leftImg8bit/train_extra/x/x_000000_000019_leftImg8bit.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=rf"^{d}: split train_extra has no gtFine labels in "
                                           "Cityscapes; it has coarse ones: use mode coarse, "
                                           "with gtCoarse.zip$"):
        find_pairs(d, "train_extra")  # ... but fine labels do not exist for it
    with pytest.raises(DatasetError, match=rf"^{d}: split nope is not in Cityscapes"):
        find_pairs(d, "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(d / "gtFine_trainvaltest.zip", empty)
    with pytest.raises(DatasetError, match=rf"^{empty}: no leftImg8bit/ folder and no archive "
                                           r"of it \(its zips hold neither: gtFine_trainvaltest"
                                           r".zip\); expected .* or the official "
                                           rf"{ZIP} and gtFine_trainvaltest.zip$"):
        find_pairs(empty, "train")


def test_an_image_without_its_label_in_the_archive_names_the_member(tree, tmp_path):
    d = tmp_path / "d"
    pack_official(tree, d)
    with zipfile.ZipFile(d / "gtFine_trainvaltest.zip") as src, \
            zipfile.ZipFile(d / "gt.zip", "w") as dst:
        for info in src.infolist():
            if "bochum_000001" not in info.filename:
                dst.writestr(info, src.read(info))
    (d / "gtFine_trainvaltest.zip").unlink()
    with pytest.raises(DatasetError) as err:
        find_pairs(d, "train")
    assert str(err.value) == (
        f"{d / ZIP}:leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png: image "
        f"without label; expected {d / 'gt.zip'}:gtFine/train/bochum/"
        "bochum_000001_000019_gtFine_labelIds.png")


# -- damaged downloads: named, nothing written -------------------------------------------------


def test_a_truncated_download_is_named_before_anything_is_written(tree, tmp_path):
    d = tmp_path / "d"
    pack_official(tree, d)
    data = (d / ZIP).read_bytes()
    (d / ZIP).write_bytes(data[: len(data) * 2 // 3])  # a partial download
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=rf"^{d / ZIP}: not a readable zip archive \("
                                           "truncated: it ends before its table of contents\\); "
                                           "the download is incomplete or corrupt, download "
                                           rf"{ZIP} again$"):
        preprocess(d, out, **KW)
    assert not out.exists()
    r = CliRunner().invoke(main, ["preprocess", "--datadir", str(d), "--out", str(out),
                                  "--quiet"])
    assert r.exit_code == 1 and r.output.startswith(f"Error: {d / ZIP}: not a readable zip")
    assert "Traceback" not in r.output


def test_an_unreadable_zip_this_split_does_not_need_is_left_alone(tree, tmp_path):
    d = tmp_path / "d"
    pack_official(tree, d)
    (d / "gtCoarse.zip").write_bytes(b"PK\x03\x04 still downloading")
    (d / "leftImg8bit_sequence_trainvaltest.zip").write_bytes(b"")  # another one under way
    assert len(find_pairs(d, "train")) == 6
    with pytest.raises(DatasetError, match=rf"^{d / 'gtCoarse.zip'}: not a readable zip"):
        find_pairs(d, "train", mode="coarse")
    (d / ZIP).rename(d / "renamed.zip")
    (d / "renamed.zip").write_bytes((d / "renamed.zip").read_bytes()[:1000])
    with pytest.raises(DatasetError, match=rf"^{d / 'gtCoarse.zip'}: not a readable zip"):
        find_pairs(d, "val")  # the images are missing, and might be in an unreadable zip
    (d / "gtCoarse.zip").unlink()
    with pytest.raises(DatasetError, match=rf"^{d / 'leftImg8bit_sequence_trainvaltest.zip'}: "
                                           r"not a readable zip .* again \(also unreadable: "
                                           r"renamed.zip\)$"):
        find_pairs(d, "val")


def _data_offset(path: Path, member: str) -> tuple[int, int]:
    """Where a member's stored bytes start in the archive, and how many there are."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_damaged_member_is_named_when_it_is_read(tree, tmp_path, compression):
    d = tmp_path / "d"
    pack_official(tree, d, compression=compression)
    member = "leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png"  # second shard
    start, size = _data_offset(d / ZIP, member)
    with open(d / ZIP, "r+b") as f:
        f.seek(start + size // 2)
        byte = f.read(1)
        f.seek(start + size // 2)
        f.write(bytes([byte[0] ^ 0x55]))
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=rf"^{d / ZIP}:{member}: damaged archive member "
                                           r"\(.+\); the download is incomplete or corrupt, "
                                           rf"download {ZIP} again$"):
        preprocess(d, out, **KW, splits=["train"])  # read in a worker process
    assert_clean(out)
    # the shard before is complete and kept; one the worker finished before it was stopped
    # (a race: slower under coverage) is complete too; the damaged one was never written
    kept = sorted(p.name for p in out.glob("*.h5"))
    assert kept[0] == "train-00000.h5" and "train-00001.h5" not in kept


# -- one handle per archive and process --------------------------------------------------------


def _read_all(members: list[Member]) -> list[bytes]:
    return [read_bytes(m) for m in members for _ in range(20)]


def test_forked_workers_never_share_the_parents_handle(zips):
    members = [p.image for p in find_pairs(zips, "train")]
    want = [read_bytes(m) for m in members]  # the parent now holds an open handle
    parent = archives._handles[zips / ZIP][1]
    with mp.get_context("fork").Pool(2) as pool:  # reading at once, in three processes
        pending = [pool.apply_async(_read_all, (members,)) for _ in range(4)]
        mine = _read_all(members)
        theirs = [p.get(timeout=60) for p in pending]
    expected = [b for b in want for _ in range(20)]
    assert mine == expected and all(t == expected for t in theirs)
    assert archives._handles[zips / ZIP][1] is parent
