"""One size rule across the commands: an image's --size is WxH, a crop or window HxW, a file
names the sides; a size turned on its side is refused naming both orders."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from pipeline import sizes
from pipeline.cli import main as cityprep
from train.checkpoint import load_checkpoint
from train.cli import main as citytrain

FIT = ["--epochs", "1", "--batch-size", "2", "--crop", "32x64", "--width", "4", "--depth", "2",
       "--amp", "off", "--workers", "0", "--device", "cpu", "--no-progress"]


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("sizes") / "run"
    result = invoke(citytrain, "fit", "--data", shards, "--out", out, *FIT)
    assert result.exit_code == 0, result.output
    return out


def test_parse_text_and_files_agree_on_one_order():
    assert sizes.parse("1024x512", "WxH") == sizes.parse("512x1024", "HxW") == (512, 1024)
    assert sizes.text((512, 1024), "WxH") == "1024x512"
    assert sizes.to_file((512, 1024)) == {"height": 512, "width": 1024}
    assert sizes.from_file({"height": 512, "width": 1024}) == (512, 1024)
    assert sizes.from_file([1024, 512]) == (512, 1024)  # a file from before sizes had names


def test_a_size_on_its_side_is_refused_naming_both_orders():
    sizes.check_aspect("--crop", (512, 512), "HxW", (512, 1024), "the shards")  # square: fine
    sizes.check_aspect("--crop", (256, 512), "HxW", (512, 1024), "the shards")
    with pytest.raises(ValueError) as e:
        sizes.check_aspect("--size", (1024, 512), "WxH", (512, 1024), "the images")
    assert str(e.value) == (
        "--size 512x1024 is portrait but the images are landscape (1024x512 (WxH), 512x1024 "
        "(HxW)); --size is WxH (the sides typed the other way round?): did you mean --size "
        "1024x512?")


def test_preprocess_refuses_portrait_shards_of_landscape_images(city, tmp_path):
    r = invoke(cityprep, "preprocess", "--datadir", city, "--out", tmp_path / "o", "--size",
               "64x128", "--workers", "1", "--quiet")
    assert r.exit_code == 1, r.output
    assert "--size 64x128 is portrait but the images of" in r.output
    assert "landscape (256x128 (WxH), 128x256 (HxW))" in r.output
    assert "did you mean --size 128x64?" in r.output
    assert not (tmp_path / "o").exists()


def test_preprocess_says_when_it_upsamples(city, tmp_path):
    r = invoke(cityprep, "preprocess", "--datadir", city, "--out", tmp_path / "o", "--size",
               "512x256", "--split", "val", "--workers", "1", "--quiet")
    assert r.exit_code == 0, r.output
    assert ("note: --size 512x256 is larger than the images of" in r.output
            and "(256x128, WxH): they are upsampled" in r.output)
    r = invoke(cityprep, "preprocess", "--datadir", city, "--out", tmp_path / "small",
               "--size", "128x64", "--split", "val", "--workers", "1", "--quiet")
    assert r.exit_code == 0 and "upsampled" not in r.output


@pytest.mark.slow
def test_every_file_names_the_sides(run, shards):
    named = {"height": 64, "width": 128}
    assert json.loads((shards / "manifest.json").read_text())["config"]["size"] == named
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["crop"] == {"height": 32, "width": 64}
    assert config["data"]["manifest_config"]["size"] == named
    assert load_checkpoint(run / "checkpoints" / "last.pt")["size"] == named
    metrics = json.loads((run / "eval-val" / "metrics.json").read_text())
    assert metrics["inference"]["model_size"] == named


def test_a_folder_of_unnamed_sizes_still_resumes(city, shards, tmp_path):
    """Shards written before sizes had names hold [W, H]: read, and the same config."""
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["config"]["size"] = [128, 64]
    (old / "manifest.json").write_text(json.dumps(manifest))
    r = invoke(cityprep, "preprocess", "--datadir", city, "--out", old, "--size", "128x64",
               "--shard-size", "4", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "0 shard(s) written" in r.output


def test_fit_refuses_a_crop_on_its_side(shards, tmp_path):
    r = invoke(citytrain, "fit", "--data", shards, "--out", tmp_path / "r", *FIT[:4],
               "--crop", "64x32", *FIT[6:])
    assert r.exit_code == 1, r.output
    assert "--crop 64x32 is portrait but the shards of" in r.output
    assert "(128x64 (WxH), 64x128 (HxW)); --crop is HxW" in r.output
    assert "did you mean --crop 32x64?" in r.output
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_predict_refuses_a_size_on_its_side(run, city, tmp_path):
    image = sorted((city / "leftImg8bit" / "val").rglob("*.png"))[0]
    r = invoke(citytrain, "predict", "--checkpoint", run / "checkpoints" / "last.pt",
               "--input", image, "--out", tmp_path / "p", "--size", "64x128", "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert "--size 64x128 is portrait but the shards" in r.output
    assert "did you mean --size 128x64?" in r.output
    assert not (tmp_path / "p").exists()


def test_bench_inference_takes_an_image_size_wxh(tmp_path):
    r = invoke(citytrain, "bench-inference", "--size", "128x64", "--window", "32x64",
               "--images", "1", "--warmup", "0", "--width", "4", "--depth", "2", "--scales",
               "1.0", "--device", "cpu", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    assert "inference on 128x64 (WxH)" in r.output and "window 32x64" in r.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["size"] == {"height": 64, "width": 128}
    assert report["rows"][1]["inference"]["window"] == {"height": 32, "width": 64}


@pytest.mark.parametrize("cli, command, option, order", [
    (cityprep, "synth", "--size", "WxH"), (cityprep, "preprocess", "--size", "WxH"),
    (citytrain, "predict", "--size", "WxH"), (citytrain, "models", "--size", "WxH"),
    (citytrain, "bench-inference", "--size", "WxH"), (citytrain, "fit", "--crop", "HxW"),
    (citytrain, "fit", "--eval-window", "HxW"), (citytrain, "evaluate", "--window", "HxW"),
    (citytrain, "bench", "--crop", "HxW"), (citytrain, "bench-inference", "--window", "HxW"),
])
def test_help_names_each_sizes_order(cli, command, option, order):
    r = invoke(cli, command, "--help")
    line = next(ln for ln in r.output.splitlines() if ln.strip().startswith(option + " "))
    assert order in line and ({"WxH", "HxW"} - {order}).pop() not in line, line
