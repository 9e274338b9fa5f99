"""What the commands say: errors that point the right way, one error prefix, the end and every
stop of a run said out loud, logs that read in a file."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main as cityprep
from train.cli import main as citytrain

FIT = ["--batch-size", "2", "--crop", "32x64", "--width", "4", "--depth", "2", "--amp", "off",
       "--workers", "0", "--device", "cpu", "--no-progress"]


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def fails(cli, *args, code: int = 1) -> str:
    """A command that must fail with one `Error:` line and no traceback; returns that line."""
    r = invoke(cli, *args)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, r.output
    return errors[0]


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("messages") / "run"
    result = invoke(citytrain, "fit", "--data", shards, "--out", out, "--epochs", "2", *FIT)
    assert result.exit_code == 0, result.output
    return out


# -- errors that point the right way ----------------------------------------------------------

def test_a_cityscapes_tree_given_as_data_names_the_preprocess_to_run(run, city, tmp_path):
    line = fails(citytrain, "fit", "--data", city, "--out", tmp_path / "r", "--epochs", "1",
                 *FIT)
    assert line == (f"Error: {city}: a Cityscapes tree (leftImg8bit/, gtFine/), not shards; "
                    f"make shards from it with `cityprep preprocess --datadir {city} --out "
                    "data_cache/cityscapes-1024x512` and use data_cache/cityscapes-1024x512 "
                    "instead")
    assert not (tmp_path / "r").exists()
    assert "a Cityscapes tree" in fails(cityprep, "verify", city)
    assert "a Cityscapes tree" in fails(citytrain, "evaluate", "--checkpoint",
                                        run / "checkpoints" / "last.pt", "--data", city)


def test_shards_given_as_datadir_say_to_pass_them_as_data(run, shards, tmp_path):
    expected = (f"{shards}: holds shards (manifest.json from `cityprep preprocess`), not the "
                f"Cityscapes originals: shards go to citytrain as --data {shards}")
    line = fails(citytrain, "evaluate", "--checkpoint", run / "checkpoints" / "last.pt",
                 "--datadir", shards, "--device", "cpu")
    assert expected in line and "--submit" not in line
    assert expected in fails(cityprep, "preprocess", "--datadir", shards, "--out", tmp_path / "o")


def test_other_confusable_inputs(run, shards, tmp_path):
    assert "a file, not a shard folder; pass its folder" in fails(
        citytrain, "fit", "--data", shards / "train-00000.h5", "--out", tmp_path / "r", *FIT)
    assert f"--out {shards} holds shards (manifest.json): a run needs a folder of its own" in \
        fails(citytrain, "fit", "--data", shards, "--out", shards, "--epochs", "1", *FIT)
    assert not (shards / "checkpoints").exists()
    assert "holds shards, not images: predict reads image files" in fails(
        citytrain, "predict", "--checkpoint", run / "checkpoints" / "last.pt", "--input",
        shards, "--out", tmp_path / "p", "--device", "cpu")
    assert "a folder; a shard is one {split}-00000.h5 file in it" in fails(
        cityprep, "inspect-shard", shards)


def test_both_clis_print_one_error_prefix(tmp_path):
    assert fails(cityprep, "verify", tmp_path / "nowhere").startswith("Error: ")
    assert fails(citytrain, "fit", "--data", tmp_path / "nowhere", "--out", tmp_path / "r",
                 *FIT).startswith("Error: ")
    # click's own usage errors read the same
    assert fails(cityprep, "preprocess", "--bogus", code=2).startswith("Error: ")
    assert fails(citytrain, "fit", "--bogus", code=2).startswith("Error: ")
