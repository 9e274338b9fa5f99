"""`citytrain export --format onnx`: a checkpoint's model as one ONNX file, checked before use.

The file takes what a camera or an image library hands out and returns what a user needs:

    input  "image"    uint8 RGB, NHWC (batch, height, width, 3), values 0-255; any batch,
                      height and width: the normalization (the checkpoint's mean/std, the
                      formula of pipeline/photometric.py) and the model's padding are inside
    output "logits"   float32 (batch, C, height, width), the model's outputs at the input's size
           "classes"  with --argmax: uint8 (batch, height, width), the training class ids
                      (trainIds for the trainid mapping), as PixelLoss.predict reads the outputs

The graph comes from torch.export through torch.onnx (no hand-written graph): one trace with
symbolic batch, height and width, which is why a model's forward must not branch in Python on
the input's size (torch.export would fix the branch taken for the example; the U-Net pads
by zero rather than not at all). An op without an ONNX form is refused naming the op.

Before the file exists under its name it is checked: written under a temporary name, opened
with onnxruntime (CPU) and run on synthetic street frames at the training size (batch 2) and
at an odd size (batch 1, so the padding inside is exercised); the largest absolute logit
difference to PyTorch and the share of pixels whose class differs are printed, and over the
tolerance (fp32: 1e-3, at least 99.99 % identical pixels) the temporary file is removed and
the export fails. With --argmax the logits graph is exported and checked as well, since the
classes file has no logits to compare.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import sizes
from pipeline.files import tmp_path_for
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.losses import PixelLoss, build_loss
from train.onnx_runtime import FORMAT, FORMAT_VERSION, OnnxError, open_session, require

INPUT_FORMAT = "uint8 RGB NHWC (batch, height, width, 3), 0-255, any batch/height/width; " \
               "normalization and padding inside"
ATOL, MIN_IDENTICAL = 1e-3, 0.9999  # the fp32 tolerance


class ExportError(OnnxError):
    """A model that cannot be exported, or whose export does not match PyTorch."""


class Deployable(nn.Module):
    """uint8 RGB NHWC -> the model's outputs, or with `loss` its classes as uint8.

    The normalization is photometric.Normalizer's, x * (1 / (255 std)) - mean / std in fp32,
    so the file sees exactly the numbers `citytrain predict` feeds the model.
    """

    def __init__(self, model: nn.Module, mean, std, loss: PixelLoss | None = None) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.register_buffer("scale", torch.tensor([1 / (255 * v) for v in std]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([m / v for m, v in zip(mean, std)])
                             .view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() * self.scale - self.shift
        out = self.model(x)
        return out if self.loss is None else self.loss.predict(out).to(torch.uint8)


@dataclass
class Parity:
    """What the check measured, per checked batch and overall."""

    rows: list[dict] = field(default_factory=list)  # size [H, W], batch, max_abs, differing
    atol: float = ATOL
    min_identical: float = MIN_IDENTICAL

    @property
    def max_abs(self) -> float | None:
        values = [r["max_abs"] for r in self.rows if r["max_abs"] is not None]
        return max(values) if values else None

    @property
    def differing(self) -> float:
        """Share of all checked pixels whose class differs (the worst output's)."""
        return max(r["differing"] for r in self.rows)

    @property
    def passed(self) -> bool:
        return (self.max_abs is None or self.max_abs <= self.atol) and \
            1 - self.differing >= self.min_identical

    def report(self) -> str:
        lines = []
        for r in self.rows:
            logit = "" if r["max_abs"] is None else f"max |logit diff| {r['max_abs']:.2e}, "
            lines.append(f"  {r['output']:<7} {sizes.text(r['size'], 'WxH'):>9} x{r['batch']}: "
                         f"{logit}{r['differing']:.4%} of pixels differ")
        verdict = "passed" if self.passed else "FAILED"
        lines.append(f"  parity {verdict} (tolerance: logits within {self.atol:g}, at least "
                     f"{self.min_identical:.2%} of pixels identical)")
        return "\n".join(lines)


def check_images(size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Batches for the check: 2 synthetic street frames at `size` (H, W), 1 at an odd size
    near it (so the padding inside the graph is exercised), uint8 (N, H, W, 3)."""
    from pipeline.synth import render_frame

    h, w = size
    odd = (max(17, h - h // 4) | 1, max(33, w - w // 4 + 2) | 1)
    batches = []
    for k, (shape, n) in enumerate(((size, 2), (odd, 1))):
        frames = [render_frame(shape, np.random.default_rng([seed, k, i]))[0] for i in range(n)]
        batches.append(np.stack(frames))
    return batches


def metadata(state: dict, checkpoint: Path, output: str) -> dict[str, str]:
    """The file's metadata_props: everything needed to use it without the checkpoint."""
    values = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "input": "image", "input_format": INPUT_FORMAT, "input_layout": "NHWC",
        "input_dtype": "uint8", "output": output,
        "classes": list(state["classes"]), "palette": np.asarray(state["palette"]).tolist(),
        "mapping": state.get("mapping"), "ignore_index": state.get("ignore_index", 255),
        "mean": list(state["mean"]), "std": list(state["std"]), "losstype": state["losstype"],
        "size": sizes.to_file(sizes.from_file(state["size"])), "arch": state.get("arch"),
        "checkpoint": Path(checkpoint).name, "epoch": state.get("epoch"),
        "step": state.get("step"),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


_OP = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'")


def _unsupported_op(error: BaseException) -> str | None:
    """The op torch.onnx found no ONNX function for, from the error or its causes."""
    seen = 0
    while error is not None and seen < 10:
        match = _OP.search(str(error))
        if match:
            return match.group(1) if match.group(2) == "default" else ".".join(match.groups())
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _summary(error: BaseException) -> str:
    """The line of torch.onnx's report that says what went wrong."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("<class")]
    return (lines[0] if lines else text.strip().splitlines()[0] if text.strip()
            else type(error).__name__)[:300]


def to_onnx(module: nn.Module, example: torch.Tensor, output: str, where: Path):
    """torch.export -> ONNX (an onnx_ir model in a torch.onnx.ONNXProgram), batch, height and
    width symbolic; ExportError naming the op or the failing step otherwise."""
    require("onnx")
    require("onnxscript")
    dims = {1: torch.export.Dim("height", min=1), 2: torch.export.Dim("width", min=1)}
    shapes = {"image": {0: torch.export.Dim("batch", min=1), **dims}}
    try:
        # torch.onnx warns about its own internals (deprecations, fallbacks), not about ours
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=shapes,
                                     input_names=["image"], output_names=[output],
                                     verbose=False)
    except Exception as e:  # noqa: BLE001 - torch.onnx wraps every failure in its own types
        op = _unsupported_op(e)
        if op is not None:
            raise ExportError(f"{where}: cannot export to ONNX: the model uses {op}, which has "
                              "no ONNX form; replace it in the model's forward") from None
        raise ExportError(f"{where}: cannot export to ONNX ({_summary(e)})") from None


def _compare(session, module: Deployable, loss: PixelLoss, batch: np.ndarray,
             output: str) -> dict:
    """One batch through onnxruntime and PyTorch: the largest logit difference and the share
    of pixels whose class differs."""
    try:
        got = torch.from_numpy(session.run(None, {"image": batch})[0])
    except Exception as e:  # noqa: BLE001 - onnxruntime's failures have their own classes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"the exported graph fails on a {sizes.text(batch.shape[1:3], 'WxH')} "
                          f"image ({first}); does the model's forward branch on the input's "
                          "size?") from None
    with torch.inference_mode():
        ref = module(torch.from_numpy(batch))
    if output == "classes":
        max_abs, ours, theirs = None, got.long(), ref.long()
    else:
        max_abs = float((got - ref).abs().max())
        ours, theirs = loss.predict(got), loss.predict(ref)
    return {"output": output, "size": list(batch.shape[1:3]), "batch": len(batch),
            "max_abs": max_abs, "differing": float((ours != theirs).double().mean())}


def _write_and_check(module: Deployable, loss: PixelLoss, output: str, meta: dict[str, str],
                     batches: list[np.ndarray], path: Path, where: Path) -> list[dict]:
    """Export `module` to `path` (a temporary name) with `meta`, and measure it."""
    program = to_onnx(module, torch.from_numpy(batches[0]), output, where)
    program.model.metadata_props.update(meta)
    try:
        program.save(str(path), external_data=False)
    except (ValueError, OSError) as e:  # protobuf's 2 GB ceiling, a full disk
        raise ExportError(f"{where}: cannot write the ONNX file ({e})") from None
    session = open_session(path, "cpu")
    return [_compare(session, module, loss, batch, output) for batch in batches]


def export_onnx(checkpoint: Path, out: Path, *, argmax: bool = False,
                size: tuple[int, int] | None = None, atol: float = ATOL,
                min_identical: float = MIN_IDENTICAL, echo=print) -> Parity:
    """Export checkpoint `checkpoint` to `out` as described above; returns the parity.

    `size` (H, W) is the check's main size [the checkpoint's training size]. Nothing is at
    `out` unless the check passed.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint, "cpu")
    loss = build_loss(state["losstype"], palette=state["palette"])
    mean, std = state["mean"], state["std"]
    h, w = size or sizes.from_file(state["size"])
    batches = check_images((max(h, 16), max(w, 32)))  # the smallest street synth draws
    out.parent.mkdir(parents=True, exist_ok=True)
    parity = Parity(atol=atol, min_identical=min_identical)
    tmp = tmp_path_for(out)
    logits_tmp = tmp.with_name(tmp.name + "-logits") if argmax else tmp
    try:
        parity.rows += _write_and_check(Deployable(model, mean, std), loss, "logits",
                                        metadata(state, checkpoint, "logits"), batches,
                                        logits_tmp, checkpoint)
        if argmax:
            parity.rows += _write_and_check(Deployable(model, mean, std, loss), loss, "classes",
                                            metadata(state, checkpoint, "classes"), batches,
                                            tmp, checkpoint)
        echo(parity.report())
        if not parity.passed:
            raise ExportError(f"{checkpoint}: the ONNX model does not match PyTorch (max "
                              f"|logit diff| {parity.max_abs:.2e}, {parity.differing:.4%} of "
                              f"pixels differ); {out} not written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        logits_tmp.unlink(missing_ok=True)
    return parity
