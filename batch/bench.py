"""`batch bench`: how fast each stage runs on this machine, and what that means for a Slurm job.

Each stage is timed alone (read, decode+preprocess on one core, model, write), then the real
pipeline end to end, on the same files. The ratio of the model's speed to one core's decoding speed
says how many CPUs keep one GPU busy. So for --decode gpu do two more stages: what a worker does then
(open, check, read the bytes: one core) and the device's decoding; and the pipeline runs again with
--decode gpu where there are JPEGs. Comparing with other programs is for `benchmarks/`.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from batch import models, sources
from batch.decode import Decoded, Preprocess, decode
from batch.decode_device import MISSING, DeviceDecoder
from batch.environment import JobEnvironment
from batch.devices import choose_device, choose_precision, probe
from batch.inference import IN_FLIGHT, Classifier, Pending, Predictions
from batch.paths import readable
from batch.pipeline import execute
from batch.plan import ClassifyOptions, default_batch_size, plan
from batch.pool import Batch
from batch.stopping import StopRequest
from batch.weights import DEFAULT_WEIGHTS
from batch.writer import ChunkWriter, RowBuilder

MIN_SECONDS = 2.0  # repeat the synthetic stages at least this long
ANY_SIZE = 1 << 30  # room for a JPEG of any size, when only the speed of checking it is asked
SENSOR_NOISE = 4.0  # standard deviation, 0-255 scale: gives generated JPEGs a camera's file size
JPEG_QUALITY = 90
ON_DEVICE = "decode+preprocess on device"  # its stage, measured or said to be out of reach

# A picture's number, its size, and its own random streams -> the scene to save at that size.
Scene = Callable[[int, tuple[int, int], random.Random, np.random.Generator], Image.Image]


@dataclass(frozen=True)
class BenchOptions:
    model: str = models.DEFAULT_MODEL
    weights: str = DEFAULT_WEIGHTS
    labels_file: str | None = None
    templates: tuple[str, ...] = ()  # a zero-shot CLIP model's prompts
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    workers: int | None = None


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


def smooth_scene(_number: int, size: tuple[int, int], _chooser: random.Random, noise: np.random.Generator) -> Image.Image:
    coarse = noise.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def generate_images(folder: Path, count: int, widths: tuple[int, int], scene: Scene = smooth_scene, seed: int = 0) -> list[str]:
    """JPEGs of 4:3 (every fourth one portrait), `widths` wide, of `scene`, with sensor noise so that
    files weigh what a camera's do (about 1.5 bits a pixel). One process per CPU: encoding a
    camera-sized JPEG takes a quarter of a second."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"generated-{number:06d}.jpg", number, widths, scene, seed) for number in range(count)]
    cpus = JobEnvironment().cpus()
    with multiprocessing.get_context("fork").Pool(min(cpus, max(count, 1))) as pool:
        return pool.starmap(_generate_image, jobs, chunksize=max(1, count // (8 * cpus)))


def _generate_image(path: Path, number: int, widths: tuple[int, int], scene: Scene, seed: int) -> str:
    chooser = random.Random(f"{seed}-{number}")  # each picture its own stream: the same files in any process
    noise = np.random.default_rng([seed, number])
    width = chooser.randint(*widths)
    size = (width, width * 3 // 4) if number % 4 else (width * 3 // 4, width)
    pixels = np.asarray(scene(number, size, chooser, noise).resize(size, Image.Resampling.BILINEAR), np.float32)
    pixels += SENSOR_NOISE * noise.standard_normal((size[1], size[0], 1), dtype=np.float32)
    pixels = np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=JPEG_QUALITY)
    return str(path)


def collect_inputs(given: Sequence[str]) -> list[str]:
    sources.check_sources(given)
    found = sources.gather(given)
    if not found.paths:
        raise ValueError(f"no images found in {', '.join(given)}")
    if found.members:  # its stages time files; `benchmarks/tar_vs_files.py` times containers end to end
        raise ValueError(f"batch bench times image files, not the images inside tars or Parquet files, such as {next(iter(found.members))}")
    return found.paths


def resolve_inputs(given: Sequence[str], generate: int, widths: tuple[int, int], folder: Path) -> tuple[list[str], str]:
    """The user's files, or generated ones; and how to describe them in the report."""
    if given:
        paths = collect_inputs(given)
        return paths, f"{len(paths)} images from {', '.join(given)}"
    width = f"{widths[0]}" if widths[0] == widths[1] else f"{widths[0]}-{widths[1]}"
    return generate_images(folder, generate, widths), f"{generate} generated JPEGs {width} px wide, smooth random scenes"


def decodable(paths: Sequence[str], preprocess: Preprocess) -> tuple[list[str], list[str]]:
    """The paths that decode, and `path: error` for each that does not; a ValueError when none does."""
    errors = {path: decode(index, path, preprocess).error for index, path in enumerate(paths)}
    failed = [f"{readable(path)}: {error}" for path, error in errors.items() if error]
    if len(failed) == len(paths):
        raise ValueError(f"none of the {len(paths)} files can be decoded, such as {failed[0]}")
    return [path for path, error in errors.items() if not error], failed


def left_out(failed: Sequence[str], total: int) -> str:
    return f"{len(failed)} of {total} files cannot be decoded, such as {failed[0]}"


def write_file_list(paths: Sequence[str], list_file: Path) -> Path:
    """One path per line, for `batch classify @LIST` and the benchmarks' peers alike."""
    list_file.write_text("".join(f"{path}\n" for path in paths), encoding="utf-8", errors="surrogateescape")
    return list_file


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
    """One core's speed, and the paths that decode: end to end times only those, so that its rate is
    of images classified, not of error rows."""
    started = time.perf_counter()
    good, failed = decodable(paths, spec.preprocess)
    seconds = time.perf_counter() - started
    note = "one core" + (f"; {left_out(failed, len(paths))}" if failed else "")
    return Measure("decode+preprocess", len(paths), seconds, note), good


def time_check(paths: Sequence[str], spec: models.ModelSpec) -> tuple[Measure, list[Decoded]]:
    """One core's speed at a worker's part of --decode gpu, and the JPEGs it leaves to the device."""
    started = time.perf_counter()
    checked = [decode(index, path, spec.preprocess, jpeg_room=ANY_SIZE) for index, path in enumerate(paths)]
    seconds = time.perf_counter() - started
    left = [item for item in checked if item.jpeg is not None]
    note = f"one core: open, check, read; {len(left)} of {len(paths)} JPEGs left to the device"
    return Measure("check for --decode gpu", len(paths), seconds, note), left


def time_device_decode(left: Sequence[Decoded], spec: models.ModelSpec, device: torch.device, batch_size: int) -> Measure:
    """The device's speed at decoding, turning upright, resizing and cropping batches of those JPEGs."""
    decoder = DeviceDecoder(spec.preprocess, device)

    def all_batches() -> int:
        for start in range(0, len(left), batch_size):
            decoder.crops(Batch([replace(item) for item in left[start : start + batch_size]], None))  # it lets go of the bytes
        return len(left)

    def finish() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    items, seconds = _repeat(all_batches, finish)
    return Measure(ON_DEVICE, items, seconds, f"{device}, torchvision decode_jpeg, batch {batch_size}")


def _repeat(work: Callable[[], int], finish: Callable[[], object] = lambda: None) -> tuple[int, float]:
    """Run `work` once to warm up, then until MIN_SECONDS have passed, then `finish` what it left
    under way; items done and seconds."""
    work()
    finish()
    items, started = 0, time.perf_counter()
    while time.perf_counter() - started < MIN_SECONDS:
        items += work()
    finish()
    return items, time.perf_counter() - started


def time_model(classifier: Classifier, spec: models.ModelSpec, batch_size: int) -> Measure:
    """The model's speed as the pipeline drives it: batches from page-locked memory, several queued."""
    crop = spec.preprocess.crop
    pixels = torch.randint(0, 256, (batch_size, crop, crop, 3), dtype=torch.uint8)
    if classifier.device.type == "cuda":
        pixels = pixels.pin_memory()
    queued: deque[Pending] = deque()

    def one_batch() -> int:
        queued.append(classifier.submit(pixels))
        while len(queued) > IN_FLIGHT:
            queued.popleft().result()  # numpy answers: the device has finished that batch
        return batch_size

    def drain() -> None:
        while queued:
            queued.popleft().result()

    items, seconds = _repeat(one_batch, finish=drain)
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


def time_end_to_end(list_file: Path, count: int, options: BenchOptions, output: Path, decode: str = "cpu") -> Measure:
    classify = ClassifyOptions(
        sources=(f"@{list_file}",), output=str(output), model=options.model, weights=options.weights,
        labels_file=options.labels_file, templates=options.templates, batch_size=options.batch_size,
        workers=options.workers, device=options.device, precision=options.precision, decode=decode,
    )  # fmt: skip
    run = plan(classify, JobEnvironment())
    started = time.perf_counter()
    execute(run, StopRequest())
    note = f"{run.workers} decoding workers, the real pipeline"
    return Measure("end to end" + (f", --decode {decode}" if decode != "cpu" else ""), count, time.perf_counter() - started, note)


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


def run(paths: Sequence[str], options: BenchOptions, describe_inputs: str) -> Iterator[str]:
    """The report, line by line, as each measurement finishes."""
    spec = models.resolve(options.model, options.weights, options.labels_file, templates=options.templates)
    device = choose_device(options.device, JobEnvironment())
    precision = choose_precision(options.precision, device)
    probe(device, precision)
    batch_size = options.batch_size or default_batch_size(device)
    classifier = Classifier(spec, device, precision, 5, embeddings=False, batch_size=batch_size)
    yield f"batch bench: {describe_inputs}; {spec.name} ({spec.weights}) on {device}, {JobEnvironment().cpus()} CPUs"
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as scratch:
        folder = Path(scratch)
        yield "stages, each alone:"
        read, (decoded, paths) = time_read(paths), time_decode(paths, spec)
        checked, left = time_check(paths, spec)
        on_device = time_device_decode(left, spec, device, batch_size) if left and not MISSING else None
        model = time_model(classifier, spec, batch_size)
        for measure in (read, decoded, checked, on_device, model, time_write(spec, batch_size, folder)):
            if measure is not None:
                yield measure.line()
            if measure is checked and left and MISSING:
                yield f"  {ON_DEVICE:<30} not measured: {MISSING}"
        yield "together, in this process (start-up excluded):"
        list_file = write_file_list(paths, folder / "files.txt")
        yield time_end_to_end(list_file, len(paths), options, folder / "end-to-end").line()
        if on_device is not None:  # the same files again, their JPEGs decoded where the model runs
            yield time_end_to_end(list_file, len(paths), options, folder / "end-to-end-gpu", decode="gpu").line()
        yield "suggestion: " + suggest_cpus(decoded, model, device)
        if on_device is not None and device.type == "cuda":
            yield "with --decode gpu: " + suggest_cpus(checked, min(model, on_device, key=lambda measure: measure.rate), device)
