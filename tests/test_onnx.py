"""ONNX export (parity through onnxruntime, argmax output, metadata, refusals) and
`predict --model`, which must give what the checkpoint gives."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import fit_briefly, write_checkpoint
from PIL import Image
from torch import nn

from pipeline.labels import get_mapping
from pipeline.photometric import normalize
from pipeline.synth import render_frame
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.cli import main
from train.losses import build_loss
from train.onnx_export import ExportError, export_onnx
from train.onnx_runtime import OnnxError, open_session, read_metadata, require

NUM_CLASSES = get_mapping("trainid").num_classes


def pretrained_style_model() -> nn.Module:
    """An ImageNet-style encoder under the U-Net decoder, random weights."""
    from train.models import build_model

    return build_model("resnet18", NUM_CLASSES, weights="none")


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    return write_checkpoint(tmp_path_factory.mktemp("enc") / "encoder.pt",
                            fit_briefly(pretrained_style_model(), seed=1))


def frames(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """Synthetic street frames, uint8 (n, H, W, 3): real structure, not noise."""
    return np.stack([render_frame(shape, np.random.default_rng([seed, i]))[0]
                     for i in range(n)])


def pytorch_outputs(checkpoint, images: np.ndarray) -> torch.Tensor:
    """What `citytrain predict` computes: the loader's normalization, the model's logits."""
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint)
    with torch.inference_mode():
        return model(normalize(images, state["mean"], state["std"]))


def export(checkpoint, out, *args) -> str:
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(checkpoint), "--format",
                                       "onnx", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return result.output


def no_temporaries(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["unet_checkpoint", "encoder_checkpoint"])
def test_export_matches_pytorch_at_two_sizes(which, request, tmp_path):
    checkpoint = request.getfixturevalue(which)
    out = tmp_path / "model.onnx"
    printed = export(checkpoint, out)
    assert "max |logit diff|" in printed and "parity passed" in printed
    assert "128x64 x2" in printed and "99x49 x1" in printed  # the training size and an odd one
    assert no_temporaries(tmp_path)
    session = open_session(out, "cpu")
    loss = build_loss("segment", palette=get_mapping("trainid").palette)
    # sizes the export's own check did not use: any batch and size, padding inside
    for shape, n in (((64, 128), 3), ((37, 83), 1)):
        images = frames(shape, n, seed=5)
        got = torch.from_numpy(session.run(None, {"image": images})[0])
        want = pytorch_outputs(checkpoint, images)
        assert got.shape == (n, NUM_CLASSES, *shape)
        assert (got - want).abs().max() <= 1e-3
        assert (loss.predict(got) == loss.predict(want)).double().mean() >= 0.9999


@pytest.mark.slow
def test_argmax_output_is_pytorchs_prediction(unet_checkpoint, tmp_path):
    out = tmp_path / "classes.onnx"
    printed = export(unet_checkpoint, out, "--argmax")
    assert "classes" in printed and "parity passed" in printed
    images = frames((45, 70), 2, seed=7)
    got = open_session(out, "cpu").run(None, {"image": images})[0]
    assert got.dtype == np.uint8 and got.shape == (2, 45, 70)
    want = pytorch_outputs(unet_checkpoint, images).argmax(1).numpy()
    assert (got == want).mean() >= 0.9999
    assert len(np.unique(got)) > 1  # a real prediction, not one class everywhere


@pytest.mark.slow
def test_metadata_and_input_format_read_back(unet_checkpoint, tmp_path):
    out = tmp_path / "model.onnx"
    export(unet_checkpoint, out)
    state = load_checkpoint(unet_checkpoint)
    meta = read_metadata(out)
    assert meta["classes"] == state["classes"]
    assert meta["palette"] == state["palette"]
    assert meta["mapping"] == state["mapping"]
    assert (meta["mean"], meta["std"], meta["size"]) == (state["mean"], state["std"],
                                                         {"height": 64, "width": 128})
    assert (meta["input_layout"], meta["input_dtype"], meta["output"]) == \
        ("NHWC", "uint8", "logits")
    assert "NHWC" in meta["input_format"]
    session = open_session(out, "cpu")
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("image", "tensor(uint8)",
                                               ["batch", "height", "width", 3])
    assert outp.name == "logits" and outp.shape[1] == NUM_CLASSES


@torch.library.custom_op("citytest::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mysterious(nn.Module):
    """A model with an op that has no ONNX form."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, NUM_CLASSES, 1)

    def forward(self, x):
        return self.head(mystery(x))


class Drifting(nn.Module):
    """A model whose eager outputs move after the export traced it: parity must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.head, self.calls = nn.Conv2d(3, NUM_CLASSES, 1), 0

    def forward(self, x):
        self.calls += 1
        return self.head(x) + 0.01 * self.calls


@pytest.mark.parametrize("model, message", [
    (Mysterious, "uses citytest.mystery, which has no ONNX form"),
    (Drifting, "does not match PyTorch"),
])
def test_refusals_name_the_cause_and_write_nothing(model, message, unet_checkpoint, tmp_path,
                                                   monkeypatch):
    monkeypatch.setattr("train.onnx_export.model_from_checkpoint",
                        lambda state, path, device: model().eval())
    printed = []
    with pytest.raises(ExportError, match=message):
        export_onnx(unet_checkpoint, tmp_path / "model.onnx", echo=printed.append)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary
    if model is Drifting:
        assert "FAILED" in printed[0]


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(OnnxError, match=r"onnxruntime is not installed: pip install .*deploy"):
        require("onnxruntime")


def test_an_onnx_file_of_elsewhere_is_refused(tmp_path):
    onnx = require("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(OnnxError, match="other.onnx: not exported by citytrain export"):
        read_metadata(path)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(OnnxError, match="bad.onnx: not a readable ONNX model"):
        open_session(tmp_path / "bad.onnx", "cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Images of other sizes than the training one: predict resizes them and back."""
    root = tmp_path_factory.mktemp("photos")
    for i, shape in enumerate([(96, 160), (70, 150)]):
        Image.fromarray(frames(shape, 1, seed=20 + i)[0]).save(root / f"p{i}.png")
    return root


def predict(tmp_path, name, *args):
    out = tmp_path / name
    result = CliRunner().invoke(main, ["predict", *args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return {p.relative_to(out): np.asarray(Image.open(p)) for p in sorted(out.rglob("*.png"))}


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], ["--mode", "slide", "--window", "48x96", "--flip"]])
def test_predict_with_onnx_gives_the_checkpoints_pictures(options, unet_checkpoint, photos,
                                                          tmp_path):
    model = tmp_path / "model.onnx"
    export(unet_checkpoint, model)
    ours = predict(tmp_path, "ckpt", "--checkpoint", str(unet_checkpoint), "--input",
                   str(photos), *options)
    onnx = predict(tmp_path, "onnx", "--model", str(model), "--input", str(photos), *options)
    assert list(ours) == list(onnx) and len(ours) == 4  # a mask and an overlay per image
    for name in ours:
        same = (ours[name] == onnx[name]).all(-1).mean()
        assert same >= 0.9999, name


@pytest.mark.slow
def test_predict_with_argmax_onnx_at_full_size(unet_checkpoint, photos, tmp_path):
    model = tmp_path / "classes.onnx"
    export(unet_checkpoint, model, "--argmax")
    args = ["--input", str(photos), "--size", "full"]
    ours = predict(tmp_path, "ckpt", "--checkpoint", str(unet_checkpoint), *args)
    onnx = predict(tmp_path, "onnx", "--model", str(model), *args)
    for name in ours:
        assert (ours[name] == onnx[name]).all(-1).mean() >= 0.9999, name


@pytest.mark.slow
def test_bench_compares_the_runtimes():
    result = CliRunner().invoke(main, ["bench-inference", "--onnx", "--size", "64x32",
                                       "--width", "4", "--depth", "2", "--images", "1",
                                       "--warmup", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "64x32 (WxH)  PyTorch" in result.output and "onnxruntime" in result.output
    diff = float(result.output.rsplit("max |logit diff| ", 1)[1].split(")")[0])
    assert diff < 1e-4  # both ran the same model
