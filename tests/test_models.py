"""The model registry and torchvision's encoders: every model builds for any size and
round-trips through evaluate and predict; weights arrive as torchvision's API gives them (a
state dict file, the hub cache, a failed download); pretrained normalization is used,
recorded and reused; a ResNet-18 from scratch learns; a model registered here trains."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from helpers import tiny
from PIL import Image
from torch import nn

from train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from train.cli import main as citytrain
from train.config import Config
from train.fit import fit
from train.losses import build_loss
from train.models import (
    ModelError,
    WeightsError,
    build_model,
    list_models,
    model_from_config,
    register_model,
    registry,
)
from train.predict import predict_image

ENCODERS = [name for name in list_models() if name != "plain"]
SMALL = {"decoder": (16, 8, 8, 8, 8)}  # a light decoder: these tests are about the encoders
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def small(name: str) -> dict:
    return {"width": 4, "depth": 2} if name == "plain" else SMALL


def run(*args, code: int = 0) -> str:
    result = CliRunner().invoke(citytrain, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def test_the_issue_s_encoders_are_registered():
    for name in ["plain", "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d",
                 "convnext_tiny", "convnext_small", "efficientnet_v2_s"]:
        assert name in list_models()
    assert any(name.startswith("regnet_y") for name in list_models())


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_model_gives_logits_at_the_inputs_size(name):
    torch.manual_seed(0)
    model = build_model(name, 5, **small(name))
    for hw in [(37, 53), (64, 96)]:
        assert model(torch.randn(2, 3, *hw)).shape == (2, 5, *hw)
    assert model.state_dict()["head.weight"].shape[0] == 5  # the last layer is head.*
    assert 64 % model.size_multiple == 0
    # the config is what checkpoints store: it rebuilds the same architecture
    clone = build_model(**json.loads(json.dumps(model.config)))
    assert {k: v.shape for k, v in clone.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    if name != "plain":  # torchvision's own names under encoder.: its state dicts load as is
        backbone = torchvision.models.get_model(name, weights=None).state_dict()
        mine = {k.removeprefix("encoder."): v.shape for k, v in model.state_dict().items()
                if k.startswith("encoder.")}
        assert mine and all(backbone[k].shape == shape for k, shape in mine.items())


def test_a_name_twice_or_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        register_model("resnet18")(lambda num_classes: None)
    with pytest.raises(ModelError, match="no model named 'resnet19'; the registered ones are "
                                         "plain, resnet18, "):
        build_model("resnet19", 3)
    with pytest.raises(ModelError, match="--width: not a setting of the resnet18 model"):
        model_from_config(Config(encoder="resnet18", width=16), 3, pretrained=False)
    with pytest.raises(ModelError, match="--weights: not a setting of the plain model"):
        model_from_config(Config(weights="none"), 3)


@pytest.fixture(scope="module")
def resnet18_run(shards, tmp_path_factory):
    """A ResNet-18 U-Net trained from scratch (--weights none) on the synthetic city."""
    out = tmp_path_factory.mktemp("runs") / "resnet18"
    row = fit(tiny(shards, out, encoder="resnet18", weights="none", width=64, depth=4,
                   decoder=(64, 32, 16, 16, 16), epochs=12, batch_size=3, optimizer="adamw",
                   lr=3e-3, eval_every=12))
    return out, row


@pytest.mark.slow
def test_a_resnet18_from_scratch_learns_the_synthetic_city(resnet18_run, shards):
    out, row = resnet18_run
    labels = np.concatenate([h5py.File(p)["label"][:] for p in sorted(shards.glob("val-*.h5"))])
    counts = np.bincount(labels[labels != 255], minlength=19)
    # chance: every pixel the most common class, whose IoU is its pixel share
    chance = counts.max() / counts.sum() / np.count_nonzero(counts)
    assert row["val_miou"] > 3 * chance, (row["val_miou"], chance)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["arch"] == {"encoder": "resnet18", "num_classes": 19,
                             "decoder": [64, 32, 16, 16, 16]}
    assert state["normalization"] == "dataset"  # from scratch: the shards' own statistics
    manifest = json.loads((shards / "manifest.json").read_text())
    assert state["mean"] == pytest.approx(manifest["mean"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_a_checkpoint_of_every_model_round_trips_through_evaluate_and_predict(
        name, resnet18_run, shards, tmp_path):
    out, _ = resnet18_run
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    torch.manual_seed(0)
    model = build_model(name, 19, **small(name)).eval()
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, {**{k: v for k, v in state.items() if k not in ("format",
                                                                          "format_version")},
                           "model": model.state_dict(), "arch": model.config})
    run("evaluate", "--checkpoint", ckpt, "--data", shards, "--out", tmp_path / "eval",
        "--device", "cpu", "--workers", "0")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 4 and 0 <= metrics["miou"] <= 1
    assert_predicts_as(model, state, ckpt, shards, tmp_path)


def assert_predicts_as(model: nn.Module, state: dict, ckpt: Path, shards: Path,
                       tmp_path: Path) -> None:
    """`citytrain predict --checkpoint ckpt` colours a val image as `model` predicts it,
    normalized with the checkpoint's mean/std."""
    rgb = h5py.File(sorted(shards.glob("val-*.h5"))[0])["image"][0]
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    run("predict", "--checkpoint", ckpt, "--input", tmp_path / "photo.png", "--out",
        tmp_path / "pred", "--device", "cpu")
    mask = np.asarray(Image.open(tmp_path / "pred" / "photo_mask.png").convert("RGB"))
    loss = build_loss(state["losstype"], palette=state["palette"])
    want = predict_image(model.eval(), rgb, mean=state["mean"], std=state["std"], loss=loss,
                         device="cpu", size=rgb.shape[:2])
    assert np.array_equal(mask, np.asarray(state["palette"], np.uint8)[want])


@pytest.fixture
def resnet18_file(tmp_path) -> tuple[Path, dict]:
    """A torchvision ResNet-18 state dict, as a user would save one (random weights here:
    nothing is downloaded in tests)."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-mine.pth"
    torch.save(state, path)
    return path, state


def _encoder_equals(model: nn.Module, state: dict) -> None:
    mine = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):  # the classifier is not part of the encoder
            assert torch.equal(mine["encoder." + key], value), key


def test_weights_from_a_state_dict_file_are_the_files_tensors(resnet18_file):
    path, state = resnet18_file
    model = build_model("resnet18", 19, weights=str(path), **SMALL)
    _encoder_equals(model, state)
    assert model.normalization == {"weights": str(path), "mean": IMAGENET[0],
                                   "std": IMAGENET[1]}


def test_a_state_dict_that_does_not_fit_names_the_keys(resnet18_file, tmp_path):
    path, state = resnet18_file
    bad = {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}
    bad["neck.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"bad.pth: weights do not fit ResNet: missing keys "
                                           r"layer1.0.conv1.weight; unexpected keys neck.weight"):
        build_model("resnet18", 19, weights=str(tmp_path / "bad.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(WeightsError, match="text.pth: not a torch.save file"):
        build_model("resnet18", 19, weights=str(tmp_path / "text.pth"))


def test_imagenet_weights_are_fetched_into_the_hub_cache_once(resnet18_file, tmp_path,
                                                              monkeypatch):
    path, state = resnet18_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fetched = []

    def download(url, dst, hash_prefix=None, progress=True):  # torchvision's download, offline
        fetched.append(url)
        Path(dst).write_bytes(path.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    model = build_model("resnet18", 19, weights="imagenet", **SMALL)
    _encoder_equals(model, state)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert cached.is_file() and fetched == [torchvision.models.ResNet18_Weights.DEFAULT.url]
    assert model.normalization["mean"] == IMAGENET[0]
    build_model("resnet18", 19, weights="imagenet", **SMALL)  # the second time from the cache
    assert len(fetched) == 1


def test_a_failed_download_says_which_file_to_put_where(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = run("fit", "--data", shards, "--out", tmp_path / "run", "--encoder", "resnet18",
              "--device", "cpu", "--workers", "0", code=1)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert "put resnet18-f37072fd.pth (from https://" in out
    assert f"into {folder}/, or pass --weights PATH" in out
    assert "Temporary failure in name resolution" in out
    lines = out.strip().splitlines()  # ours, and torch's "Downloading: ..."
    assert [ln for ln in lines if not ln.startswith("Downloading: ")] == \
        [ln for ln in lines if ln.startswith("Error: cannot fetch the ImageNet weights")]
    assert not (tmp_path / "run").exists()  # nothing written
    assert not list(folder.glob("*")) if folder.exists() else True


@pytest.mark.slow
def test_pretrained_normalization_is_used_recorded_and_reused(resnet18_file, shards, tmp_path):
    path, _ = resnet18_file
    out = tmp_path / "run"
    fit(tiny(shards, out, encoder="resnet18", weights=str(path), width=64, depth=4, epochs=1,
             decoder=SMALL["decoder"], eval_every=1))
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["mean"] == pytest.approx(IMAGENET[0])
    assert state["std"] == pytest.approx(IMAGENET[1])
    assert state["normalization"] == str(path)
    config = json.loads((out / "config.json").read_text())
    assert config["mean"] == pytest.approx(IMAGENET[0]) and config["normalization"] == str(path)
    # --init starts the new run with the checkpoint's normalization, fetching no weights
    tuned = tmp_path / "tuned"
    fit(tiny(shards, tuned, encoder="resnet18", width=64, depth=4, epochs=1,
             decoder=SMALL["decoder"], init=str(out / "checkpoints" / "last.pt")))
    assert load_checkpoint(tuned / "checkpoints" / "last.pt")["mean"] == \
        pytest.approx(IMAGENET[0])
    # predict normalizes as the checkpoint says (ImageNet's mean/std, checked above)
    assert_predicts_as(model_from_checkpoint(state, out / "checkpoints" / "last.pt"), state,
                       out / "checkpoints" / "last.pt", shards, tmp_path)


@pytest.mark.slow
def test_init_from_another_encoder_is_refused_naming_both(resnet18_run, shards, tmp_path):
    out, _ = resnet18_run
    msg = run("fit", "--data", shards, "--out", tmp_path / "run", "--init",
              out / "checkpoints" / "last.pt", "--encoder", "plain", "--width", "8", "--depth",
              "2", "--device", "cpu", "--workers", "0", code=1)
    assert "checkpoint holds a resnet18 model, this run builds plain: pass --encoder " \
           "resnet18" in msg


@pytest.mark.slow
def test_the_encoder_lr_multiplier_scales_the_encoder_s_steps(shards, tmp_path):
    from train.optim import build_optimizer

    model = build_model("resnet18", 19, **SMALL)
    opt = build_optimizer(model, Config(encoder="resnet18", encoder_lr_mult=0.1), fused=False)
    encoder = {id(p) for n, p in model.named_parameters() if n.startswith("encoder.")}
    for group in opt.param_groups:
        inside = {id(p) in encoder for p in group["params"]}
        assert inside == {group["lr_scale"] == 0.1}
    assert opt.param_groups[0]["lr_scale"] == 1.0  # the decoder's LR is the one logged
    with pytest.raises(Exception, match="--encoder-lr-mult: the plain model has no pretrained"):
        build_optimizer(build_model("plain", 3, width=4, depth=1),
                        Config(encoder_lr_mult=0.1), fused=False)
    # in a run, the encoder's LR is the multiple of the schedule's
    out = tmp_path / "run"
    fit(tiny(shards, out, encoder="resnet18", weights="none", width=64, depth=4, epochs=1,
             decoder=SMALL["decoder"], encoder_lr_mult=0.1, warmup=0))
    groups = load_checkpoint(out / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    lrs = {g["lr_scale"]: g["lr"] for g in groups}
    assert lrs[0.1] == pytest.approx(0.1 * lrs[1.0])


class Toy(nn.Module):
    """The smallest model that meets the contract."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.config = {"encoder": "toy", "num_classes": num_classes, "width": width}
        self.size_multiple, self.normalization = 1, None
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.fixture
def toy():
    register_model("toy")(lambda num_classes, *, width=8: Toy(num_classes, width))
    yield
    del registry._BUILDERS["toy"]


@pytest.mark.slow
def test_a_model_registered_here_trains_through_fit_with_no_other_change(toy, shards, tmp_path):
    out = tmp_path / "run"
    row = fit(tiny(shards, out, encoder="toy", width=6, depth=Config().depth, epochs=1))
    assert row["epoch"] == 1 and np.isfinite(row["train_loss"])
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["arch"] == {"encoder": "toy", "num_classes": 19, "width": 6}
    assert state["model"]["body.0.weight"].shape == (6, 3, 3, 3)


@pytest.mark.slow
def test_citytrain_models_lists_each_model_with_its_cost_and_weights(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    import train.models

    monkeypatch.setattr(train.models, "list_models", lambda: ["plain", "resnet18"])
    cards = json.loads(run("models", "--json", "--size", "128x64"))
    assert [c["name"] for c in cards] == ["plain", "resnet18"]
    plain, resnet = cards
    assert plain["weights"] is None and plain["mean"] is None
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert resnet["weights"] == str(weights)
    assert resnet["top1"] == weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert (resnet["mean"], resnet["std"]) == (IMAGENET[0], IMAGENET[1])
    model = build_model("resnet18", 19).eval()
    assert resnet["params_m"] == sum(p.numel() for p in model.parameters()) / 1e6
    # counted on the meta device: the same count as a real forward pass at 64x128
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 64, 128))
    assert resnet["gflops"] == pytest.approx(counter.get_total_flops() / 1e9)
    assert "resnet18" in run("models", "--size", "128x64")
