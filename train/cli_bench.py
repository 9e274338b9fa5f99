"""`citytrain` bench, bench-inference, bench-checkpoint, bench-restart, gpu-report and
compare-official: what the machine, the loader and the evaluator measure."""

from __future__ import annotations

import json
from pathlib import Path

import click

from train.cli_options import (
    AMPS,
    DEFAULTS,
    DEVICES,
    OPTIMIZERS,
    _scales,
    friendly_errors,
    parse_size,
)


@click.command()
@click.option("--crop", default="512x1024", metavar="HxW",
              help="The synthetic batch's crop HxW.")
@click.option("--batch-size", default=8, type=click.IntRange(1))
@click.option("--amp", default="bf16", type=AMPS)
@click.option("--encoder", "encoders", default=DEFAULTS.encoder, metavar="NAME[,NAME...]|all",
              help="The model(s) to time, one after the other (`citytrain models`).")
@click.option("--width", default=64, type=click.IntRange(1), help="plain: its width.")
@click.option("--depth", default=4, type=click.IntRange(1), help="plain: its depth.")
@click.option("--classes", "num_classes", default=19, type=click.IntRange(1))
@click.option("--steps", default=20, type=click.IntRange(1), help="Timed steps.")
@click.option("--warmup-steps", default=3, type=click.IntRange(0), help="Untimed steps first.")
@click.option("--optimizer", default="sgd", type=OPTIMIZERS)
@click.option("--compile", "compile_", is_flag=True)
@click.option("--channels-last", is_flag=True)
@click.option("--device", default="auto", type=DEVICES)
@click.option("--tf32/--no-tf32", default=False,
              help="TF32 for fp32 work on CUDA (--amp off measures true fp32 without it).")
@click.option("--peak-tflops", type=float, default=None,
              help="Peak for MFU [measured: a square matmul in the step's dtype].")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the figures here.")
@friendly_errors
def bench(crop: str, compile_: bool, encoders: str, json_out: Path | None, **kwargs) -> None:
    """Training throughput, peak memory and model FLOPs utilisation on a synthetic batch;
    with several --encoder, a table of them last."""
    from train.bench import format_report, format_table, run_bench

    size = parse_size(crop)
    if size is None:
        raise click.BadParameter("bench needs a crop HxW", param_hint="--crop")
    reports = []
    for encoder in _model_names(encoders):
        reports.append(run_bench(crop=size, compile=compile_, encoder=encoder, **kwargs))
        click.echo(format_report(reports[-1]))
    if len(reports) > 1:
        click.echo(format_table(reports))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(reports[0] if len(reports) == 1 else reports,
                                       indent=1) + "\n")


def _model_names(text: str) -> list[str]:
    from train.models import get_model_builder, list_models

    names = list_models() if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        get_model_builder(name)  # an unknown name: the error lists the known ones
    return names


@click.command("gpu-report")
@click.option("--out", default=Path("runs/gpu-report"), type=click.Path(path_type=Path),
              show_default=True, help="Folder for report.md, report.json and the shards.")
@click.option("--budget", default=210.0, type=click.FloatRange(min=0), show_default=True,
              help="Seconds the whole report may take: a phase that would not fit in what is "
                   "left is skipped, and the report says so.")
@friendly_errors
def gpu_report(out: Path, budget: float) -> None:
    """Loader, training speed, MFU, memory and data wait on this GPU, in a few minutes.

    Prints the table last and writes OUT/report.md and OUT/report.json.
    """
    import torch

    from train.distributed import local_device, why_no_cuda

    if not torch.cuda.is_available():
        click.echo(f"citytrain gpu-report needs a CUDA GPU (make bench measures the CPU): "
                   f"{why_no_cuda()}", err=True)
        raise SystemExit(2)
    from train.gpu_report import Sizes, format_report, run_report

    report = run_report(out, local_device("cuda"), Sizes(budget_s=budget))
    click.echo(format_report(report))
    click.echo(f"wrote {out / 'report.md'} and {out / 'report.json'}")


@click.command("bench-inference")
@click.option("--size", default=None, metavar="WxH",
              help="The synthetic image's size WxH, an image size as --size everywhere "
                   "[2048x1024; with --onnx 1024x512 and 2048x1024].")
@click.option("--onnx", is_flag=True,
              help="Instead: onnxruntime against PyTorch on the whole image, the same exported "
                   "model (uint8 in, logits out).")
@click.option("--encoder", default=DEFAULTS.encoder, help="The model (random weights: speed "
              "only).")
@click.option("--width", default=16, type=click.IntRange(1), help="plain: U-Net width.")
@click.option("--depth", default=4, type=click.IntRange(1), help="plain: U-Net depth.")
@click.option("--window", default="512x1024", metavar="HxW", help="Slide window HxW.")
@click.option("--stride", default=None, metavar="HxW",
              help="Slide stride HxW [2/3 of the window].")
@click.option("--scales", default="0.75,1.0,1.25", help="Scales of the TTA row.")
@click.option("--images", default=2, type=click.IntRange(1), help="Timed images per row.")
@click.option("--warmup", default=1, type=click.IntRange(0), help="Untimed images per row "
              "first.")
@click.option("--max-windows", default=4, type=click.IntRange(1),
              help="Windows per forward pass.")
@click.option("--amp", default="off", type=AMPS,
              help="Autocast the model to this precision.")
@click.option("--device", default="auto", type=DEVICES,
              help="Where to run [the GPU when there is one].")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the figures here.")
@friendly_errors
def bench_inference(size: str | None, onnx: bool, window: str, stride: str | None,
                    scales: str, json_out: Path | None, **kwargs) -> None:
    """Images/s of whole, slide, and slide + flip + scales inference on one image; with
    --onnx, of onnxruntime and PyTorch."""
    if onnx:
        from train.onnx_bench import SIZES, format_runtime_report, run_runtime_bench

        report = run_runtime_bench(sizes=(parse_size(size, order="WxH"),) if size else SIZES,
                                   **{k: kwargs[k] for k in ("encoder", "width", "depth",
                                                             "images", "warmup", "device")})
        click.echo(format_runtime_report(report))
    else:
        from train.bench import format_inference_report, run_inference_bench

        report = run_inference_bench(size=parse_size(size or "2048x1024", order="WxH"),
                                     window=parse_size(window),
                                     stride=parse_size(stride) if stride else None,
                                     scales=_scales(scales), **kwargs)
        click.echo(format_inference_report(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1) + "\n")


@click.command("bench-checkpoint")
@click.option("--encoder", default=DEFAULTS.encoder, help="The model whose checkpoint is saved.")
@click.option("--width", default=64, type=click.IntRange(1), help="plain: its width.")
@click.option("--depth", default=4, type=click.IntRange(1), help="plain: its depth.")
@click.option("--crop", default="512x1024", help="HxW of the synthetic batch.")
@click.option("--batch-size", default=8, type=click.IntRange(1))
@click.option("--amp", default="bf16", type=AMPS)
@click.option("--optimizer", default="sgd", type=OPTIMIZERS,
              help="Its state is saved too (AdamW's is twice SGD's).")
@click.option("--every", default=",".join(map(str, (50, 100, 200, 500, 1000))),
              help="The --save-every values to figure the share of time for.")
@click.option("--saves", default=3, type=click.IntRange(1), help="Saves timed (median).")
@click.option("--dir", "folder", default=None, type=click.Path(path_type=Path),
              help="Where to write them: the file system the run will use [the temp dir].")
@click.option("--step-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds per training step to figure against [measured here].")
@click.option("--device", default="auto", type=DEVICES)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the figures here.")
@friendly_errors
def bench_checkpoint(crop: str, every: str, json_out: Path | None, **kwargs) -> None:
    """What a checkpoint save costs the training loop, at each --save-every."""
    from train.bench_recovery import format_checkpoint_report, run_checkpoint_bench

    try:
        steps = tuple(int(v) for v in every.split(","))
    except ValueError:
        raise click.BadParameter(f"expected steps like 100,500, got {every!r}",
                                 param_hint="--every") from None
    report = run_checkpoint_bench(crop=parse_size(crop), every=steps, **kwargs)
    click.echo(format_checkpoint_report(report))
    _write_json(json_out, report)


@click.command("bench-restart")
@click.option("--out", default=Path("runs/bench-restart"), type=click.Path(path_type=Path),
              help="Folder for the shards and the three runs.")
@click.option("--nproc", default=2, type=click.IntRange(2), help="CPU processes (gloo).")
@click.option("--width", default=16, type=click.IntRange(1))
@click.option("--size", default="128x256", help="HxW of the synthetic frames (trained whole).")
@click.option("--batch-size", default=2, type=click.IntRange(1), help="Per process.")
@click.option("--steps-per-epoch", default=20, type=click.IntRange(2))
@click.option("--kill-at", default=0.75, type=click.FloatRange(0, 1, max_open=True),
              help="How far into epoch 2 rank 1 is SIGKILLed.")
@click.option("--save-every", default=5, type=click.IntRange(1),
              help="Step checkpoints of the run that has them.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the figures here.")
@friendly_errors
def bench_restart(out: Path, size: str, json_out: Path | None, **kwargs) -> None:
    """Time one SIGKILLed rank costs a run under torchrun, with and without step
    checkpoints: three runs of 2 epochs on CPU processes (a few minutes)."""
    import shutil

    from train.bench_recovery import format_restart_report, run_restart_bench

    shutil.rmtree(out, ignore_errors=True)  # the runs must start afresh
    report = run_restart_bench(out, size=parse_size(size), **kwargs)
    click.echo(format_restart_report(report))
    _write_json(json_out, report)


def _write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")


@click.command("compare-official")
@click.option("--datadir", required=True, type=click.Path(path_type=Path),
              help="Cityscapes tree with the split's labelIds and instanceIds PNGs.")
@click.option("--predictions", required=True, type=click.Path(path_type=Path),
              help="Folder of {city}_{seq}_{frame}*.png labelId PNGs (e.g. --export-official).")
@click.option("--split", default="val", help="The split the PNGs predict.")
@click.option("--device", default="cpu", type=DEVICES,
              help="Where our evaluator counts.")
@friendly_errors
def compare_official(datadir: Path, predictions: Path, split: str, device: str) -> None:
    """Score the same PNGs with our evaluator and cityscapesScripts' (needs cityscapesscripts):
    the four scores of each, their difference and both times."""
    from train.bench import compare_official as run
    from train.bench import format_comparison

    try:
        click.echo(format_comparison(run(datadir, predictions, split, device)))
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None


COMMANDS = (bench, gpu_report, bench_inference, bench_checkpoint, bench_restart, compare_official)
