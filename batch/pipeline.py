"""The classify run: sources -> decode (pool workers) -> model -> writer -> shard commit.

`execute` runs what `plan.plan` checked: it reads this shard's buckets of the sources, skips what has a
row already, and streams the rest through the stages, committing a chunk every `commit_every` seconds.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from batch import commit, sources, transient
from batch.decode import Decoded
from batch.decode_device import JPEG_BYTES_PER_FILE, DeviceDecoder
from batch.inference import IN_FLIGHT, Classifier, Pending
from batch.manifest import Found
from batch.plan import ClassifyOptions, Plan
from batch.pool import DecodePool
from batch.progress import Progress, format_duration
from batch.stopping import EXIT_INTERRUPTED, StopRequest
from batch.writer import ChunkWriter, RowBuilder

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_INPUTS = 3  # finished and committed, but --strict or --max-error-rate was breached
EXIT_OUTPUT_FULL = 74  # EX_IOERR: the output's disk or quota is full; what was committed stays, the rest waits
FULL = (errno.ENOSPC, errno.EDQUOT)
MIN_ROWS_FOR_EARLY_ERROR_RATE = 100
EXAMPLE_ERRORS = 5


@dataclass
class Tally:
    """Errors among this shard's rows: what earlier runs committed, plus this run's."""

    earlier: commit.Committed = commit.Committed()
    processed: int = 0  # by this run
    errors: int = 0
    transient: int = 0  # of the errors, reads that failed for a reason outside the file, every try
    committed: int = 0  # rows this run has made visible
    examples: list[str] = field(default_factory=list)

    def add(self, paths: list[str], items: list[Decoded]) -> int:
        failures = [(path, item.error) for path, item in zip(paths, items) if item.error]
        self.processed += len(items)
        self.errors += len(failures)
        self.transient += sum(error.startswith(f"{transient.KIND}:") for _, error in failures)
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
    todo, earlier = run.output.unfinished(mine, options.retry_failed, inputs.listed)
    redo = len(run.output.retried.where)
    log.info(
        "shard %d of %d (buckets %d-%d): %d inputs, %d already done, %d to classify%s with %s (%s) on %s, %s",
        run.shard.index, run.shard.count, buckets.start, buckets.stop - 1, len(mine), len(mine) - len(todo), len(todo),
        f" ({redo} of them to redo, whose rows failed)" if options.retry_failed else "",
        run.spec.name, run.spec.weights, run.device, run.precision,
    )  # fmt: skip
    if mine and not todo:
        log.info("nothing to classify: every input of this shard already has a row in %s", options.output)
    tally = Tally(earlier)
    try:
        if dropped := run.output.retried.drop_stale():
            log.info("dropped %d failed rows of containers that list whole now: their members are inputs", dropped)
        if todo and not stop.requested:
            _stream(run, todo, inputs.members, tally, stop)
    except OutputFull as full:
        return _output_full(run, tally, full.error)
    except OSError as error:  # dropping rows of containers rewrites parts, outside the writer's thread
        if transient.errno_of(error) not in FULL:
            raise
        return _output_full(run, tally, error)
    if not stop.requested:
        run.output.drop_replaced()  # --overwrite over a shard that had nothing left to write
    return _finish(run, tally, stop, time.monotonic() - started)


def _stream(run: Plan, todo: list[str], members: dict[str, Found], tally: Tally, stop: StopRequest) -> None:
    """Decoded batches go to the model as they come; their answers go to the writer's thread, which
    waits for them: this thread never waits on the GPU, only on the decoders and on the copy of pixels."""
    options = run.options
    # The workers start now, and decode the first batches while the model loads.
    on_device = run.decode == "gpu"
    batches = DecodePool(todo, run.spec.preprocess, run.batch_size, run.workers, pin=run.device.type == "cuda",
                         timeout=options.decode_timeout, members=members, retries=options.io_retries,
                         jpeg_bytes=run.batch_size * JPEG_BYTES_PER_FILE if on_device else 0)  # fmt: skip
    decoder = DeviceDecoder(run.spec.preprocess, run.device) if on_device else None
    writer: _Writer | None = None
    try:
        classifier = Classifier(run.spec, run.device, run.precision, options.topk, options.embeddings, run.batch_size)
        writer = _Writer(run, todo, members, tally)
        for ready in batches:
            pixels = decoder.crops(ready) if decoder is not None else ready.pixels
            writer.put(ready.items, classifier.submit(pixels) if pixels is not None else None)
            if stop.requested or writer.breached:
                break
        writer.finish()
        if decoder is not None and decoder.on_cpu:
            log.info("the JPEG decoder on %s refused %d batches whole and %d files alone; those files were decoded "
                     "on the CPU", run.device, decoder.refused_batches, decoder.on_cpu)  # fmt: skip
    finally:
        batches.close()  # stops the workers now, whether the run ended, broke off or failed
        if writer is not None:
            writer.abandon()


class _Writer(threading.Thread):
    """The writer stage, beside the model: waits for each batch's answers, builds its rows, streams them
    into the staging file and commits every `--commit-every` seconds, so that neither zstd nor an fsync
    on a slow shared file system holds up the GPU. What it raises is raised again by `put` and `finish`."""

    def __init__(self, run: Plan, todo: list[str], members: dict[str, Found], tally: Tally):
        super().__init__(name="batch-writer", daemon=True)
        self.plan, self.todo, self.members, self.tally = run, todo, members, tally
        self.rows = RowBuilder(run.spec.labels, run.options.topk, run.options.embeddings)
        self.metadata = {"identity": run.output.identity, "provenance": run.provenance()}
        self.progress = Progress(len(todo))
        self.work: queue.Queue = queue.Queue(maxsize=IN_FLIGHT)  # a bound: the GPU runs this far ahead
        self.breached = False  # --max-error-rate crossed at a commit: feed no more
        self.failure: BaseException | None = None
        self.ended = False
        self.start()

    def put(self, items: list[Decoded], answers: Pending | None) -> None:
        self._raise_failure()
        self.work.put((items, answers))

    def finish(self) -> None:
        """Commit what is left, and wait for that."""
        self._end(commit=True)
        self._raise_failure()

    def abandon(self) -> None:
        """After a failure elsewhere: the chunk in hand is not committed, and its staging file goes."""
        self._end(commit=False)

    def _end(self, commit: bool) -> None:
        if not self.ended:
            self.ended = True
            self.work.put(commit)
            self.join()
            self.progress.finish()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def run(self) -> None:
        chunk: ChunkWriter | None = None
        options = self.plan.options
        retried = self.plan.output.retried  # --retry-failed: rows that take failed rows' places in their parts
        try:
            while not isinstance(work := self.work.get(), bool):
                items, pending = work
                paths = [self.todo[decoded.index] for decoded in items]
                answers = pending.result() if pending is not None else None
                fresh = retried.take(self.rows.build(paths, items, answers, self.members))
                if fresh.num_rows:
                    chunk = chunk or ChunkWriter(self.plan.output.staging_path(), self.rows.schema, self.metadata)
                    chunk.add(fresh)
                self.progress.update(len(paths), self.tally.add(paths, items))
                if (chunk is not None and chunk.age >= options.commit_every) or retried.due(options.commit_every):
                    self._commit(chunk)
                    chunk = None
                    self.breached = _error_rate_breached(options, self.tally, early=True)
            if work:
                self._commit(chunk)
                chunk = None
        except BaseException as failure:  # noqa: BLE001 - handed to the main thread
            full = isinstance(failure, OSError) and transient.errno_of(failure) in FULL
            self.failure = OutputFull(failure) if full else failure  # this thread's writes are the output's
            while not isinstance(self.work.get(), bool):
                pass  # so that `put` never blocks on a full queue
        finally:
            if chunk is not None:
                chunk.abandon()


    def _commit(self, chunk: ChunkWriter | None) -> None:
        if chunk is not None:
            chunk.close()
            published = self.plan.output.publish(chunk.path)
            self.tally.committed += chunk.rows
            log.debug("committed %d rows to %s", chunk.rows, published)
        redone = self.plan.output.retried.replace()
        if redone:
            self.tally.committed += redone
            log.debug("put %d redone rows in place of failed ones", redone)


class OutputFull(Exception):
    """The output's disk or quota filled while this run wrote it (`error`)."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def _output_full(run: Plan, tally: Tally, error: OSError) -> int:
    """A full disk or quota is no bad input and no reason to requeue (the next allocation meets the same
    full disk): stop, keep every committed part, and say what to do."""
    number = transient.errno_of(error) or errno.ENOSPC
    log.error(
        "the output %s is full (%s: %s): this run committed %d rows before it, and those and every earlier part "
        "are intact; the chunk in hand was dropped and its staging file removed. Free space or raise the quota, "
        "then run the same command again: it goes on where it stopped (exit status %d)",
        run.options.output, errno.errorcode.get(number, number), os.strerror(number), tally.committed,
        EXIT_OUTPUT_FULL,
    )  # fmt: skip
    return EXIT_OUTPUT_FULL


def _error_rate_breached(options: ClassifyOptions, tally: Tally, early: bool = False) -> bool:
    if options.max_error_rate is None or (early and tally.rows < MIN_ROWS_FOR_EARLY_ERROR_RATE):
        return False
    return tally.rate > options.max_error_rate


def _transient_note(tally: Tally) -> str:
    if not tally.transient:
        return ""
    return (f" ({tally.transient} of them '{transient.KIND}': reads that failed every try for a reason outside "
            "the file; once the file system is well, --retry-failed redoes them)")  # fmt: skip


def _finish(run: Plan, tally: Tally, stop: StopRequest, seconds: float) -> int:
    rate = tally.processed / seconds if seconds > 0 else math.nan
    for example in tally.examples:
        log.warning("failed: %s", example)
    log.info(
        "classified %d images, %d failed%s, in %s (%.1f images/s); results in %s",
        tally.processed, tally.errors, _transient_note(tally), format_duration(seconds), rate, run.options.output,
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
