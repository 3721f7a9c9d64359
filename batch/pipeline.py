"""The classify run: sources -> decode (pool workers) -> model -> writer -> shard commit.

`plan` checks everything that can be wrong with the arguments, cheapest first, and creates nothing
but the output directory (and that only after every other argument is known to be usable, and never
left behind when it cannot be written); last, it reads what earlier runs of this shard finished there,
refusing results of another configuration.
`execute` then reads this shard's buckets of the sources, skips what has a row already, and streams the
rest through the stages, committing a chunk every `commit_every` seconds.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision

import batch
from batch import commit, models, sources
from batch.decode import Decoded
from batch.environment import JobEnvironment, Shard
from batch.inference import Classifier, choose_device, choose_precision, device_name
from batch.manifest import Found
from batch.paths import BUCKETS
from batch.pool import DecodePool
from batch.progress import Progress, format_duration
from batch.stopping import EXIT_INTERRUPTED, StopRequest
from batch.weights import DEFAULT_WEIGHTS
from batch.writer import ChunkWriter, RowBuilder

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_INPUTS = 3  # finished and committed, but --strict or --max-error-rate was breached
MIN_ROWS_FOR_EARLY_ERROR_RATE = 100
EXAMPLE_ERRORS = 5


@dataclass(frozen=True)
class ClassifyOptions:
    sources: tuple[str, ...]
    output: str
    model: str = models.DEFAULT_MODEL
    weights: str = DEFAULT_WEIGHTS
    labels_file: str | None = None
    overrides: models.PreprocessOverrides = models.PreprocessOverrides()
    topk: int = 5
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    shard: Shard | None = None
    embeddings: bool = False
    overwrite: bool = False
    strict: bool = False
    max_error_rate: float | None = None
    commit_every: float = 60.0
    decode_timeout: float = 300.0


@dataclass
class Plan:
    options: ClassifyOptions
    spec: models.ModelSpec
    device: torch.device
    precision: str
    shard: Shard
    workers: int
    batch_size: int
    env: JobEnvironment
    output: commit.OutputDir

    def provenance(self) -> dict[str, Any]:
        return {
            "batch_version": batch.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "weights_file": self.spec.weights_file,
            "untrained": self.spec.untrained,
            "labels": self.spec.labels,
            "device": str(self.device),
            "device_name": device_name(self.device),
            "precision": self.precision,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "host": self.env.host,
            "slurm_job_id": self.env.job_id,
            "slurm_array_job_id": self.env.array_job_id,
            "slurm_array_task_id": self.env.array_task_id,
            "image_version": self.env.image_version,
            "shard": {"index": self.shard.index, "count": self.shard.count,
                      "buckets": [self.shard.buckets.start, self.shard.buckets.stop]},  # fmt: skip
        }


def plan(options: ClassifyOptions, env: JobEnvironment) -> Plan:
    """Validate the arguments before any work; raises a ValueError subclass naming what is wrong."""
    if options.topk < 1:
        raise ValueError(f"--topk must be at least 1, not {options.topk}")
    if options.max_error_rate is not None and not 0 <= options.max_error_rate <= 1:
        raise ValueError(f"--max-error-rate is a fraction between 0 and 1, not {options.max_error_rate}")
    sources.check_sources(options.sources)
    spec = models.resolve(options.model, options.weights, options.labels_file, options.overrides)
    if options.embeddings and not spec.supports_embeddings:
        raise ValueError(f"--embeddings is not available for {spec.name}: a model file hides its layers")
    device = choose_device(options.device)
    precision = choose_precision(options.precision, device)
    shard = options.shard or env.shard() or Shard(0, 1)
    workers = env.cpus() if options.workers is None else options.workers
    if workers < 0:
        raise ValueError(f"--workers must be 0 (decode in the main process) or more, not {workers}")
    batch_size = options.batch_size or default_batch_size(device)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {batch_size}")
    commit.check_writable(options.output)
    output = commit.OutputDir(options.output, shard.buckets, identity(spec, options.topk, options.embeddings), env.job_id)
    output.prepare(options.overwrite)
    return Plan(options, spec, device, precision, shard, workers, batch_size, env, output)


def identity(spec: models.ModelSpec, topk: int, embeddings: bool) -> dict[str, Any]:
    """What every part of one output must share: the model's answers, their shape, and the bucket layout."""
    return {**spec.identity(), "topk": topk, "embeddings": embeddings, "buckets": BUCKETS}


def default_batch_size(device: torch.device) -> int:
    """256 on a GPU. 32 on CPU: a float batch of 64 (38 MB) is past glibc's largest mmap threshold, so
    every batch was mapped and faulted in afresh (1.5 s of system time on 1500 images, two cores)."""
    return 256 if device.type == "cuda" else 32


@dataclass
class Tally:
    """Errors among this shard's rows: what earlier runs committed, plus this run's."""

    earlier: commit.Committed = commit.Committed()
    processed: int = 0  # by this run
    errors: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, paths: list[str], items: list[Decoded]) -> int:
        failures = [(path, item.error) for path, item in zip(paths, items) if item.error]
        self.processed += len(items)
        self.errors += len(failures)
        room = EXAMPLE_ERRORS - len(self.examples)
        self.examples.extend(f"{path}: {error}" for path, error in failures[: max(room, 0)])
        return len(failures)

    @property
    def rows(self) -> int:
        return self.earlier.rows + self.processed

    @property
    def failed(self) -> int:
        return self.earlier.errors + self.errors

    @property
    def rate(self) -> float:
        return self.failed / self.rows if self.rows else 0.0


def execute(run: Plan, stop: StopRequest) -> int:
    options = run.options
    started = time.monotonic()
    buckets = run.shard.buckets
    inputs = sources.gather(options.sources, buckets)
    mine = inputs.paths
    todo, earlier = run.output.unfinished(mine)
    log.info(
        "shard %d of %d (buckets %d-%d): %d inputs, %d already done, %d to classify with %s (%s) on %s, %s",
        run.shard.index, run.shard.count, buckets.start, buckets.stop - 1, len(mine), len(mine) - len(todo), len(todo),
        run.spec.name, run.spec.weights, run.device, run.precision,
    )  # fmt: skip
    if mine and not todo:
        log.info("nothing to classify: every input of this shard already has a row in %s", options.output)
    tally = Tally(earlier)
    if todo and not stop.requested:
        _stream(run, todo, inputs.members, tally, stop)
    if not stop.requested:
        run.output.drop_replaced()  # --overwrite over a shard that had nothing left to write
    return _finish(run, tally, stop, time.monotonic() - started)


def _stream(run: Plan, todo: list[str], members: dict[str, Found], tally: Tally, stop: StopRequest) -> None:
    options, output = run.options, run.output
    # The workers start now, and decode the first batches while the model loads.
    batches = DecodePool(todo, run.spec.preprocess, run.batch_size, run.workers, pin=run.device.type == "cuda",
                         timeout=options.decode_timeout, members=members)  # fmt: skip
    progress = Progress(len(todo))
    chunk: ChunkWriter | None = None
    try:
        classifier = Classifier(run.spec, run.device, run.precision, options.topk, options.embeddings)
        rows = RowBuilder(run.spec.labels, options.topk, options.embeddings)
        metadata = {"identity": output.identity, "provenance": run.provenance()}
        for item in batches:
            answers = classifier.predict(item.pixels) if item.pixels is not None else None
            paths = [todo[decoded.index] for decoded in item.items]
            chunk = chunk or ChunkWriter(output.staging_path(), rows.schema, metadata)
            chunk.add(rows.build(paths, item.items, answers, members))
            progress.update(len(paths), tally.add(paths, item.items))
            if stop.requested or chunk.age >= options.commit_every:
                _commit(chunk, output)
                chunk = None
                if stop.requested or _error_rate_breached(options, tally, early=True):
                    break
        if chunk is not None:
            _commit(chunk, output)
            chunk = None
    finally:
        batches.close()  # stops the workers now, whether the run ended, broke off or failed
        if chunk is not None:
            chunk.abandon()
        progress.finish()


def _commit(chunk: ChunkWriter, output: commit.OutputDir) -> None:
    chunk.close()
    published = output.publish(chunk.path)
    log.debug("committed %d rows to %s", chunk.rows, published)


def _error_rate_breached(options: ClassifyOptions, tally: Tally, early: bool = False) -> bool:
    if options.max_error_rate is None or (early and tally.rows < MIN_ROWS_FOR_EARLY_ERROR_RATE):
        return False
    return tally.rate > options.max_error_rate


def _finish(run: Plan, tally: Tally, stop: StopRequest, seconds: float) -> int:
    rate = tally.processed / seconds if seconds > 0 else math.nan
    for example in tally.examples:
        log.warning("failed: %s", example)
    log.info(
        "classified %d images, %d failed, in %s (%.1f images/s); results in %s",
        tally.processed, tally.errors, format_duration(seconds), rate, run.options.output,
    )  # fmt: skip
    if tally.earlier.rows:
        log.info("with the %d rows earlier runs committed, this shard has %d rows, %d of them failed",
                 tally.earlier.rows, tally.rows, tally.failed)  # fmt: skip
    breached = _error_rate_breached(run.options, tally)
    if breached:
        log.error("error rate %.1f%% of this shard's %d rows is above --max-error-rate %.1f%%",
                  100 * tally.rate, tally.rows, 100 * run.options.max_error_rate)  # fmt: skip
    if stop.requested:  # before any other status: Slurm requeues on 75 only, and the rest must be done
        log.warning("stopped by %s: progress is committed; run the same command again to go on", stop.signal_name)
        return EXIT_INTERRUPTED
    if breached:
        return EXIT_BAD_INPUTS
    if run.options.strict and tally.failed:
        log.error("--strict: %d inputs of this shard could not be classified (their rows are written, with the error)", tally.failed)
        return EXIT_BAD_INPUTS
    return EXIT_OK
