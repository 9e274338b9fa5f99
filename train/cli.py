"""`citytrain`: fit, evaluate, predict, runs, models, bench, gpu-report.

    citytrain fit --data data_cache/city-1024x512 --out runs/city [--epochs 100 --amp bf16 ...]
    torchrun --standalone --nproc_per_node=4 -m train.cli fit ...        (one process per GPU)
    citytrain evaluate --checkpoint runs/city/checkpoints/best.pt --data data_cache/city-1024x512
    citytrain evaluate --checkpoint ... --datadir ~/cityscapes --mode slide --window 512x1024
    citytrain evaluate --checkpoint ... --datadir ~/cityscapes --split test --submit results.zip
    citytrain predict --checkpoint runs/city --input photos/ --out preds/   (a run: its best.pt)
    citytrain runs [runs]                                                 (a table of runs)
    citytrain bench --crop 512x1024 --batch-size 8 --amp bf16
    citytrain gpu-report --out runs/gpu-report                           (a CUDA GPU only)
    citytrain bench-inference --size 2048x1024
    citytrain bench-checkpoint --dir runs/                    (what a save costs, per --save-every)
    citytrain bench-restart                        (what one SIGKILLed rank costs, under torchrun)

Sizes: an image's --size is WxH; a crop, window or stride is HxW (pipeline/sizes.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from pipeline import sizes
from train.cli_bench import COMMANDS as BENCH_COMMANDS
from train.cli_options import (
    AMPS,
    BACKENDS,
    DEFAULTS,
    DEVICES,
    OPTIMIZERS,
    Owned,
    _range,
    _scales,
    _widths,
    friendly_errors,
    inference_options,
    parse_inference,
    parse_size,
    typed_default,
)
from train.config import (
    EVAL_FIELDS,
    Config,
    read_config_file,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="cityseg", prog_name="citytrain")
def main() -> None:
    """Train and evaluate the U-Net on preprocessed Cityscapes shards."""


@main.command()
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Shard folder from `cityprep preprocess` [a resumed run's own].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory (needed, unless --config names one).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="Start from the settings in this JSON file: a run's config.json, or a "
                   "small file such as {\"width\": 32, \"crop\": \"256x512\"}; options "
                   "given on the command line override it.")
@click.option("--train-split", default=DEFAULTS.train_split,
              help="Split(s) of --data to train on; '+' joins several (train+train_extra).")
@click.option("--epochs", default=DEFAULTS.epochs, type=click.IntRange(1))
@click.option("--batch-size", default=DEFAULTS.batch_size, type=click.IntRange(1),
              help="Images per process (per GPU).")
@click.option("--crop", default=typed_default("crop"), metavar="HxW|full",
              help="Training crop HxW (a crop: height first), or 'full'.")
@click.option("--scale", default=typed_default("scale"), help="Random rescale range MIN,MAX.")
@click.option("--flip/--no-flip", default=DEFAULTS.flip)
@click.option("--jitter", default=DEFAULTS.jitter, type=click.FloatRange(0, 1),
              help="Photometric jitter strength.")
@click.option("--lr", type=float, default=None, help="Peak LR [0.01 sgd, 1e-3 adamw].")
@click.option("--optimizer", default=DEFAULTS.optimizer, type=OPTIMIZERS)
@click.option("--weight-decay", type=float, default=None, help="[1e-4 sgd, 1e-2 adamw]")
@click.option("--warmup", default=DEFAULTS.warmup, type=click.IntRange(0),
              help="Iterations of linear LR warmup.")
@click.option("--clip-grad", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Clip the global gradient norm to this.")
@click.option("--encoder", default=DEFAULTS.encoder,
              help="The model: plain (the U-Net from scratch) or a torchvision backbone under "
                   "a U-Net decoder, e.g. resnet50, convnext_tiny; `citytrain models` lists "
                   "them.")
@click.option("--weights", default=DEFAULTS.weights, metavar="imagenet|none|PATH",
              help="An encoder's start: torchvision's ImageNet weights (downloaded once into "
                   "torch's hub cache), none (from scratch), or a torchvision state dict file.")
@click.option("--decoder", default=None, metavar="W,W,...",
              help="An encoder's decoder widths at strides 16, 8, 4, 2, 1 [256,128,64,32,16].")
@click.option("--encoder-lr-mult", default=DEFAULTS.encoder_lr_mult,
              type=click.FloatRange(min=0, min_open=True),
              help="The encoder's LR is the peak LR times this (e.g. 0.1 for pretrained).")
@click.option("--width", default=DEFAULTS.width, type=click.IntRange(1),
              help="plain: channels at full resolution.")
@click.option("--depth", default=DEFAULTS.depth, type=click.IntRange(1),
              help="plain: poolings.")
@click.option("--upsample", default=DEFAULTS.upsample,
              type=Owned("train.models.plain:UPSAMPLE_MODES"),
              help="plain: how the decoder upsamples.")
@click.option("--losstype", default=DEFAULTS.losstype, type=Owned("train.losses:LOSSTYPES"))
@click.option("--class-weights", is_flag=True, help="ENet class weights from the manifest.")
@click.option("--amp", default=DEFAULTS.amp, type=AMPS,
              help="Autocast dtype; the loss is fp32 either way, fp16 adds a GradScaler.")
@click.option("--tf32/--no-tf32", default=DEFAULTS.tf32,
              help="TF32 for fp32 matmuls and convolutions on CUDA; --amp off --no-tf32 is "
                   "true fp32.")
@click.option("--channels-last", is_flag=True, help="NHWC model and batches.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the model (with several processes: needs --no-sync-bn).")
@click.option("--sync-bn/--no-sync-bn", default=DEFAULTS.sync_bn,
              help="SyncBatchNorm across processes.")
@click.option("--device", default=DEFAULTS.device, type=DEVICES,
              help="auto: this rank's GPU when CUDA is there, else the CPU.")
@click.option("--workers", type=click.IntRange(0), default=None, help="Loader worker processes.")
@click.option("--backend", default=DEFAULTS.backend, type=BACKENDS,
              help="Loader: DALI, or the torch DataLoader fallback.")
@click.option("--eval-every", default=DEFAULTS.eval_every, type=click.IntRange(1),
              help="Evaluate every N epochs (and after the last).")
@click.option("--log-every", default=DEFAULTS.log_every, type=click.IntRange(1),
              help="Steps between reading the loss back (and agreeing on stop and time "
                   "across ranks); the GPU runs ahead in between.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds; the LR schedule ends and training stops by then.")
@click.option("--save-every", default=DEFAULTS.save_every, type=click.IntRange(0),
              help="Steps between checkpoints within an epoch (OUT/checkpoints/last.pt, "
                   "written in the background); 0: at epoch ends and on a signal only.")
@click.option("--seed", default=DEFAULTS.seed, type=int)
@click.option("--resume", is_flag=False, flag_value="yes", default=None,
              type=click.Choice(["yes", "auto"]), metavar="[auto]",
              help="Continue the run in OUT from checkpoints/last.pt, with its own settings "
                   "(only --epochs, --time-limit, --data, --batch-size, --workers, --device, "
                   "logging and --eval-* may be given). --resume auto: the same when OUT has "
                   "a checkpoint, else start the run (what a relaunch after a failure wants).")
@click.option("--init", type=click.Path(path_type=Path), default=None,
              help="Fine-tune: start from this checkpoint's model weights (new optimizer, "
                   "schedule and epochs), and its architecture unless --width, --depth, "
                   "--upsample or --losstype say otherwise; same classes unless --init-head "
                   "reset.")
@click.option("--init-head", default=DEFAULTS.init_head,
              type=Owned("train.checkpoint:INIT_HEADS"),
              help="With --init: keep the checkpoint's last layer, or start it afresh (for "
                   "a checkpoint of another class set).")
@click.option("--progress/--no-progress", default=DEFAULTS.progress)
@click.option("--preflight/--no-preflight", default=DEFAULTS.preflight,
              help="Measure one step's memory first; stop with a message if it won't fit.")
@click.option("--preflight-only", is_flag=True,
              help="Only that check, for LOCAL_WORLD_SIZE processes on this host; then exit.")
@inference_options("eval-", max_windows=False)
@friendly_errors
def fit(config_file: Path | None, **options) -> None:
    """Train a U-Net; writes config, metrics, TensorBoard events, checkpoints, pictures.

    Every validation runs the plain model; the --eval-* options apply to the evaluation after
    the last epoch, written to OUT/eval-val/ as `citytrain evaluate` writes it.
    """
    from train.fit import fit as run_fit

    ctx = click.get_current_context()
    typed = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    settings = read_config_file(config_file) if config_file else {}
    settings.update(_fit_settings(typed))
    if not settings.get("out"):
        raise click.UsageError("--out RUN is needed: the run directory")
    if set(settings) & set(EVAL_FIELDS):  # a bad combination is a usage error, now
        from train.evaluation.evaluate import final_inference
        from train.evaluation.inference import InferenceError

        try:
            final_inference(Config(**{k: v for k, v in settings.items() if k in EVAL_FIELDS}))
        except InferenceError as e:
            raise click.UsageError(str(e).replace("--", "--eval-")) from None
    # the settings the user chose: a resumed run takes every other from its checkpoint
    run_fit(Config(**settings), given=set(settings))


def _fit_settings(typed: dict) -> dict:
    """fit's options as typed -> Config fields and values."""
    convert = {
        "compile_": lambda v: ("compile", v),
        "crop": lambda v: ("crop", parse_size(v)),
        "scale": lambda v: ("scale", _range(v)),
        "data": lambda v: ("data", str(v)),
        "out": lambda v: ("out", str(v)),
        "init": lambda v: ("init", str(v)),
        "decoder": lambda v: ("decoder", _widths(v)),
        "eval_window": lambda v: ("eval_window", parse_size(v)),
        "eval_stride": lambda v: ("eval_stride", parse_size(v)),
        "eval_scales": lambda v: ("eval_scales", _scales(v)),
        "resume": lambda v: ("resume", "auto" if v == "auto" else True),
    }
    return dict(convert.get(name, lambda v, n=name: (n, v))(value)
                for name, value in typed.items())


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="A checkpoint file, or a run directory: its checkpoints/best.pt.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Shard folder: score at shard resolution (optional with --datadir).")
@click.option("--split", default="val")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for metrics.json, confusion.png, iou.png [beside the checkpoints, "
                   "named by what is scored how: RUN/eval-SPLIT-CKPT[-full]-MODE[-ms][-flip], "
                   "e.g. RUN/eval-val-best-slide].")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier evaluation's results (metrics.json, PNGs, zip) where "
                   "this one writes; without it they are refused.")
@click.option("--datadir", type=click.Path(path_type=Path), default=None,
              help="Cityscapes root with the originals, extracted or the official zips: "
                   "score at their resolution, with iIoU from the instanceIds PNGs.")
@click.option("--export-official", type=click.Path(path_type=Path), default=None,
              help="Also write {city}_{seq}_{frame}_pred.png labelId PNGs here (needs "
                   "--datadir).")
@click.option("--submit", type=click.Path(path_type=Path), default=None,
              help="Predict the split (e.g. --split test) and zip labelId PNGs for the "
                   "benchmark server here; reads no label (needs --datadir).")
@inference_options()
@click.option("--batch-size", default=4, type=click.IntRange(1),
              help="Images per batch at shard resolution.")
@click.option("--amp", default="off", type=AMPS)
@click.option("--device", default="auto", type=DEVICES)
@click.option("--workers", type=click.IntRange(0), default=None)
@click.option("--backend", default="auto", type=BACKENDS)
@friendly_errors
def evaluate(checkpoint: Path, data: Path | None, split: str, out: Path | None,
             datadir: Path | None, export_official: Path | None, submit: Path | None,
             mode: str, window: str | None, stride: str | None, scales: str, flip: bool,
             max_windows: int, **kwargs) -> None:
    """Score a checkpoint on a split: metrics.json (mIoU, iIoU, category mIoU and iIoU,
    per class and category), confusion.png, iou.png. Under torchrun every rank scores its
    share. With --submit: zip the split's predictions for the benchmark server instead."""
    from train.evaluation.evaluate import evaluate_checkpoint
    from train.rundir import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)
    inference = parse_inference(mode, window, stride, scales, flip, max_windows)
    if export_official is not None and datadir is None:
        raise click.UsageError("--export-official needs --datadir, the Cityscapes tree with "
                               "the original images and labels")
    if submit is not None and datadir is None:
        raise click.UsageError("--submit needs --datadir, the Cityscapes tree with the "
                               "split's images")
    if submit is not None and export_official is not None:
        raise click.UsageError("--submit writes predictions only; --export-official scores "
                               "a labelled split: run them separately")
    if data is None and datadir is None:
        raise click.UsageError("pass --data (shards) or --datadir (the original Cityscapes "
                               "tree)")
    evaluate_checkpoint(checkpoint, data=data, split=split, out=out, datadir=datadir,
                        export_official=export_official, submit=submit, inference=inference,
                        echo=click.echo, **kwargs)


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="A citytrain checkpoint, or a run directory: its checkpoints/best.pt (or "
                   "--model).")
@click.option("--model", "onnx_model", type=click.Path(path_type=Path), default=None,
              help="An ONNX file of `citytrain export`, run by onnxruntime (its CUDA provider "
                   "when there is one and --device allows).")
@click.option("--input", "inputs", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Image files or folders (repeat the option for several); with --video one "
                   "frame sequence: a folder, a zip of frames or a video file.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for the masks and overlays.")
@click.option("--video", type=click.Path(path_type=Path), default=None,
              help="Write the sequence's predictions as this MP4 instead of PNGs.")
@click.option("--every", default=1, type=click.IntRange(1),
              help="With --video: predict every Nth frame (the frame rate divided by N).")
@click.option("--layout", default="overlay", type=click.Choice(["overlay", "side-by-side"]),
              help="With --video: the overlay, or image | prediction side by side.")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --video: the frames' rate [a video's own; 17, the Cityscapes "
                   "camera's, for PNG frames].")
@click.option("--size", default=None, metavar="WxH|full",
              help="Resize to WxH for the model [the training shards' size]; 'full' = as is.")
@click.option("--format", "format_", default="color",
              type=click.Choice(["color", "trainid", "labelid"]),
              help="color: NAME_mask.png in the palette's colours and NAME_overlay.png; "
                   "trainid: NAME_trainid.png, the class ids as grey values; labelid: "
                   "NAME_labelid.png, the official labelIds.")
@inference_options()
@click.option("--amp", default="off", type=AMPS,
              help="Autocast the model to this precision (a checkpoint only).")
@click.option("--device", default="auto", type=DEVICES)
@friendly_errors
def predict(checkpoint: Path | None, onnx_model: Path | None, inputs: tuple[Path, ...],
            out: Path | None, video: Path | None, every: int, layout: str, fps: float | None,
            size: str | None, format_: str, mode: str, window: str | None, stride: str | None,
            scales: str, flip: bool, max_windows: int, amp: str, device: str) -> None:
    """Colorized masks and overlays (or class id PNGs) for any images, or a video of a frame
    sequence."""
    from train.checkpoint import training_crop
    from train.distributed import local_device
    from train.evaluation.full_resolution import as_mapping
    from train.losses import build_loss
    from train.predict import predict_paths
    from train.rundir import resolve_checkpoint

    inference = parse_inference(mode, window, stride, scales, flip, max_windows)
    if (checkpoint is None) == (onnx_model is None):
        raise click.UsageError("pass --checkpoint C or --model model.onnx, one of them")
    if video is None and out is None:
        raise click.UsageError("pass --out DIR for the PNGs, or --video out.mp4")
    if video is not None and (out is not None or len(inputs) != 1):
        raise click.UsageError("--video predicts one --input (a folder, zip or video file) "
                               "and writes no PNGs: drop --out")
    if video is None and (every != 1 or fps is not None):
        raise click.UsageError("--every and --fps need --video")
    dev = local_device(device)
    if onnx_model is not None:
        from train.onnx_runtime import OnnxModel

        if amp != "off":
            raise click.UsageError("--amp is for a checkpoint; an ONNX file runs as exported")
        model = OnnxModel(onnx_model, device)
        about, losstype, source = model.meta, model.losstype, onnx_model
    else:
        from train.checkpoint import load_checkpoint, model_from_checkpoint

        checkpoint = resolve_checkpoint(checkpoint)
        about = load_checkpoint(checkpoint)
        model, losstype = model_from_checkpoint(about, checkpoint, dev), about["losstype"]
        source = checkpoint
    trained = sizes.from_file(about["size"])
    shape = trained if size is None else parse_size(size, order="WxH")
    if shape is not None:
        try:
            sizes.check_aspect("--size", shape, "WxH", trained,
                               f"the shards {source} was trained on")
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--size") from None
    inference = inference.for_model(shape, training_crop(about))
    loss = build_loss(losstype, palette=about["palette"]).to(dev)
    settings = dict(mean=about["mean"], std=about["std"], loss=loss, device=dev, size=shape,
                    inference=inference, amp=amp)
    if video is not None:
        from train.video import predict_video

        if format_ != "color":
            raise click.UsageError("--format is for PNGs; a --video shows the colours")
        done = predict_video(model, inputs[0], video, every=every, layout=layout, fps=fps,
                             **settings)
        click.echo(f"wrote {video}: {done['frames']} frames of {done['size'][0]}x"
                   f"{done['size'][1]} (WxH) at {float(done['fps']):.4g} fps from "
                   f"{done['source']}")
        return
    mapping = as_mapping(about["mapping"]) if about.get("mapping") else None
    written = predict_paths(model, list(inputs), out, **settings, format=format_,
                            mapping=mapping)
    what = "masks and overlays" if format_ == "color" else f"{format_} PNGs"
    n = len(written) // 2 if format_ == "color" else len(written)
    click.echo(f"wrote {n} {what} to {out}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--format", "format_", default="onnx", type=click.Choice(["onnx"]),
              help="The file format.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="e.g. model.onnx")
@click.option("--argmax", is_flag=True,
              help="Output uint8 class ids (trainIds) per pixel instead of float logits.")
@click.option("--check-size", default=None, metavar="WxH",
              help="Image size of the parity check [the checkpoint's training size]; an odd "
                   "size near it is checked too.")
@click.option("--atol", default=1e-3, type=click.FloatRange(min=0),
              help="Largest absolute logit difference to PyTorch that passes.")
@click.option("--min-identical", default=0.9999, type=click.FloatRange(0, 1),
              help="Smallest share of pixels of the same class as PyTorch's that passes.")
@friendly_errors
def export(checkpoint: Path, format_: str, out: Path, argmax: bool, check_size: str | None,
           atol: float, min_identical: float) -> None:
    """A checkpoint's model as an ONNX file: uint8 RGB NHWC in (any batch and size,
    normalization inside), logits or class ids out, classes/palette/mapping in its metadata;
    written only after onnxruntime matches PyTorch on a few images."""
    from train.onnx_export import export_onnx

    export_onnx(checkpoint, out, argmax=argmax, size=parse_size(check_size, order="WxH"),
                atol=atol, min_identical=min_identical, echo=click.echo)
    click.echo(f"wrote {out}")


@main.command()
@click.option("--size", default="1024x512", metavar="WxH",
              help="Image size the GFLOPs are counted at.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def models(size: str, as_json: bool) -> None:
    """Every model `fit --encoder` takes: parameters, forward GFLOPs on one image, and the
    ImageNet weights it starts from (name, top-1, the mean/std they expect)."""
    from train.models import list_models, model_card

    shape = parse_size(size, order="WxH")
    cards = [model_card(name, shape) for name in list_models()]
    if as_json:
        click.echo(json.dumps(cards, indent=1))
        return
    click.echo(f"{'model':<18} {'params':>8} {'GFLOPs':>8}  {'ImageNet weights':<40} "
               f"{'top-1':>6}  mean / std")
    for c in cards:
        weights = c["weights"] or "- (from scratch; the data's mean/std)"
        top1 = f"{c['top1']:.2f}" if c["top1"] is not None else ""
        norm = f"{c['mean']} / {c['std']}" if c["mean"] else ""
        click.echo(f"{c['name']:<18} {c['params_m']:>7.1f}M {c['gflops']:>8.1f}  "
                   f"{weights:<40} {top1:>6}  {norm}")
    click.echo(f"GFLOPs: one forward pass at {shape[1]}x{shape[0]} (WxH), counted by "
               "torch.utils.flop_counter; plain at its defaults (--width 64 --depth 4)")


@main.command()
@click.argument("folder", metavar="[DIR]", default="runs", required=False,
                type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def runs(folder: Path, as_json: bool) -> None:
    """A table of the runs in DIR [runs]: encoder, epochs done, best val mIoU and its epoch,
    the last evaluation's four scores (-: not measured, as iIoU at shard resolution),
    training time, and state (running, stopped and why, done)."""
    from train.runs import find_runs, format_runs, run_summary

    if not folder.is_dir():
        raise click.ClickException(f"{folder}: no such folder (runs are the --out folders of "
                                   "`citytrain fit`)")
    rows = [run_summary(run, folder) for run in find_runs(folder)]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    elif not rows:
        click.echo(f"{folder}: no runs (a run is a `citytrain fit --out` folder, with "
                   "config.json and metrics.csv)")
    else:
        click.echo(format_runs(rows))


for command in BENCH_COMMANDS:  # train/cli_bench.py
    main.add_command(command)


if __name__ == "__main__":
    main()
