"""`cityprep`: synthesize a city, preprocess Cityscapes into shards, inspect and verify them.

Each command is a thin wrapper over a module function; the group turns the project's errors
into one `Error: ...` line (click's prefix, as `citytrain` prints it) and a non-zero exit
instead of a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline import sizes
from pipeline.cityscapes import DatasetError
from pipeline.labels import MappingError
from pipeline.preprocess import PreprocessError
from pipeline.shards import COMPRESSIONS, ShardError

# The project's own errors carry a message naming the file and the cause; OSError's name the path.
USER_ERRORS = (DatasetError, MappingError, ShardError, PreprocessError, OSError)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("Error: interrupted; rerun the same command to continue", err=True)
            ctx.exit(130)


class Size(click.ParamType):
    """An image's WxH, e.g. 1024x512, as (H, W) for the code (pipeline/sizes.py)."""

    name = "WxH"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return sizes.parse(value, "WxH")
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Part(click.ParamType):
    """I/N, e.g. 2/4."""

    name = "I/N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            i, n = (int(v) for v in str(value).split("/"))
            if 1 <= i <= n:
                return (i, n)
        except ValueError:
            pass
        self.fail(f"{value!r} is not I/N with 1 <= I <= N, e.g. 1/4", param, ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cityseg", prog_name="cityprep")
def main() -> None:
    """Cityscapes PNGs -> remapped, resized HDF5 shards for the DALI loader."""


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--train", default=20, show_default=True, help="Frames in the train split.")
@click.option("--val", default=10, show_default=True, help="Frames in the val split.")
@click.option("--test", default=0, show_default=True,
              help="Frames in the test split (images only, as on the benchmark server).")
@click.option("--size", type=Size(), default="2048x1024", show_default=True,
              help="Frame size WxH.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same city.")
@click.option("--coarse", is_flag=True,
              help="Also write gtCoarse labels (fine ones with their boundaries unlabeled).")
@click.option("--extra", default=0, show_default=True,
              help="Frames in train_extra (images and gtCoarse only, as in Cityscapes); "
                   "implies --coarse.")
@click.option("--sequence", default=0, show_default=True,
              help="Frames of a drive in the demoVideo layout "
                   "(leftImg8bit/demoVideo/stuttgart_00/), for `citytrain predict --video`.")
def synth(out: Path, train: int, val: int, test: int, size: tuple[int, int], seed: int,
          coarse: bool, extra: int, sequence: int) -> None:
    """Write a synthetic city into OUT.

    Street scenes in the exact Cityscapes layout (leftImg8bit, gtFine, with --coarse or --extra
    gtCoarse too), deterministic per seed.
    """
    from pipeline.synth import synthesize, synthesize_sequence

    try:
        synthesize(out, train=train, val=val, test=test, size=size, seed=seed, coarse=coarse,
                   extra=extra, progress=True)
        if sequence:
            synthesize_sequence(out, frames=sequence, size=size, seed=seed, progress=True)
    except ValueError as e:  # synth's checks of its arguments
        raise click.ClickException(str(e)) from None
    counts = [f"{train} train", f"{val} val"] + [f"{n} {split}" for n, split in (
        (extra, "train_extra"), (test, "test"), (sequence, "demoVideo")) if n]
    click.echo(f"{out}: {', '.join(counts)} frames at {sizes.text(size, 'WxH')}"
               f"{' with gtCoarse labels' if coarse or extra else ''}")


@main.command()
@click.option("--datadir", required=True, type=click.Path(path_type=Path),
              help="Cityscapes root: the leftImg8bit/ and gtFine/ (gtCoarse/) folders, or the "
                   "official zips as downloaded (read in place), or some of each.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: data_cache/cityscapes-WxH].")
@click.option("--split", "splits", multiple=True, default=("train", "val"), show_default=True,
              help="Split to convert; repeat for several (train, val, test; train_extra has "
                   "coarse labels only).")
@click.option("--size", type=Size(), default="1024x512", show_default=True,
              help="Output size WxH (image area-averaged, label nearest).")
@click.option("--mapping", default="trainid", show_default=True,
              help="trainid (19 classes), seed4 (road/sky/car/background) or a JSON file.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes [default: all CPU cores].")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Samples per shard file [default: 32].")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default=None,
              help="HDF5 filter for the arrays [default: none, see README].")
@click.option("--part", type=Part(), default="1/1", show_default=True,
              help="Write only part I of N, e.g. on N machines sharing one --out.")
@click.option("--mode", type=click.Choice(["fine", "coarse"]), default="fine",
              show_default=True,
              help="gtFine or gtCoarse labels (coarse: train, val and train_extra).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def preprocess(datadir, out, splits, size, mapping, workers, shard_size, compression, part,
               mode, quiet) -> None:
    """Cityscapes PNGs -> remapped, resized shards.

    Decodes every pair once, remaps its labelIds, resizes (image area-averaged, label
    nearest) and writes HDF5 shards plus manifest.json. The official zips are read in place,
    by the workers; the shards are the same as from the extracted files. Rerunning the same
    command resumes: complete shards are verified and kept. A folder never mixes two configs.
    """
    from pipeline import preprocess as pp

    out = out or Path("data_cache") / f"cityscapes-{sizes.text(size, 'WxH')}"
    manifest = pp.preprocess(
        datadir, out, splits=splits, size=size, mapping=mapping, workers=workers,
        shard_size=shard_size or pp.DEFAULT_SHARD_SIZE,
        compression=compression or pp.DEFAULT_COMPRESSION, part=part, mode=mode,
        progress=not quiet)
    if manifest is not None:
        counts = ", ".join(f"{s} {v['samples']}" for s, v in manifest["splits"].items())
        click.echo(f"{out}: manifest.json written ({counts} samples)")


@main.command("inspect-shard")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--preview", type=click.Path(path_type=Path), default=None,
              help="Also write a PNG grid of images beside their colorized labels.")
@click.option("--names", default=5, show_default=True, help="How many sample names to list.")
def inspect_shard(file: Path, as_json: bool, preview: Path | None, names: int) -> None:
    """Summarize one shard.

    Samples, shapes, dtypes, chunking, compression, classes present with their share of
    pixels, the first names; --json for machines, --preview for a picture.
    """
    from pipeline.inspect_shards import format_summary, inspect_shard, write_preview

    summary = inspect_shard(file, names=names)
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))
    if preview is not None:
        write_preview(file, preview)
        if not as_json:
            click.echo(f"preview: {preview}")


@main.command()
@click.argument("data_dir", metavar="DIR", type=click.Path(path_type=Path))
def verify(data_dir: Path) -> None:
    """Check the shards in DIR against the manifest.

    Every listed shard must be present, hold its sample count, match its checksum and read
    back. Exit 0 when all is well, otherwise 1 with the list of what is wrong.
    """
    from pipeline.inspect_shards import verify as run_verify

    report = run_verify(data_dir)
    for note in report.notes:
        click.echo(f"note: {note}")
    if not report.ok:
        for problem in report.problems:
            click.echo(f"problem: {problem}", err=True)
        raise click.ClickException(f"{data_dir}: {len(report.problems)} problem(s) found")
    click.echo(f"{data_dir}: OK ({report.shards} shards, {report.samples} samples)")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/bench"),
              show_default=True, help="Folder for the synthetic city (reused) and the shards.")
@click.option("--frames", default=64, show_default=True,
              help="Train frames at 2048x1024 (plus a quarter as many val frames).")
@click.option("--workers", "workers", multiple=True, type=click.IntRange(min=1),
              default=(1, 2), show_default=True, help="Worker counts to time; repeat.")
@click.option("--shard-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Samples per shard: small enough to give every worker several shards.")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default=None,
              help="Shard compression to time [default: the preprocess default].")
@click.option("--repeat", default=2, show_default=True, type=click.IntRange(min=1),
              help="Runs per measurement; the best counts.")
def bench(out: Path, frames: int, workers: tuple[int, ...], shard_size: int,
          compression: str | None, repeat: int) -> None:
    """Time preprocessing against PIL decode alone.

    Synthesizes a 2048x1024 city in OUT/city (reused), then times preprocessing to 1024x512
    and, on the same files and worker counts, PIL merely decoding the PNGs.

    Leaves the shards in OUT/shards for `cityprep bench-loader OUT/shards`.
    """
    from pipeline.bench import run_bench

    run_bench(out, frames=frames, workers=workers, shard_size=shard_size,
              compression=compression, repeat=repeat)


@main.command("bench-archives")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/bench"),
              show_default=True, help="Folder for the synthetic city and its zips (reused).")
@click.option("--frames", default=64, show_default=True, type=click.IntRange(min=1),
              help="Train frames at 2048x1024 (plus a quarter as many val frames).")
@click.option("--workers", "workers", multiple=True, type=click.IntRange(min=1),
              default=(1, 2), show_default=True, help="Worker counts to time; repeat.")
@click.option("--shard-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Samples per shard.")
@click.option("--repeat", default=2, show_default=True, type=click.IntRange(min=1),
              help="Runs per measurement; the best counts.")
def bench_archives(out: Path, frames: int, workers: tuple[int, ...], shard_size: int,
                   repeat: int) -> None:
    """Time preprocessing from the official zips against the extracted tree.

    On one synthetic 2048x1024 city (OUT/city, shared with `cityprep bench`) and zips of it
    laid out as the downloads, stored and deflated (OUT/zips-*), in one run; checks that
    every source gives the same shards.
    """
    from pipeline.bench import run_archive_bench

    run_archive_bench(out, frames=frames, workers=workers, shard_size=shard_size,
                      repeat=repeat)


@main.command("bench-loader")
@click.argument("data_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Worker processes of both loaders [default: all CPU cores].")
@click.option("--crop", default="512x1024", show_default=True, help="Training crop HxW.")
@click.option("--batches", default=30, show_default=True, type=click.IntRange(min=1),
              help="Timed batches per loader, after 3 untimed ones.")
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto",
              show_default=True, help="The shard loader's backend.")
@click.option("--no-baseline", is_flag=True, help="Time only the shard loader.")
def bench_loader(data_dir: Path, batch_size: int, workers: int | None, crop: str, batches: int,
                 backend: str, no_baseline: bool) -> None:
    """Samples/s and MB/s of the training loader on DIR's shards against the original
    project's loader on the source PNGs (the manifest's source_root)."""
    from pipeline import loader_bench

    try:
        size = sizes.parse(crop, "HxW")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--crop") from None
    rows = loader_bench.bench_loader(data_dir, batch_size=batch_size, workers=workers,
                                     crop=size, batches=batches, baseline=not no_baseline,
                                     backend=backend)
    click.echo(loader_bench.format_rows(rows))


if __name__ == "__main__":
    main()
