"""Checkpoints: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so loading one from
elsewhere cannot run code:

    format, format_version, model (state_dict), arch (the model's config: build_model(**arch)),
    classes, categories, palette, mean, std, normalization ("dataset" or the pretrained
    weights whose mean/std these are), shards_mean, shards_std (the training shards'
    own statistics), losstype, size ([W, H] of the training shards),
    optimizer, scheduler,
    scaler, epoch (epochs finished), step (optimizer steps), loader (its state_dict),
    rng (torch / numpy / python / cuda), best_miou, metrics, config, elapsed
"""

from __future__ import annotations

import io
import pickle
import random
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import sizes
from pipeline.files import atomic_write_bytes
from train.models.registry import arch_of

FORMAT = "cityseg-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or made for another model or class set."""


def save_checkpoint(path: Path, state: dict[str, Any], *more: Path) -> None:
    """Serialise in memory, then write to a temporary name and rename: never half a file.
    The same bytes go to every path, in order."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for p in (Path(path), *map(Path, more)):
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(p, buffer.getbuffer())


def snapshot(state: Any) -> Any:
    """A copy of `state` whose tensors are on the CPU and its own: the run changes its
    weights in place after this, the copy keeps this step's. On a GPU this is the
    device-to-host copy; the containers are rebuilt, plain values shared."""
    if isinstance(state, torch.Tensor):  # clone: `.to(copy=True)` is slower on a CPU
        return state.detach().clone() if state.device.type == "cpu" else state.detach().cpu()
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


class CheckpointWriter:
    """Writes checkpoints in a background thread, so that the training loop pays for the
    copy of the state (`snapshot`) and not for serialising it and the disk.

    One write at a time, in the order asked: a save first waits for the previous one. Every
    file is written under a temporary name and renamed, so a kill at any moment leaves the
    previous checkpoint whole. A failed write is raised by the next `save`, `wait` or
    `close`, naming the file.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: tuple[Path, BaseException] | None = None
        self.write_seconds = 0.0  # of the last finished write, in the thread

    def save(self, state: dict[str, Any], path: Path, *more: Path, wait: bool = False) \
            -> float:
        """Queue `state` for `path` (then each of `more`); returns the seconds the caller
        was held (the previous write's end, the snapshot, with `wait` the write)."""
        tick = time.perf_counter()
        self.wait()
        copy = snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(copy, (path, *more)),
                                        name="checkpoint-writer")
        self._thread.start()
        if wait:
            self.wait()
        return time.perf_counter() - tick

    def _write(self, state: dict[str, Any], paths: tuple[Path, ...]) -> None:
        tick = time.perf_counter()
        try:
            save_checkpoint(paths[0], state, *paths[1:])
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._error = (Path(paths[0]), e)
        self.write_seconds = time.perf_counter() - tick

    def wait(self) -> None:
        """Until the last write is on disk; raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            path, error = self._error
            self._error = None
            raise CheckpointError(f"{path}: could not write the checkpoint "
                                  f"({type(error).__name__}: {error})") from error

    close = wait


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; every failure is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch.save archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the line naming the offending object is the news
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain data, "
            f"which could run code ({(lines or [type(e).__name__])[0].strip()})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") \
            from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a citytrain checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {state.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}"
        )
    return state


def check_arch(state: dict, arch: dict, path: Path) -> None:
    """The checkpoint's model must be the one this run builds."""
    saved = arch_of(state.get("arch", {}))
    if saved["encoder"] != arch.get("encoder"):
        raise CheckpointError(
            f"{path}: checkpoint holds a {saved['encoder']} model, this run builds "
            f"{arch.get('encoder')}: pass --encoder {saved['encoder']} to use it")
    diff = sorted(k for k in set(saved) | set(arch) if saved.get(k) != arch.get(k))
    if diff:
        have = ", ".join(f"{k}={saved.get(k)}" for k in diff)
        want = ", ".join(f"{k}={arch.get(k)}" for k in diff)
        raise CheckpointError(
            f"{path}: checkpoint is another architecture ({have}); this run builds {want}"
        )


def check_classes(state: dict, classes: list[str], path: Path, data: str | Path = "the data") \
        -> None:
    """The checkpoint must predict exactly the data's classes, in the same order."""
    saved = list(state.get("classes", []))
    if saved != list(classes):
        raise CheckpointError(
            f"{path}: checkpoint predicts {len(saved)} classes ({', '.join(saved[:5])}"
            f"{', ...' if len(saved) > 5 else ''}) but {data} has {len(classes)} "
            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
        )


# of the shards a checkpoint was trained on (`mean`/`std` are the model's normalization,
# which may be the pretrained weights': the shards' own statistics are kept beside them)
DATA_KEYS = ("size", "mapping", "shards_mean", "shards_std")


def check_data(state: dict, about: dict, path: Path, data: str | Path = "the data") -> None:
    """A resumed run must read the shards it was trained on, wherever they are now: the
    same size, mapping and training-set statistics (a copy elsewhere has the same)."""
    def same(key: str, a, b) -> bool:
        if key == "size" and a is not None and b is not None:  # named, or an older [W, H]
            return sizes.from_file(a) == sizes.from_file(b)
        return a == b

    def shown(key: str, value) -> str:
        return f"{sizes.text(sizes.from_file(value), 'WxH')} (WxH)" if key == "size" and \
            value is not None else str(value)

    state = {**_shards_statistics(state), **state}
    differ = [k for k in DATA_KEYS if k in state and not same(k, state[k], about.get(k))]
    if differ:
        said = "; ".join("another label mapping" if k == "mapping"
                         else f"{k.removeprefix('shards_')} {shown(k, state[k])} there, "
                              f"{shown(k, about.get(k))} here"
                         for k in differ)
        raise CheckpointError(f"{path}: the run was trained on other shards than {data} "
                              f"({said}); pass --data with the run's shards")


def _shards_statistics(state: dict) -> dict:
    """A checkpoint from before `shards_mean`/`shards_std` normalized with the shards' own
    statistics (it knew no other), so its `mean`/`std` are them."""
    if state.get("normalization", "dataset") != "dataset" or "mean" not in state:
        return {}
    return {"shards_mean": state["mean"], "shards_std": state["std"]}


def load_model_weights(model: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({e})") from None


INIT_HEADS = ("keep", "reset")


def init_from_checkpoint(model: torch.nn.Module, path: Path, *, classes: list[str],
                         losstype: str, data: str | Path = "the data", head: str = "keep") \
        -> dict[str, Any]:
    """Fine-tuning: put the weights of checkpoint `path` into the fresh `model`, nothing else
    (the optimizer, schedule, epochs and loader position are the new run's own).

    The architecture must be the same. With head "keep" so must the classes and the loss type;
    with "reset" the last layer (`head.*`) keeps the fresh initialisation `model` has, so a
    checkpoint of another class set can start the run. Returns what config.json records.
    """
    if head not in INIT_HEADS:
        raise ValueError(f"head must be one of {', '.join(INIT_HEADS)}, not {head!r}")
    path = Path(path)
    state = load_checkpoint(path)
    arch = dict(model.config)
    weights = state.get("model", {})
    if head == "keep":
        hint = "; or --init-head reset to start the last layer afresh"
        try:
            check_classes(state, classes, path, data)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{hint}") from None
        if state.get("losstype") != losstype:
            raise CheckpointError(f"{path}: checkpoint was trained with losstype "
                                  f"{state.get('losstype')}, this run uses {losstype}{hint}")
        check_arch(state, arch, path)
    else:
        check_arch(state, {**arch, "num_classes": arch_of(state.get("arch", {}))
                           .get("num_classes")}, path)
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
        weights = {**{k: v for k, v in weights.items() if not k.startswith("head.")}, **fresh}
    load_model_weights(model, {"model": weights}, path)
    return {"checkpoint": str(path), "head": head, "epoch": state.get("epoch"),
            "step": state.get("step"), "classes": list(state.get("classes", [])),
            "metrics": state.get("metrics"), **normalization_of(state)}


def normalization_of(state: dict) -> dict[str, Any]:
    """The mean/std a checkpoint's model was trained with, and where they came from."""
    return {"mean": [float(v) for v in state["mean"]], "std": [float(v) for v in state["std"]],
            "normalization": state.get("normalization", "dataset")}


def training_crop(state: dict) -> tuple[int, int] | None:
    """(H, W) of the crops a checkpoint's model trained on; None for whole images or a
    checkpoint that does not say."""
    crop = (state.get("config") or {}).get("crop")
    return (int(crop[0]), int(crop[1])) if crop else None


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every generator the run draws from, as tensors and lists (safe for weights_only).

    On CUDA only this process's GPU counts: a checkpoint written on 8 GPUs must resume on 1.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state`'s generators; a CUDA state only onto a CUDA `device`.

    Older checkpoints hold a list of every visible GPU's state, however many GPUs this
    machine has: the first one (rank 0 wrote it) is this process's.
    """
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):
        cuda = cuda[0] if cuda else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def model_from_checkpoint(state: dict, path: Path, device: str | torch.device = "cpu") \
        -> torch.nn.Module:
    """The model a checkpoint describes, with its weights, in eval mode on `device`."""
    from train.models import build_model

    try:
        model = build_model(**arch_of(state["arch"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the model from {state.get('arch')} "
                              f"({e})") from None
    load_model_weights(model, state, path)
    return model.to(device).eval()
