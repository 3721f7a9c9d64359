"""`batch bench`: how fast each stage runs on this machine, and what that means for a Slurm job.

Each stage is timed alone (read, decode+preprocess on one core, model, write), then the real
pipeline end to end, then the naive loop a tutorial writes, on the same files in the same run. The
ratio of the model's speed to one core's decoding speed says how many CPUs keep one GPU busy.
`--compare` times whole processes, start to Parquet, against the two peers in `peers.py`;
`--agreement` checks that the fast paths give the answers of the model's reference preprocessing.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from batch import models, peers, sources
from batch.decode import Decoded, decode
from batch.environment import JobEnvironment
from batch.inference import Classifier, Predictions, choose_device, choose_precision
from batch.pipeline import ClassifyOptions, default_batch_size, execute, plan
from batch.stopping import StopRequest
from batch.weights import DEFAULT_WEIGHTS
from batch.writer import ChunkWriter, RowBuilder

MIN_SECONDS = 2.0  # repeat the synthetic stages at least this long
SENSOR_NOISE = 4.0  # standard deviation, 0-255 scale: gives generated JPEGs a camera's file size
JPEG_QUALITY = 90
MIN_SECONDS_PAST_STARTUP = 0.5  # of the start-up time: below that, its variation swamps the rest


@dataclass(frozen=True)
class BenchOptions:
    model: str = models.DEFAULT_MODEL
    weights: str = DEFAULT_WEIGHTS
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    compare: bool = False
    agreement: bool = False


@dataclass(frozen=True)
class Measure:
    name: str
    items: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else math.inf

    def line(self) -> str:
        return f"  {self.name:<30} {self.rate:>9.1f} images/s  {self.note}"


# --- inputs ------------------------------------------------------------------------------------------


def generate_images(folder: Path, count: int, widths: tuple[int, int], photos: Sequence[str], seed: int = 0) -> list[str]:
    """JPEGs of 4:3 (every fourth one portrait), `widths` wide: crops of `photos` when given, else smooth
    random scenes, with sensor noise so that files weigh what a camera's do (about 1.5 bits a pixel).
    One process per CPU: encoding a camera-sized JPEG takes a quarter of a second."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"generated-{number:06d}.jpg", number, widths, tuple(photos), seed) for number in range(count)]
    cpus = JobEnvironment().cpus()
    with multiprocessing.get_context("fork").Pool(min(cpus, max(count, 1))) as pool:
        return pool.starmap(_generate_image, jobs, chunksize=max(1, count // (8 * cpus)))


def _generate_image(path: Path, number: int, widths: tuple[int, int], photos: tuple[str, ...], seed: int) -> str:
    chooser = random.Random(f"{seed}-{number}")  # each picture its own stream: the same files in any process
    noise = np.random.default_rng([seed, number])
    width = chooser.randint(*widths)
    size = (width, width * 3 // 4) if number % 4 else (width * 3 // 4, width)
    scene = _crop(_photo(photos[number % len(photos)]), size, chooser) if photos else _smooth_scene(size, noise)
    pixels = np.asarray(scene.resize(size, Image.Resampling.BILINEAR), np.float32)
    pixels += SENSOR_NOISE * noise.standard_normal((size[1], size[0], 1), dtype=np.float32)
    pixels = np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=JPEG_QUALITY)
    return str(path)


@functools.cache
def _photo(path: str) -> Image.Image:
    return peers.open_rgb(path)


def _crop(picture: Image.Image, size: tuple[int, int], chooser: random.Random) -> Image.Image:
    """A random crop of the aspect of `size`, at least half the picture's shorter side."""
    aspect = size[0] / size[1]
    most = min(picture.width, picture.height * aspect)
    width = chooser.uniform(0.5, 1.0) * most
    height = width / aspect
    left = chooser.uniform(0, picture.width - width)
    top = chooser.uniform(0, picture.height - height)
    return picture.crop((round(left), round(top), round(left + width), round(top + height)))


def _smooth_scene(size: tuple[int, int], noise: np.random.Generator) -> Image.Image:
    coarse = noise.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


# --- the stages, one at a time -----------------------------------------------------------------------


def time_read(paths: Sequence[str]) -> Measure:
    started = time.perf_counter()
    size = 0
    for path in paths:
        with open(path, "rb") as handle:
            size += len(handle.read())
    seconds = time.perf_counter() - started
    return Measure("read", len(paths), seconds, f"{size / seconds / 1e6:.0f} MB/s (page cache when warm)")


def time_decode(paths: Sequence[str], spec: models.ModelSpec) -> tuple[Measure, list[str]]:
    """One core's speed, and the paths that decode: the loops after it time only those, because the
    naive loop and the peers stop at the first bad file."""
    started = time.perf_counter()
    errors = {path: decode(index, path, spec.preprocess).error for index, path in enumerate(paths)}
    seconds = time.perf_counter() - started
    failed = [f"{sources.as_text(path)}: {error}" for path, error in errors.items() if error]
    note = "one core" + (f"; {len(failed)} of {len(paths)} files cannot be decoded, such as {failed[0]}" if failed else "")
    if len(failed) == len(paths):
        raise ValueError(f"none of the {len(paths)} files can be decoded, such as {failed[0]}")
    return Measure("decode+preprocess", len(paths), seconds, note), [path for path, error in errors.items() if not error]


def _repeat(work: Callable[[], int]) -> tuple[int, float]:
    """Run `work` once to warm up, then until MIN_SECONDS have passed; items done and seconds."""
    work()
    items, started = 0, time.perf_counter()
    while (seconds := time.perf_counter() - started) < MIN_SECONDS:
        items += work()
    return items, seconds


def time_model(classifier: Classifier, spec: models.ModelSpec, batch_size: int) -> Measure:
    crop = spec.preprocess.crop
    pixels = torch.randint(0, 256, (batch_size, crop, crop, 3), dtype=torch.uint8)
    if classifier.device.type == "cuda":
        pixels = pixels.pin_memory()

    def one_batch() -> int:
        classifier.predict(pixels)  # returns numpy, so the device has finished
        return batch_size

    items, seconds = _repeat(one_batch)
    note = f"{classifier.device}, {classifier.precision}, batch {batch_size}, {torch.get_num_threads()} threads"
    return Measure("model", items, seconds, note)


def time_write(spec: models.ModelSpec, batch_size: int, folder: Path) -> Measure:
    rows = RowBuilder(spec.labels, 5, embeddings=False)
    decoded = [Decoded(index, width=640, height=480) for index in range(batch_size)]
    paths = [f"/data/images/{index:08d}.jpg" for index in range(batch_size)]
    answers = Predictions(
        np.zeros((batch_size, rows.topk), np.int32), np.full((batch_size, rows.topk), 0.2, np.float32), None
    )
    chunk = ChunkWriter(str(folder / "write-bench.parquet"), rows.schema, {})

    def one_batch() -> int:
        chunk.add(rows.build(paths, decoded, answers))
        return batch_size

    items, seconds = _repeat(one_batch)
    started = time.perf_counter()
    chunk.close()
    return Measure("write", items, seconds + time.perf_counter() - started, "Parquet rows, zstd, fsync")


def time_end_to_end(list_file: Path, count: int, options: BenchOptions, output: Path) -> Measure:
    classify = ClassifyOptions(
        sources=(f"@{list_file}",), output=str(output), model=options.model, weights=options.weights,
        batch_size=options.batch_size, workers=options.workers, device=options.device, precision=options.precision,
    )  # fmt: skip
    run = plan(classify, JobEnvironment())
    started = time.perf_counter()
    execute(run, StopRequest())
    note = f"{run.workers} decoding workers, the real pipeline"
    return Measure("end to end", count, time.perf_counter() - started, note)


def time_naive(paths: Sequence[str], spec: models.ModelSpec) -> tuple[Measure, dict[str, int]]:
    """The naive loop's speed, and its top-1 class id per path: the reference answers for --agreement."""
    network, transform = spec.load(), peers.reference_transform(spec.preprocess)
    started = time.perf_counter()
    top1 = peers.naive(paths, network, transform)[:, 0].tolist()
    seconds = time.perf_counter() - started
    measure = Measure("naive loop (baseline)", len(paths), seconds, "PIL + reference transforms, fp32")
    return measure, {sources.as_text(path): index for path, index in zip(paths, top1)}


def write_file_list(paths: Sequence[str], list_file: Path) -> Path:
    """One path per line, for `batch classify @LIST` and the peers alike."""
    list_file.write_text("".join(f"{path}\n" for path in paths), encoding="utf-8", errors="surrogateescape")
    return list_file


# --- whole processes and answers ---------------------------------------------------------------------


Command = Callable[[Path, str], list[str]]  # a file list and a tag for its output -> the command line


@dataclass(frozen=True)
class ProcessTime:
    """One command's whole-process time on all the files, and on one file: its start-up."""

    name: str
    items: int
    seconds: float
    startup: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    @property
    def rate_after_startup(self) -> float | None:
        """What a task with many more files approaches: the files after the first over their seconds;
        None when those seconds are too few to tell from the start-up's own variation."""
        rest = self.seconds - self.startup
        return (self.items - 1) / rest if rest >= MIN_SECONDS_PAST_STARTUP * self.startup else None

    def line(self) -> str:
        after = self.rate_after_startup
        then = f"then {after:.1f} images/s" if after else "too few files to time the rest"
        return f"  {self.name:<30} {self.seconds:>7.2f} s {self.rate:>9.1f} images/s  start-up {self.startup:.2f} s, {then}"


def time_processes(paths: Sequence[str], list_file: Path, options: BenchOptions, folder: Path,
                   peer_environment: dict[str, str]) -> tuple[list[ProcessTime], ProcessTime]:  # fmt: skip
    """Each peer, then `batch classify`, as its own process, timed from start to its Parquet written,
    on all the files and on the first alone. The peers run in the user's environment, without what
    `batch` sets for itself."""
    first_file = write_file_list(paths[:1], folder / "first-file.txt")
    model = ["--model", options.model, "--weights", options.weights]

    def peer(name: str) -> Command:
        return lambda files, tag: [
            sys.executable, "-m", "batch.peers", name, str(files), "-o", str(folder / f"{name}-{tag}.parquet"), *model,
        ]  # fmt: skip

    def classify(files: Path, tag: str) -> list[str]:
        output = str(folder / f"classify-{tag}")
        return [sys.executable, "-m", "batch", "classify", f"@{files}", "-o", output, *model, *_passed_on(options)]

    def timed(name: str, command: Command, environment: dict[str, str] | None) -> ProcessTime:
        startup = _seconds(command(first_file, "first"), environment)
        return ProcessTime(name, len(paths), _seconds(command(list_file, "all"), environment), startup)

    others = [timed(f"{name} (peer)", peer(name), peer_environment) for name in peers.PEERS]
    return others, timed("batch classify", classify, None)


def _seconds(command: list[str], environment: dict[str, str] | None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment)
    return time.perf_counter() - started


def _passed_on(options: BenchOptions) -> list[str]:
    named = {"--device": options.device, "--precision": options.precision,
             "--batch-size": options.batch_size, "--workers": options.workers}  # fmt: skip
    return [part for option, value in named.items() if value is not None for part in (option, str(value))]


def top1_agreement(output: Path, reference: dict[str, int]) -> tuple[int, int]:
    """How many of the pipeline's top-1 classes the reference preprocessing (full decode, torchvision's
    transforms, fp32, the network as built) also gives; and out of how many classified files."""
    table = pq.read_table(output, columns=["path", "topk_ids", "error"]).to_pylist()
    rows = [row for row in table if row["error"] is None]
    same = sum(row["topk_ids"][0] == reference[row["path"]] for row in rows)
    return same, len(rows)


def suggest_cpus(decode: Measure, model: Measure, device: torch.device) -> str:
    """One GPU needs as many decoding cores as its speed over one core's, plus one for the main process."""
    cores = math.ceil(model.rate / decode.rate) + 1
    if device.type == "cuda":
        return (
            f"to keep this GPU busy ({model.rate:.0f} images/s) on these images, decoding needs "
            f"{cores - 1} cores: sbatch --gpus-per-task=1 --cpus-per-task={cores}"
        )
    return (
        f"no GPU here; one core decodes {decode.rate:.0f} images/s, so a GPU that classifies N images/s "
        f"needs --cpus-per-task of about N/{decode.rate:.0f} + 1 (run `batch bench --device cuda` on a GPU node)"
    )


def run(paths: Sequence[str], options: BenchOptions, describe_inputs: str, peer_environment: dict[str, str]) -> Iterator[str]:
    """The report, line by line, as each measurement finishes."""
    spec = models.resolve(options.model, options.weights, None, models.PreprocessOverrides())
    if options.agreement and spec.untrained:
        raise ValueError("--agreement needs trained weights: untrained answers agree by chance only")
    device = choose_device(options.device)
    precision = choose_precision(options.precision, device)
    batch_size = options.batch_size or default_batch_size(device)
    classifier = Classifier(spec, device, precision, 5, embeddings=False)
    yield f"batch bench: {describe_inputs}; {spec.name} ({spec.weights}) on {device}, {JobEnvironment().cpus()} CPUs"
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as scratch:
        folder = Path(scratch)
        yield "stages, each alone:"
        read, (decoded, paths) = time_read(paths), time_decode(paths, spec)
        list_file = write_file_list(paths, folder / "files.txt")
        model = time_model(classifier, spec, batch_size)
        for measure in (read, decoded, model, time_write(spec, batch_size, folder)):
            yield measure.line()
        yield "together, in this process (start-up excluded):"
        output = folder / "end-to-end"
        end_to_end = time_end_to_end(list_file, len(paths), options, output)
        naive, reference = time_naive(paths, spec)
        yield end_to_end.line()
        yield naive.line()
        yield f"  end to end is {end_to_end.rate / naive.rate:.2f}x the naive loop"
        if options.compare:
            yield "whole processes, start to Parquet written (start-up: the same command on the first file alone):"
            others, ours = time_processes(paths, list_file, options, folder, peer_environment)
            for measure in (*others, ours):
                yield measure.line()
            best = max(others, key=lambda measure: measure.rate)
            yield f"  batch classify is {ours.rate / best.rate:.2f}x the better peer ({best.name})"
            if ours.rate_after_startup and best.rate_after_startup:
                after = ours.rate_after_startup / best.rate_after_startup
                yield f"  after start-up {after:.2f}x: the ratio that tasks with many more files approach"
        if options.agreement:
            same, total = top1_agreement(output, reference)
            yield f"top-1 agreement with the reference preprocessing: {same} of {total} ({100 * same / max(total, 1):.2f}%)"
        yield "suggestion: " + suggest_cpus(decoded, model, device)


def resolve_inputs(given: Sequence[str], generate: int, widths: tuple[int, int], photos: str | None,
                   folder: Path) -> tuple[list[str], str]:  # fmt: skip
    """The user's files, or generated ones; and how to describe them in the report."""
    if given:
        sources.check_sources(given)
        paths = sources.collect(given)
        if not paths:
            raise ValueError(f"no images found in {', '.join(given)}")
        return paths, f"{len(paths)} images from {', '.join(given)}"
    photo_paths = sources.collect([photos]) if photos else []
    if photos and not photo_paths:
        raise ValueError(f"--photos {photos}: no images found there")
    paths = generate_images(folder, generate, widths, photo_paths)
    width = f"{widths[0]}" if widths[0] == widths[1] else f"{widths[0]}-{widths[1]}"
    made_from = f"crops of {len(photo_paths)} photos" if photo_paths else "smooth random scenes"
    return paths, f"{generate} generated JPEGs {width} px wide, {made_from}"
