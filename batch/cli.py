"""The `batch` command line: thin wrappers that parse options and hand them to the stage modules.

Heavy imports (torch) happen inside the commands, so `batch --help` is instant and the stop signals
are caught before torch takes seconds to import.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import click

import batch
from batch import transient
from batch.options import RETRY_FAILED, RETRY_KIND, Triple, WidthRange, budget_options, retry_asked, setup_logging
from batch.stopping import StopRequest

if TYPE_CHECKING:
    from batch.spill import Budget


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(batch.__version__, prog_name="batch")
def main() -> None:
    """Classify folders of images with a pretrained model into a Parquet dataset."""
    import os

    from batch.environment import let_openmp_sleep, redirect_unwritable_caches, stay_offline

    redirect_unwritable_caches(os.environ)
    let_openmp_sleep(os.environ)
    stay_offline(os.environ)


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output directory (a Parquet dataset).")
@click.option("--model", default="efficientnet_lite0", show_default=True,
              help="efficientnet_lite0, a torchvision model name, a TorchScript / torch.export file, "
                   "timm:ARCH (with --weights FILE), or a timm model folder.")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="A torchvision weights name (DEFAULT, IMAGENET1K_V2...), a state-dict or checkpoint file "
                   "(FILE#ema: its EMA weights), or 'none' (untrained).")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), help="Class names, one per line.")
@click.option("--template", "templates", multiple=True,
              help="Zero-shot CLIP: a prompt, {} for the class name; repeat to average  [default: 'a photo of a {}.']")
@click.option("--resize", type=click.IntRange(1), help="Override: resize the shorter side to this.")
@click.option("--crop", type=click.IntRange(1), help="Override: centre crop size.")
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]), help="Override: resize filter.")
@click.option("--mean", type=Triple(), help="Override: per-channel mean on the 0-1 scale, e.g. 0.485,0.456,0.406.")
@click.option("--std", type=Triple(), help="Override: per-channel std on the 0-1 scale.")
@click.option("--topk", default=5, show_default=True, type=int, help="Classes kept per image.")
@click.option("--activation", default="softmax", show_default=True, type=click.Choice(["softmax", "sigmoid"]),
              help="Scores from logits: sigmoid for multi-label models (taggers), each class on its own.")
@click.option("--batch-size", type=int, help="Images per model call  [default: 256 on a GPU, 32 on CPU]")
@click.option("--workers", type=int, help="Decoding processes  [default: SLURM_CPUS_PER_TASK, else usable CPUs]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="auto: bf16 on a GPU that has it, fp32 on CPU.")
@click.option("--decode", default="cpu", show_default=True, type=click.Choice(["cpu", "gpu", "auto"]),
              help="Where JPEGs are decoded: by the workers on the CPU, or in batches on the model's GPU (the "
                   "workers check each file; one the GPU refuses is decoded on the CPU). auto: gpu on a GPU.")
@click.option("--num-shards", type=click.IntRange(1), help="Split the inputs into this many shards  [default: from Slurm]")
@click.option("--shard-index", type=click.IntRange(0), help="The shard this run takes  [default: from Slurm]")
@click.option("--embeddings", is_flag=True, help="Also store penultimate-layer features (float16).")
@click.option("--overwrite", is_flag=True, help="Replace this shard's earlier results, even of another configuration.")
@click.option("--strict", is_flag=True, help="Exit 3 if any input could not be classified (after writing).")
@click.option("--max-error-rate", type=float, help="Exit 3 once more than this fraction of inputs fail.")
@click.option("--commit-every", default=60.0, show_default=True, type=click.FloatRange(0),
              help="Seconds between commits: at most this much work is lost to a kill.")
@click.option("--decode-timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a decoding worker may spend on one file before it is killed and the file gets an error row.")
@click.option("--io-retries", default=transient.DEFAULT_RETRIES, show_default=True, type=click.IntRange(0),
              help="Tries again after a read fails for a reason outside the file (EIO, ESTALE, a timeout), waiting "
                   "0.5, 2, 8... s; then the row's error is 'io error'.")
@RETRY_FAILED
@RETRY_KIND
@click.option("-v", "--verbose", is_flag=True, help="Log every commit.")
def classify(sources: tuple[str, ...], output: str, model: str, weights: str, labels_file: str | None,
             templates: tuple[str, ...], resize: int | None, crop: int | None, interpolation: str | None, mean: tuple[float, float, float] | None,
             std: tuple[float, float, float] | None, topk: int, activation: str, batch_size: int | None,
             workers: int | None,
             device: str, precision: str, decode: str, num_shards: int | None, shard_index: int | None, embeddings: bool,
             overwrite: bool, strict: bool, max_error_rate: float | None, commit_every: float,
             decode_timeout: float, io_retries: int, retry_failed: bool, retry_kinds: tuple[str, ...],
             verbose: bool) -> None:  # fmt: skip
    """Classify the images in SOURCES (folders, image files, @lists, manifests) into OUTPUT.

    \b
    Exit status: 0 done (bad files have rows with `error` set); 2 bad arguments;
    3 --strict or --max-error-rate breached (results written); 74 the output's disk or quota
    is full (what was committed stays: free space, run again); 75 stopped by SIGTERM/SIGUSR1
    after committing: run the same command again to go on.
    """
    stop = StopRequest().install()
    setup_logging(verbose)
    from batch.commit import OutputError
    from batch.environment import Shard
    from batch.manifest import ManifestError
    from batch.models import ModelError, PreprocessOverrides
    from batch.pipeline import execute
    from batch.plan import ClassifyOptions, plan
    from batch.weights import WeightsError

    if (num_shards is None) != (shard_index is None):
        raise click.UsageError("--num-shards and --shard-index go together")
    try:
        options = ClassifyOptions(
            sources=sources, output=output, model=model, weights=weights, labels_file=labels_file, templates=templates,
            overrides=PreprocessOverrides(resize=resize, crop=crop, interpolation=interpolation, mean=mean, std=std),
            topk=topk, activation=activation, batch_size=batch_size, workers=workers, device=device, precision=precision,
            decode=decode, shard=Shard(shard_index, num_shards) if num_shards is not None else None, embeddings=embeddings,
            overwrite=overwrite, strict=strict, max_error_rate=max_error_rate, commit_every=commit_every,
            decode_timeout=decode_timeout, io_retries=io_retries,
            retry_failed=retry_asked(retry_failed, retry_kinds),
        )  # fmt: skip
        run = plan(options, _environment())
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    try:
        status = execute(run, stop)
    except (ModelError, WeightsError, ManifestError, OutputError) as error:
        raise click.ClickException(str(error)) from None
    sys.exit(status)


def _environment():
    from batch.environment import JobEnvironment

    return JobEnvironment()


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Manifest file to write.")
@click.option("--threads", type=click.IntRange(1),
              help="Folders listed and files stat-ed at once  [default: 32 on a network file system, else 1]")
@budget_options
def index(sources: tuple[str, ...], output: str, threads: int | None, budget: Budget) -> None:
    """Walk SOURCES once, with many threads on a network file system, and write their inputs to a manifest.

    Tars and Parquet files of images are listed by as many processes as the job has CPUs.

    The manifest (path, size, mtime, bucket) is laid out so that each array task of
    `batch classify MANIFEST` reads only its own part of it.
    """
    from batch import manifest
    from batch.sources import SourceError, check_sources
    from batch.sources import index as walk

    try:
        check_sources(sources)
        count = manifest.write(walk(sources, threads, processes=budget.cpus), output, budget)
    except SourceError as error:
        raise click.UsageError(str(error)) from None
    click.echo(f"indexed {count} images into {output}")


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path(file_okay=False))
@click.option("-o", "--to-do", "to_do", required=True, type=click.Path(dir_okay=False),
              help="Manifest of the inputs without a row, to write.")
@RETRY_FAILED
@RETRY_KIND
@budget_options
def pending(manifest: str, output: str, to_do: str, retry_failed: bool, retry_kinds: tuple[str, ...], budget: Budget) -> None:
    """Write the inputs of MANIFEST that have no row in OUTPUT yet (with --retry-failed, or a failed
    one), as a manifest for the next array.

    Prints their number alone on stdout, for scripts (slurm/submit.sh sizes its array with it).
    """
    from batch.summary import pending as write_pending

    try:
        click.echo(write_pending(manifest, output, to_do, retry_asked(retry_failed, retry_kinds), budget))
    except ValueError as error:
        raise click.UsageError(str(error)) from None


@main.command()
@click.argument("output", type=click.Path(exists=True, file_okay=False))
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False),
              help="Check that every input of this manifest has exactly one row.")
@click.option("--top", default=10, show_default=True, help="How many labels to list.")
@budget_options
def summary(output: str, manifest: str | None, top: int, budget: Budget) -> None:
    """Rows, errors by kind, top labels and throughput of a results directory.

    Exits 1 if a path has more than one row, or (with --manifest) if any input has none.
    """
    from batch.summary import summarize

    report, healthy = summarize(output, manifest, top, budget)
    click.echo(report)
    sys.exit(0 if healthy else 1)


@main.command()
@click.argument("output", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--html", "target", required=True, type=click.Path(dir_okay=False), help="The HTML file to write.")
@click.option("--title", help="The page's heading  [default: 'batch report: OUTPUT']")
@budget_options
def report(output: str, target: str, title: str | None, budget: Budget) -> None:
    """One self-contained HTML page about OUTPUT: labels as a chart, thumbnails of the frequent ones,
    the least confident predictions, errors by kind, provenance and throughput.

    Only samples are drawn, so the page stays about a megabyte for any number of rows.
    """
    from batch.report import write_report

    try:
        click.echo(write_report(output, target, title, budget))
    except ValueError as error:
        raise click.UsageError(str(error)) from None


@main.group()
def weights() -> None:
    """Stage torchvision weights for compute nodes without network access."""


@weights.command("pull")
@click.argument("model")
@click.option("--weights", "weights_name", default="DEFAULT", show_default=True, help="Weights name.")
def weights_pull(model: str, weights_name: str) -> None:
    """Download MODEL's weights into the torch cache ($TORCH_HOME/hub/checkpoints)."""
    from batch.weights import WeightsError, pull

    try:
        click.echo(pull(model, weights_name))
    except WeightsError as error:
        raise click.ClickException(str(error)) from None


@weights.command("list")
@click.argument("model", required=False)
@click.option("--all", "show_all", is_flag=True, help="List every model name.")
def weights_list(model: str | None, show_all: bool) -> None:
    """Weights in the torch cache, or each of MODEL's weights and whether it is staged."""
    from batch.models import known_models
    from batch.weights import WeightsError, describe

    try:
        click.echo("\n".join(known_models()) if show_all else describe(model))
    except WeightsError as error:
        raise click.UsageError(str(error)) from None


@main.command()
@click.argument("sources", nargs=-1)
@click.option("--generate", default=256, show_default=True, type=click.IntRange(1),
              help="Without SOURCES: how many JPEGs to generate (and delete afterwards).")
@click.option("--width", "widths", default="500", show_default=True, type=WidthRange(),
              help="Width of generated JPEGs (4:3), or a range like 2000-4000.")
@click.option("--model", default="efficientnet_lite0", show_default=True, help="As for classify.")
@click.option("--weights", default="DEFAULT", show_default=True, help="As for classify.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), help="As for classify.")
@click.option("--template", "templates", multiple=True, help="As for classify: a zero-shot CLIP model's prompts.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option("--batch-size", type=click.IntRange(1), help="As for classify.")
@click.option("--workers", type=click.IntRange(0), help="As for classify.")
def bench(sources: tuple[str, ...], generate: int, widths: tuple[int, int], model: str, weights: str,
          labels_file: str | None, templates: tuple[str, ...], device: str, precision: str, batch_size: int | None,
          workers: int | None) -> None:  # fmt: skip
    """Measure each stage and the whole pipeline on SOURCES or generated JPEGs.

    Prints images/s for read, decode+preprocess (one core), model, write and the whole pipeline, and
    the --cpus-per-task that keeps one GPU busy. The numbers are this machine's.
    """
    import tempfile
    from pathlib import Path

    setup_logging(False)
    for quiet in ("batch.plan", "batch.pipeline"):  # bench prints its own lines, not a run's
        logging.getLogger(quiet).setLevel(logging.WARNING)
    from batch import bench as measure

    options = measure.BenchOptions(
        model=model, weights=weights, labels_file=labels_file, templates=templates, device=device, precision=precision,
        batch_size=batch_size, workers=workers,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="batch-bench-images-") as scratch:
        try:
            paths, described = measure.resolve_inputs(sources, generate, widths, Path(scratch))
            for line in measure.run(paths, options, described):
                click.echo(line)
        except ValueError as error:
            raise click.UsageError(str(error)) from None


@main.command()
@click.option("--expect-gpu/--no-expect-gpu", default=None,
              help="Fail without a visible GPU  [default: when Slurm allotted GPUs]")
def doctor(expect_gpu: bool | None) -> None:
    """Check torch, CUDA and GPUs, cache directories, Slurm and container context."""
    from batch.doctor import diagnose

    report, healthy = diagnose(_environment(), expect_gpu)
    click.echo(report)
    sys.exit(0 if healthy else 1)


@main.group()
def image() -> None:
    """Build the container image with Podman, convert it to an Apptainer SIF, keep apptainer.def in sync."""


@image.command("build", context_settings={"ignore_unknown_options": True})
@click.option("--tag", default="classify", show_default=True, help="Image name; tagged :VERSION and :latest.")
@click.option("--base-image", help="A Debian/Ubuntu image with python3 and venv, for sites without registry access.")
@click.option("-f", "--containerfile", default="Containerfile", show_default=True, type=click.Path(exists=True))
@click.option("--context", default=".", show_default=True, type=click.Path(exists=True, file_okay=False))
@click.argument("podman_args", nargs=-1, type=click.UNPROCESSED)
def image_build(tag: str, base_image: str | None, containerfile: str, context: str, podman_args: tuple[str, ...]) -> None:
    """Run `podman build` with the version, git revision and creation time as labels.

    Arguments after `--` go to podman build unchanged (e.g. `-- --network host`).
    """
    from batch.image import ImageError, build

    try:
        build(context, containerfile, tag, base_image, podman_args)
    except ImageError as error:
        raise click.ClickException(str(error)) from None


@image.command("sif")
@click.option("-o", "--output", "sif_path", default="classify.sif", show_default=True, help="The SIF to build.")
@click.option("--image", "image_name", default="classify:latest", show_default=True, help="The Podman image.")
@click.option("--archive", help="Where to save the OCI archive  [default: next to the SIF, .oci.tar]")
def image_sif(sif_path: str, image_name: str, archive: str | None) -> None:
    """Save the image as an OCI archive and, where apptainer is installed, build and test the SIF.

    Without apptainer (a laptop), it prints the command to run on the cluster.
    """
    from batch.image import ImageError, sif

    try:
        result = sif(image_name, sif_path, archive)
    except ImageError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"saved {image_name} to {result.archive}")
    if result.sif:
        click.echo(f"built and tested {result.sif}")
    else:
        click.echo(f"apptainer is not installed here; copy the archive to the cluster and run:\n  {result.command}")


@image.command("def")
@click.option("-f", "--containerfile", default="Containerfile", show_default=True, type=click.Path(exists=True))
@click.option("-o", "--output", default="apptainer.def", show_default=True, type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Exit 1 if OUTPUT differs from what the Containerfile gives.")
def image_def(containerfile: str, output: str, check: bool) -> None:
    """Write apptainer.def from the Containerfile (spython, plus the fixes it needs)."""
    from batch.image import check_definition, definition

    if check:
        difference = check_definition(containerfile, output)
        if difference:
            click.echo(difference, err=True)
            raise click.ClickException(f"{output} is out of date with {containerfile}; run `batch image def`")
        click.echo(f"{output} matches {containerfile}")
        return
    with open(output, "w", encoding="utf-8") as handle:
        handle.write(definition(containerfile))
    click.echo(f"wrote {output}")
