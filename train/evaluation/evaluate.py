"""`citytrain evaluate` (a checkpoint scored, its results never overwritten unless asked) and
the evaluation that ends `citytrain fit`.

Which images, chosen by the options:
- shard resolution (`--data` alone): the split's shards through the loader, rank r reading
  the r-th contiguous block (pipeline.sampling.Plan). No iIoU: shards hold no instance ids
  (`shards.py`).
- full resolution (`--datadir`): the original PNGs (`full_resolution.py`), rank r scoring the
  r-th block of the sorted image list; `--export-official DIR` also writes labelId PNGs there.
- submission (`--submit ZIP`, with `--datadir`): the split's images only, predicted and zipped
  (`submission.py`).

Confusion matrices and instance statistics are summed over ranks; rank 0 alone writes
OUT/metrics.json, OUT/confusion.png and OUT/iou.png (`results.py`).
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import sizes
from train.evaluation.inference import Inference
from train.evaluation.results import format_metrics, inference_record, write_results
from train.evaluation.shards import evaluate_shards


def final_inference(cfg) -> Inference:
    """The settings of fit's last evaluation (--eval-*), checked before training starts."""
    return Inference(cfg.eval_mode, cfg.eval_window, cfg.eval_stride, tuple(cfg.eval_scales),
                     cfg.eval_flip)


def final_evaluation(model, loader, criterion, *, cfg, dist, inference: Inference,
                     scores: dict | None, classes, categories, checkpoint: Path) -> dict:
    """What ends `fit`: the val split scored with --eval-* into RUN/eval-val, the folder
    `citytrain evaluate` writes by default. The epochs' validations stay plain, so their
    mIoU compare with each other and choose best.pt; this one may add windows and TTA."""
    metrics = evaluate_shards(model, loader, criterion, inference=inference, amp=cfg.amp,
                              device=dist.device, classes=classes, categories=categories,
                              scores=scores)
    metrics.update(checkpoint=str(checkpoint), data=str(cfg.data))
    if dist.is_main:
        write_results(Path(cfg.out) / "eval-val", metrics, classes, criterion.palette)
    return metrics


class EvaluationError(RuntimeError):
    """An evaluation that would replace an earlier one's files; the message names them."""


def default_out(checkpoint: Path, split: str, inference: Inference, full: bool) -> Path:
    """Where `citytrain evaluate` writes unless told: beside RUN/checkpoints/ (else beside the
    checkpoint file) a folder named by what was scored and how, so that no two evaluations
    share one: RUN/eval-val-best-whole, RUN/eval-val-last-full-slide-ms-flip, ... (fit's own
    final evaluation is RUN/eval-val)."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" \
        else checkpoint.parent
    scales = inference.scales
    parts = [split, checkpoint.stem, *(["full"] if full else []), inference.mode,
             *([] if scales == (1.0,) else [f"x{scales[0]:g}"] if len(scales) == 1 else ["ms"]),
             *(["flip"] if inference.flip else [])]
    return run / "-".join(["eval", *parts])


def refuse_overwrite(out: Path | None, export_official: Path | None, submit: Path | None) \
        -> None:
    """Nothing an earlier evaluation wrote is replaced without --overwrite."""
    def refuse(what: Path, option: str) -> None:
        raise EvaluationError(f"{what}: already there, from an earlier evaluation; pass "
                              f"--overwrite to replace it, or another {option}")

    if submit is not None and Path(submit).exists():
        refuse(Path(submit), "--submit ZIP")
    if export_official is not None and any(Path(export_official).glob("*_pred.png")):
        refuse(Path(export_official), "--export-official DIR")
    if out is not None and (Path(out) / "metrics.json").exists():
        refuse(Path(out) / "metrics.json", "--out DIR")


def _benchmark_classes(mapping, checkpoint: Path) -> None:
    """The benchmark server scores the 19 official classes, as labelIds."""
    from pipeline.labels import get_mapping
    from train.checkpoint import CheckpointError

    official = get_mapping("trainid")
    k = official.num_classes
    if mapping.classes != official.classes or \
            list(mapping.export_ids[:k]) != list(official.export_ids[:k]):
        raise CheckpointError(
            f"{checkpoint}: predicts {mapping.num_classes} classes of mapping "
            f"{mapping.name!r}; the benchmark server scores the 19 official ones: train on "
            "shards made with `cityprep preprocess --mapping trainid`")


def evaluate_checkpoint(checkpoint: Path, *, data: Path | None, split: str, out: Path | None,
                        datadir: Path | None, export_official: Path | None,
                        submit: Path | None, inference: Inference, batch_size: int = 4,
                        amp: str = "off", device: str = "auto", workers: int | None = None,
                        backend: str = "auto", overwrite: bool = False,
                        echo=print) -> dict | None:
    """The whole of `citytrain evaluate` (any number of ranks): the metrics written, or None
    for a submission. Shards at `data`, originals at `datadir`; see the module doc. Results
    go to `out` (default: `default_out`); files of an earlier evaluation there are an
    EvaluationError unless `overwrite`."""
    from pipeline.cityscapes import DatasetError, check_root, tree_parts
    from pipeline.loader import build_loader
    from pipeline.shards import load_manifest
    from train import distributed
    from train.checkpoint import (
        CheckpointError,
        check_classes,
        load_checkpoint,
        model_from_checkpoint,
        training_crop,
    )
    from train.evaluation.full_resolution import as_mapping, evaluate_full_resolution
    from train.evaluation.submission import write_submission
    from train.losses import build_loss

    state = load_checkpoint(checkpoint)
    manifest = None
    if data is not None:
        manifest = load_manifest(data)
        check_classes(state, manifest["classes"], checkpoint, data)
    mapping = state.get("mapping") or (manifest or {}).get("config", {}).get("mapping_def")
    if datadir is not None and mapping is None:
        raise CheckpointError(f"{checkpoint}: holds no label mapping; pass --data with the "
                              "shards it was trained on")
    if datadir is not None:
        check_root(datadir)  # shards given as --datadir: say so before anything else
    if submit is not None:
        mapping = as_mapping(mapping)
        _benchmark_classes(mapping, checkpoint)
    elif datadir is not None and not (Path(datadir) / "gtFine" / split).is_dir() and \
            not any(part.endswith(".zip") for part in tree_parts(datadir)):  # (zips: read)
        raise DatasetError(f"{Path(datadir) / 'gtFine' / split}: no labels to score the "
                           f"{split} split against; to predict it for the benchmark server, "
                           "pass --submit results.zip")
    h, w = sizes.from_file(state["size"])  # the training shards' size: the scale the model sees
    inference = inference.for_model((h, w), training_crop(state))
    if out is None:
        out = default_out(checkpoint, split, inference, full=datadir is not None)
    if not overwrite:  # before any work, on every rank alike
        refuse_overwrite(None if submit is not None else Path(out), export_official, submit)
    dist = distributed.setup(device)
    try:
        model = model_from_checkpoint(state, checkpoint, dist.device)
        criterion = build_loss(state["losstype"], palette=state["palette"]).to(dist.device)
        common = dict(mapping=mapping, mean=state["mean"], std=state["std"], size=(h, w),
                      loss=criterion, device=dist.device, amp=amp, inference=inference,
                      rank=dist.rank, world_size=dist.world_size)
        tick = time.perf_counter()
        if submit is not None:
            n = write_submission(model, datadir, split, submit, **common)
            if dist.is_main:
                echo(f"wrote {submit}: {n} labelId PNGs of the {split} split at the originals' "
                     f"size, {time.perf_counter() - tick:.1f} s")
            return None
        if datadir is not None:
            scores = evaluate_full_resolution(model, datadir, split, export_dir=export_official,
                                              **common)
            metrics = {"split": split, "resolution": "full", **scores,
                       "inference": inference_record(inference, amp, (h, w))}
        else:
            loader = build_loader(data, split, batch_size, train=False, mean=state["mean"],
                                  std=state["std"], rank=dist.rank, world_size=dist.world_size,
                                  device=dist.device, workers=workers, backend=backend)
            metrics = evaluate_shards(model, loader, criterion, inference=inference, amp=amp,
                                      device=dist.device, classes=state["classes"],
                                      categories=state.get("categories"))
            loader.close()
        seconds = time.perf_counter() - tick
        metrics.update(seconds=seconds, images_per_s=metrics["images"] / max(seconds, 1e-9),
                       checkpoint=str(checkpoint), data=None if data is None else str(data),
                       datadir=None if datadir is None else str(datadir),
                       export_official=None if export_official is None else str(export_official))
        if dist.is_main:
            write_results(out, metrics, state["classes"], criterion.palette)
            echo(format_metrics(metrics))
            echo(f"wrote {out / 'metrics.json'}, confusion.png, iou.png")
        return metrics
    finally:
        distributed.cleanup()
