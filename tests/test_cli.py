"""`cityprep` end to end through click: synth -> preprocess -> inspect-shard -> verify."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny city and its shards, both made through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    runner = CliRunner()
    city, out = root / "city", root / "shards"
    r = runner.invoke(main, ["synth", str(city), "--train", "3", "--val", "2", "--size", "128x64"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["preprocess", "--datadir", str(city), "--out", str(out),
                             "--size", "64x32", "--shard-size", "2", "--workers", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "manifest.json written (train 3, val 2 samples)" in r.output
    return city, out


def test_inspect_shard_json(made):
    city, out = made
    names = sorted(p.name[:-16] for p in (city / "leftImg8bit/train").glob("*/*_leftImg8bit.png"))
    r = CliRunner().invoke(main, ["inspect-shard", str(out / "train-00001.h5"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["samples"] == 1 and info["split"] == "train"
    assert info["image"] == {"shape": [1, 32, 64, 3], "dtype": "uint8",
                             "chunks": [1, 32, 64, 3], "compression": "none"}
    assert info["label"]["shape"] == [1, 32, 64] and info["label"]["chunks"] == [1, 32, 64]
    assert info["size"] == {"height": 32, "width": 64}
    assert info["source_size"] == {"height": 64, "width": 128}
    shares = [c["share"] for c in info["classes_present"]]
    assert abs(sum(shares) - 1) < 1e-9 and shares == sorted(shares, reverse=True)
    assert sum(c["pixels"] for c in info["classes_present"]) == 32 * 64
    assert info["names"] == names[2:]  # shard 1 holds the third frame by name


def test_inspect_shard_text_and_preview(made, tmp_path):
    _, out = made
    preview = tmp_path / "p" / "preview.png"
    r = CliRunner().invoke(main, ["inspect-shard", str(out / "train-00000.h5"),
                                  "--preview", str(preview)])
    assert r.exit_code == 0, r.output
    assert "2 samples, 64x32 (WxH) from 128x64" in r.output
    assert "chunks (1, 32, 64, 3)" in r.output and "road" in r.output
    with Image.open(preview) as im:
        assert im.size == (128, 64)  # two rows of image | colorized label


def test_verify_ok_then_reports_each_problem(made, tmp_path):
    import shutil

    _, out = made
    data = tmp_path / "data"
    shutil.copytree(out, data)
    runner = CliRunner()
    r = runner.invoke(main, ["verify", str(data)])
    assert r.exit_code == 0 and "OK (3 shards, 5 samples)" in r.output, r.output
    (data / "train-00009.h5").write_bytes(b"stale")  # not listed: worth a note, not a failure
    r = runner.invoke(main, ["verify", str(data)])
    assert r.exit_code == 0 and "train-00009.h5: not listed in the manifest" in r.output

    shard = data / "train-00000.h5"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 32] = b"\x00" * 32
    shard.write_bytes(bytes(raw))
    (data / "val-00000.h5").unlink()
    r = runner.invoke(main, ["verify", str(data)])
    assert r.exit_code == 1
    assert f"{shard}: checksum differs from the manifest" in r.output
    assert f"{data / 'val-00000.h5'}: missing" in r.output
    assert "2 problem(s) found" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("args, message", [
    (["preprocess", "--datadir", "{tmp}/nowhere", "--out", "{tmp}/o"], "nowhere: no such folder"),
    (["preprocess", "--datadir", "{city}", "--out", "{tmp}/o", "--mapping", "trainids"],
     "mapping 'trainids': not one of trainid, seed4 and no such file"),
    (["preprocess", "--datadir", "{city}", "--out", "{shards}", "--size", "32x16"],
     "holds shards of another config"),
    (["inspect-shard", "{png}"], "not a readable HDF5 file"),
    (["verify", "{tmp}/nowhere"], "nowhere: no such data folder"),
    (["verify", "{city}"], "a Cityscapes tree (leftImg8bit/, gtFine/), not shards"),
    (["inspect-shard", "{shards}"], "a folder; a shard is one {split}-00000.h5 file in it"),
    (["preprocess", "--datadir", "{shards}", "--out", "{tmp}/o"], "holds shards (manifest.json"),
    (["preprocess", "--datadir", "{city}", "--out", "{city}"], "is inside the Cityscapes tree"),
    (["synth", "{tmp}/s", "--size", "8x4"], "too small"),
])
def test_errors_are_one_line_without_traceback(made, tmp_path, args, message):
    city, out = made
    png = sorted(city.glob("leftImg8bit/*/*/*.png"))[0]
    args = [a.format(tmp=tmp_path, city=city, shards=out, png=png) for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and message in lines[0], r.output


@pytest.mark.parametrize("option", [["--size", "1024"], ["--part", "3/2"], ["--part", "x"],
                                    ["--compression", "zstd"], ["--workers", "0"]])
def test_bad_options_are_usage_errors(made, tmp_path, option):
    city, _ = made
    r = CliRunner().invoke(main, ["preprocess", "--datadir", str(city), "--out",
                                  str(tmp_path / "o"), *option])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, flags", [
    ("synth", ["--train", "--val", "--test", "--size", "--seed", "--coarse", "--extra"]),
    ("preprocess", ["--datadir", "--out", "--split", "--size", "--mapping", "--workers",
                    "--shard-size", "--compression", "--part", "--mode", "official zips"]),
    ("inspect-shard", ["--json", "--preview"]),
    ("verify", ["DIR"]),
    ("bench", ["--out", "--frames", "--workers"]),
    ("bench-archives", ["--out", "--frames", "--workers", "--repeat"]),
])
def test_help(command, flags):
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0
    for flag in flags:
        assert flag in r.output


def test_runs_as_a_module():
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "preprocess" in r.stdout, r.stderr
