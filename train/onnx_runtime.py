"""Running an exported model (`citytrain export --format onnx`) with onnxruntime.

The file is self-describing: its metadata (written by train/onnx_export.py, read back by
`read_metadata`) holds the class names, palette, mapping, normalization, training size and
input format, so `citytrain predict --model model.onnx` needs no checkpoint. `OnnxModel`
makes a session look like the PyTorch model to train/evaluation/inference.py: it takes the
normalized float batch every inference mode builds, turns it back into the uint8 RGB the file
expects (exact for whole images, windows and flips, whose pixels are the image's own; a
rescaled image is rounded to uint8 as any deployment feeding uint8 would) and returns the
outputs.

The extra packages live in the project's `deploy` extra; `require` names it when one is
missing instead of an ImportError from deep inside a command.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.photometric import denormalize

FORMAT = "cityseg-onnx"
FORMAT_VERSION = 1
EXTRA = "deploy"
# the package each import comes from, when the names differ
_PACKAGES = {"av": "av (PyAV)", "onnxscript": "onnxscript"}


class OnnxError(RuntimeError):
    """A missing package, or an ONNX file that is unreadable or not ours; the message says
    which and what to do."""


def require(module: str):
    """Import `module` of the deploy extra, or an OnnxError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxError(f"{_PACKAGES.get(module, module)} is not installed: pip install -e "
                        f"'.[{EXTRA}]' (make install includes it)") from None


def providers(device: str | torch.device = "auto") -> list[str]:
    """onnxruntime's execution providers for `device`: CUDA first when asked for (or "auto")
    and this onnxruntime has it (the onnxruntime-gpu wheel), the CPU always as the fallback."""
    ort = require("onnxruntime")
    kind = torch.device(device).type if str(device) != "auto" else "auto"
    have = ort.get_available_providers()
    chosen = ["CUDAExecutionProvider"] if kind in ("auto", "cuda") and \
        "CUDAExecutionProvider" in have else []
    if kind == "cuda" and not chosen:
        raise OnnxError("--device cuda: this onnxruntime has no CUDA provider (pip install "
                        "onnxruntime-gpu in place of onnxruntime), or use --device cpu")
    return [*chosen, "CPUExecutionProvider"]


def open_session(path: Path, device: str | torch.device = "auto", threads: int | None = None):
    """An onnxruntime InferenceSession of the file; OnnxError naming it when unreadable."""
    ort = require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise OnnxError(f"{path}: no such ONNX file")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # none: its failures come back as exceptions, worded here
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=providers(device))
    except OnnxError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own unrelated classes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxError(f"{path}: not a readable ONNX model ({first})") from None


def read_metadata(path: Path, session=None) -> dict[str, Any]:
    """The metadata `citytrain export` wrote, values decoded from JSON; OnnxError when the file
    was not written by it (an ONNX model of elsewhere lacks the classes and normalization)."""
    session = session or open_session(path, "cpu")
    raw = session.get_modelmeta().custom_metadata_map
    if raw.get("format") != FORMAT:
        raise OnnxError(f"{path}: not exported by citytrain export (no {FORMAT} metadata), "
                        "so its classes and normalization are unknown")
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    if int(meta.get("format_version", 0)) != FORMAT_VERSION:
        raise OnnxError(f"{path}: {FORMAT} format_version {meta.get('format_version')}, this "
                        f"code reads {FORMAT_VERSION}")
    return meta


class OnnxModel(nn.Module):
    """An onnxruntime session behind the PyTorch model's interface: normalized float
    (N, 3, H, W) in, outputs (N, C, H, W) float out, on the input's device.

    A file exported with --argmax outputs classes; they come out one-hot, so windows, flips
    and scales average into votes and the bilinear resize to the image's size keeps the
    class with the most weight, and `losstype` is then "segment" whatever the training was.
    """

    def __init__(self, path: Path, device: str | torch.device = "auto",
                 threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = open_session(self.path, device, threads)
        self.meta = read_metadata(self.path, self.session)
        self.mean, self.std = self.meta["mean"], self.meta["std"]
        self.outputs = self.meta["output"]
        self.num_classes = len(self.meta["classes"])
        self.losstype = "segment" if self.outputs == "classes" else self.meta["losstype"]
        self.input_name = self.session.get_inputs()[0].name

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, images: np.ndarray) -> np.ndarray:
        """The file's own interface: uint8 RGB (N, H, W, 3) -> its output as numpy."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images)})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(self.run(denormalize(x, self.mean, self.std)))
        if self.outputs == "classes":
            out = nn.functional.one_hot(out.long(), self.num_classes).permute(0, 3, 1, 2)
        return out.float().to(x.device)
