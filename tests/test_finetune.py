"""Fine-tuning (`citytrain fit --init CKPT`) and training on joined splits (train+train_extra)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import FIT, blocks, fails, tiny

from pipeline.labels import get_mapping
from pipeline.loader import build_loader
from pipeline.shards import ShardError
from train.checkpoint import CheckpointError, init_from_checkpoint, load_checkpoint
from train.cli import main as citytrain
from train.engine import TrainingError
from train.fit import fit
from train.models.plain import UNet


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from helpers import write_dataset

    images, labels, names = blocks(12)
    return write_dataset(tmp_path_factory.mktemp("blocks") / "data", {
        "train": (images[:8], labels[:8], names[:8]), "val": (images[8:], labels[8:], names[8:])})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A run trained well enough that a fresh model scores far below it."""
    out = tmp_path_factory.mktemp("runs") / "coarse"
    row = fit(tiny(data, out, epochs=25, optimizer="adamw", lr=3e-2, eval_every=25))
    return out / "checkpoints" / "last.pt", row


@pytest.mark.slow
def test_at_a_tiny_lr_the_first_evaluation_equals_the_checkpoints(data, trained, tmp_path):
    # BatchNorm's running statistics move in every training step, whatever the LR, so the
    # checkpoint to compare with first has them settled: 40 steps at LR ~0 on the same batch
    # (all 8 samples, no augmentation) leave 0.9**40 = 1.5% of the way to go.
    ckpt, _ = trained
    settled = tmp_path / "settled"
    row = fit(tiny(data, settled, epochs=40, lr=1e-12, batch_size=8, eval_every=40,
                   init=str(ckpt)))
    ckpt = settled / "checkpoints" / "last.pt"
    tuned = fit(tiny(data, tmp_path / "tuned", epochs=1, lr=1e-12, batch_size=8,
                     init=str(ckpt)))
    assert tuned["val_miou"] == pytest.approx(row["val_miou"], abs=1e-9)
    assert tuned["val_loss"] == pytest.approx(row["val_loss"], rel=1e-4)
    fresh = fit(tiny(data, tmp_path / "fresh", epochs=1, lr=1e-12, batch_size=8))
    assert fresh["val_miou"] < row["val_miou"] - 0.3  # so the equality above means something

    state = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 1)  # its own count, not the checkpoint's
    assert state["scheduler"]["total_steps"] == 1
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["config"]["init"] == str(ckpt) and config["config"]["init_head"] == "keep"
    assert config["init"]["checkpoint"] == str(ckpt)
    assert (config["init"]["epoch"], config["init"]["step"]) == (40, 40)
    assert config["init"]["metrics"]["val_miou"] == row["val_miou"]


def test_another_architecture_or_class_set_is_refused_naming_both(data, trained, tmp_path,
                                                                  make_dataset):
    ckpt, _ = trained
    with pytest.raises(CheckpointError, match=rf"^{ckpt}: checkpoint is another architecture "
                                              r"\(width=8\); this run builds width=16$"):
        fit(tiny(data, tmp_path / "wide", epochs=1, width=16, init=str(ckpt)))
    images, labels, names = blocks(4)
    seed4 = make_dataset({"train": (images, labels % 4, names)}, mapping="seed4")
    with pytest.raises(CheckpointError, match=rf"^{ckpt}: checkpoint predicts 19 classes "
                                              r"\(road, sidewalk, building, wall, fence, \.\.\.\) "
                                              rf"but {seed4} has 4 \(background, road, sky, car\); "
                                              "or --init-head reset to start the last layer "
                                              "afresh$"):
        fit(tiny(seed4, tmp_path / "seed4", epochs=1, init=str(ckpt)))
    assert not (tmp_path / "wide").exists() and not (tmp_path / "seed4").exists()
    with pytest.raises(TrainingError, match="^--init and --resume together"):
        fit(tiny(data, tmp_path / "both", init=str(ckpt), resume=True))


def test_init_head_reset_keeps_every_weight_but_the_last_layer(trained):
    ckpt, _ = trained
    saved = load_checkpoint(ckpt)["model"]
    torch.manual_seed(0)
    model = UNet(4, width=8, depth=2)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    info = init_from_checkpoint(model, ckpt, classes=get_mapping("seed4").classes,
                                losstype="segment", head="reset")
    assert info["head"] == "reset" and len(info["classes"]) == 19
    for key, value in model.state_dict().items():
        want = head[key] if key.startswith("head.") else saved[key]
        assert torch.equal(value, want), key
    with pytest.raises(CheckpointError, match=r"another architecture \(depth=2\); this run "
                                              r"builds depth=3$"):
        init_from_checkpoint(UNet(4, width=8, depth=3), ckpt, classes=["a"] * 4,
                             losstype="segment", head="reset")


def test_joined_splits_train_on_both(make_dataset, tmp_path):
    images, labels, names = blocks(10)
    data = make_dataset({"train": (images[:4], labels[:4], names[:4]),
                         "train_extra": (images[4:], labels[4:], names[4:])})
    loader = build_loader(data, "train+train_extra", 2, train=False, workers=0, backend="torch")
    assert loader.num_samples == 10
    seen = torch.cat([b["image"] for b in loader])
    assert len(seen) == 10
    with pytest.raises(ShardError, match=r"manifest.json: no split 'extra' \(has: train, "
                                         r"train_extra\)$"):
        build_loader(data, "train+extra", 2, train=False, workers=0, backend="torch")
    fit(tiny(data, tmp_path / "run", epochs=1, train_split="train+train_extra", batch_size=2))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["steps_per_epoch"] == 5 and config["config"]["train_split"] == \
        "train+train_extra"


@pytest.mark.slow
def test_cli_init_flags(data, trained, tmp_path, make_dataset):
    ckpt, _ = trained
    out = fails("fit", "--data", data, "--out", tmp_path / "r", *FIT, "--init", ckpt, "--resume")
    assert "Error: --init and --resume together" in out
    images, labels, names = blocks(4)
    seed4 = make_dataset({"train": (images, labels % 4, names)}, mapping="seed4")
    args = [a if a != "4" else "8" for a in FIT]  # the checkpoint's --width 8
    out = fails("fit", "--data", seed4, "--out", tmp_path / "r", *args, "--init", ckpt)
    assert "predicts 19 classes" in out and "--init-head reset" in out
    result = CliRunner().invoke(citytrain, [str(a) for a in (
        "fit", "--data", seed4, "--out", tmp_path / "r", *args, "--init", ckpt,
        "--init-head", "reset")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["init"]["head"] == "reset" and config["classes"] == get_mapping("seed4").classes
