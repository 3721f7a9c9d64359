"""Shard commit: the output directory's state, and the only code that publishes or deletes part files.

Layout: OUT/part-AAAAA-BBBBB-cCCCCCC.parquet, one file per committed chunk of the task that held
buckets A to B-1 (`paths.bucket_of`). A chunk is written as a hidden staging file
(`.part-....parquet.tmp`, invisible to pyarrow, DuckDB, pandas and Polars) and appears by an atomic
rename. A task killed at any moment therefore leaves whole chunks and at most one staging file.

A task locks its bucket range (a POSIX byte-range lock on OUT/.lock, one byte per bucket), so two
tasks whose ranges overlap never write at once, whatever array sizes they came from. What a range
already holds is read from the parts that overlap it, one at a time, so a rerun redoes nothing and
its memory follows the range, not the output.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Collection, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch import mounts, transient
from batch import paths as stored
from batch.paths import BUCKETS
from batch.retry_failed import RetriedRows, RetryFailed
from batch.writer import METADATA_KEY, ROW_GROUP_ROWS, read_record, remove_if_present

log = logging.getLogger(__name__)

PART = re.compile(r"^part-(?P<start>\d{5})-(?P<stop>\d{5})-c(?P<chunk>\d{6,})\.parquet$")
OLD_PART = re.compile(r"^part-\d{5,}-of-\d{5,}-c\d{6,}\.parquet$")  # batch 0.x: contiguous slices
STAGING = re.compile(r"^\.part-(?P<start>\d{5})-(?P<stop>\d{5})-c\d{6,}\.parquet(?P<rewrite>\.\w+\.retry)?\.tmp$")
LOCK_FILE = ".lock"


class OutputError(ValueError):
    """The output directory cannot take this run's results; the message says why and what to do."""


@dataclass(frozen=True)
class Part:
    path: str
    buckets: range
    chunk: int

    def meets(self, buckets: range) -> bool:
        return _overlap(self.buckets, buckets)


def part_name(buckets: range, chunk: int) -> str:
    return f"part-{buckets.start:05d}-{buckets.stop:05d}-c{chunk:06d}.parquet"


def list_parts(root: str) -> list[Part]:
    """The committed parts, in name order; an output of the older layout is refused, not half read."""
    parts = []
    for name in sorted(os.listdir(root)):
        match = PART.match(name)
        if match:
            buckets = range(int(match["start"]), int(match["stop"]))
            parts.append(Part(os.path.join(root, name), buckets, int(match["chunk"])))
        elif OLD_PART.match(name):
            raise OutputError(f"{root} holds {name}, written by an older batch with another layout: use a new output")
    return parts


def check_writable(root: str) -> None:
    """Create OUT if needed and prove we can write there, before the model is loaded. Folders made
    here for a refused output are removed again: a run refused with exit 2 leaves nothing behind."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise OutputError(f"output {root} exists and is not a directory")
    missing = _missing_folders(root)
    try:
        os.makedirs(root, exist_ok=True)
        # A random name: tasks in containers all run as PID 1, so a PID in the name would collide.
        with tempfile.NamedTemporaryFile(dir=root, prefix=".batch-write-test-"):
            pass
    except OSError as error:
        _remove_empty(missing)
        raise OutputError(f"cannot write to the output directory {root}: {error.strerror or error}") from None


def _missing_folders(root: str) -> list[str]:
    """ROOT and those of its parents that do not exist yet, deepest first."""
    missing = []
    folder = os.path.abspath(root)
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _remove_empty(folders: list[str]) -> None:
    """Remove these folders, deepest first, while they are empty (another task may have filled one)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            continue  # never made: makedirs failed below it
        except OSError:
            return


def describe_differences(existing: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = sorted(set(existing) | set(wanted))
    return "; ".join(
        f"{key}: {existing.get(key)!r} there, {wanted.get(key)!r} now" for key in keys if existing.get(key) != wanted.get(key)
    )


@dataclass(frozen=True)
class Committed:
    """What earlier runs committed for a shard's inputs: --strict and --max-error-rate count these too,
    so a requeued or rerun task judges the whole shard, not just its own attempt."""

    rows: int = 0
    errors: int = 0


class OutputDir:
    """One task's view of OUT: what its bucket range already holds, and how it adds more."""

    def __init__(self, root: str, buckets: range, identity: dict[str, Any], job_id: str | None = None):
        self.root = os.path.abspath(root)
        self.buckets = buckets
        self.identity = identity
        self.job_id = job_id  # Slurm's, stable across requeues of one task
        self.next_chunk = 0
        self.replaced: list[Part] = []  # --overwrite: parts to delete just before the first new one appears
        self.retried = RetriedRows(self)  # --retry-failed: failed rows being redone, and where they lie
        self._lock: Any = None
        self._unguarded = False  # said once: a part's rewrite found no lock

    def _claim(self) -> None:
        """Lock one byte per bucket, held until the process exits: a second writer of any of these
        buckets would classify the same new inputs and delete the first's staging file."""
        handle = open(os.path.join(self.root, LOCK_FILE), "a")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB, len(self.buckets), self.buckets.start)
        except (BlockingIOError, PermissionError):
            handle.close()
            raise OutputError(
                f"another process is writing buckets {self.buckets.start}-{self.buckets.stop - 1} of {self.root} "
                "(a task of this or another array); wait for it to end, or choose another output"
            ) from None
        except OSError as error:  # a file system without POSIX locks: Slurm runs one task per shard anyway
            log.warning("%s; going on unguarded", mounts.lock_failure_hint(handle.name, error))
        else:
            if (node_local := mounts.lock_scope_warning(self.root)) is not None:
                log.warning(node_local)
        self._lock = handle

    def prepare(self, overwrite: bool) -> None:
        """Claim the range, check its parts, then clear its dead staging files; with overwrite, mark the
        parts that earlier jobs wrote for replacement, deleting nothing yet."""
        self._claim()
        parts = list_parts(self.root)
        mine = [part for part in parts if part.meets(self.buckets)]
        if overwrite:
            straddling = [part for part in mine if not _within(part.buckets, self.buckets)]
            if straddling:
                raise OutputError(
                    f"--overwrite would delete rows of other shards: {os.path.basename(straddling[0].path)} holds "
                    f"buckets {straddling[0].buckets.start}-{straddling[0].buckets.stop - 1}, this shard "
                    f"{self.buckets.start}-{self.buckets.stop - 1}; overwrite with the earlier number of shards, "
                    "or choose another output"
                )
            self.replaced = [part for part in mine if not self._written_by_this_job(part)]
            mine = [part for part in mine if part not in self.replaced]  # a requeue's own progress stays
            siblings = []
        else:
            siblings = [part for part in parts if not part.meets(self.buckets)][:1]
        for part in mine + siblings:
            self._check_identity(part)
        for name in os.listdir(self.root):  # only now: a refused run leaves the output as it found it
            match = STAGING.match(name)
            staged = range(int(match["start"]), int(match["stop"])) if match else range(0)
            # A new chunk's writer would hold our lock; a part's rewriter holds it only within our range.
            if match and (_within(staged, self.buckets) if match["rewrite"] else _overlap(staged, self.buckets)):
                remove_if_present(os.path.join(self.root, name))
        self.next_chunk = 1 + max((part.chunk for part in parts if part.buckets == self.buckets), default=-1)

    def _written_by_this_job(self, part: Part) -> bool:
        try:
            return self.job_id is not None and read_record(part.path)["provenance"]["slurm_job_id"] == self.job_id
        except (OSError, ValueError, KeyError, pa.ArrowException):
            return False

    def _check_identity(self, part: Part) -> None:
        try:
            existing = read_record(part.path).get("identity", {})
        except (OSError, ValueError, pa.ArrowException) as error:
            raise OutputError(f"cannot read {part.path} ({error}); move it away or pass --overwrite") from None
        if existing != self.identity:
            raise OutputError(
                f"{self.root} holds results of a different configuration ({describe_differences(existing, self.identity)}); "
                "results are never mixed: choose another output or pass --overwrite"
            )

    def unfinished(self, inputs: list[str], retry: RetryFailed | None = None,
                   listed: Collection[str] = ()) -> tuple[list[str], Committed]:  # fmt: skip
        """The inputs without a row yet (and with `retry`, those whose row failed so), and what the rows of
        the others say, reading the overlapping parts one at a time: memory follows the inputs, not the
        output, whatever array size wrote the parts. The inputs to redo come last, by the part holding
        their rows, so that each part is rewritten about once. `listed`: the containers this run listed
        whole, whose failed `CONTAINER/` rows --retry-failed drops."""
        exact = [os.fsencode(path) for path in inputs]
        wanted = set(exact)  # a set built once: Arrow's is_in built a hash table of every input per batch
        done: dict[bytes, bool] = {}  # each name with a row kept: whether that row is an error
        for part in list_parts(self.root) if inputs else []:
            if part.meets(self.buckets) and part not in self.replaced:
                # A part another task renames over while it is read is ESTALE on NFS: read it again.
                for rows in transient.retried(partial(_outcomes, part.path), transient.DEFAULT_RETRIES, part.path):
                    keys = stored.keys(rows)
                    ours = pa.array([key in wanted for key in keys.to_pylist()], pa.bool_())
                    failed = retry.selects(rows.column("error")) if retry else pa.repeat(False, len(keys))
                    redo = pc.and_(ours, failed)
                    kept = pc.and_not(ours, redo)
                    errors = pc.is_valid(rows.column("error"))
                    done.update(zip(pc.filter(keys, kept).to_pylist(), pc.filter(errors, kept).to_pylist()))
                    self.retried.where.update(dict.fromkeys(pc.filter(keys, redo).to_pylist(), part.path))
                    self._find_stale(part, pc.filter(keys, pc.and_not(failed, ours)), listed)
        where = self.retried.where
        todo = [path for path, name in zip(inputs, exact) if name not in done and name not in where]
        todo += sorted((path for path, name in zip(inputs, exact) if name in where), key=lambda path: where[os.fsencode(path)])
        return todo, Committed(rows=len(done), errors=sum(done.values()))

    def staging_path(self) -> str:
        return os.path.join(self.root, f".{part_name(self.buckets, self.next_chunk)}.tmp")

    def publish(self, staging: str) -> str:
        """Atomically make a closed, fsynced staging file a visible part; the directory entry is synced too.
        Parts that --overwrite replaces go just before the first new one: a run that fails before it can
        write (a corrupt weights file, a stop while the model loads) leaves the old results whole."""
        self.drop_replaced()
        final = os.path.join(self.root, part_name(self.buckets, self.next_chunk))
        os.replace(staging, final)
        _sync_directory(self.root)
        self.next_chunk += 1
        return final

    def _find_stale(self, part: Part, failed: pa.Array, listed: Collection[str]) -> None:
        """Of the names of failed rows that are no input now, those of this range named `CONTAINER/` of a
        container this run listed whole: its listing failed before, and its members are inputs now.
        --retry-failed drops them."""
        for key in failed.to_pylist():
            name = os.fsdecode(key)
            if name.endswith("/") and name[:-1] in listed and stored.bucket_of(name) in self.buckets:
                self.retried.stale[key] = part.path

    def rewrite(self, part: str, rows: pa.Table | None, dropped: Iterable[bytes] = ()) -> None:
        """Rewrite PART with ROWS in place of the rows of the same names (and without the DROPPED ones),
        renamed over itself: a reader sees the old part or the new one, never both rows of a name and
        never neither. Under a lock of the part's buckets (a second bank of bytes in OUT/.lock), since a
        part written by an array of another size may hold a sibling task's rows, which it may be redoing."""
        match = PART.match(os.path.basename(part))
        assert match, part
        with self._locked(BUCKETS + int(match["start"]), int(match["stop"]) - int(match["start"])):
            source = pq.ParquetFile(part)
            record = read_record(part)
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            dropped = list(dropped)
            redone = {"at": now, "rows": rows.num_rows if rows else 0, "dropped": len(dropped), "slurm_job_id": self.job_id}
            record["retried"] = [*record.get("retried", []), redone]
            schema = source.schema_arrow.remove_metadata()
            names = pa.array((stored.keys(rows).to_pylist() if rows else []) + dropped, pa.binary())
            # A name of its own: were the lock not there, two rewriters would not write into one file.
            descriptor, staging = tempfile.mkstemp(dir=self.root, prefix=f".{os.path.basename(part)}.", suffix=".retry.tmp")
            os.close(descriptor)
            try:
                errors = 0
                with pq.ParquetWriter(staging, schema, compression="zstd") as writer:
                    for batch in source.iter_batches(batch_size=ROW_GROUP_ROWS):
                        kept = batch.filter(pc.invert(pc.is_in(stored.keys(batch), value_set=names)))
                        errors += kept.num_rows - kept.column("error").null_count
                        if kept.num_rows:
                            writer.write_batch(kept)
                    if rows:
                        errors += rows.num_rows - rows.column("error").null_count
                        writer.write_table(rows.select(schema.names).cast(schema))
                    if "chunk" in record:
                        record["chunk"]["errors"] = errors
                    writer.add_key_value_metadata({METADATA_KEY: json.dumps(record, sort_keys=True).encode()})
                with open(staging, "rb+") as handle:
                    os.fsync(handle.fileno())
            except BaseException:
                remove_if_present(staging)  # a full disk: the part stays as it was
                raise
            os.replace(staging, part)
            _sync_directory(self.root)

    @contextmanager
    def _locked(self, start: int, length: int) -> Iterator[None]:
        """Wait for the bytes START to START+LENGTH of OUT/.lock; without POSIX locks (warned of when the
        range was claimed), go on unguarded."""
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX, length, start)
        except (OSError, TypeError, ValueError) as error:  # no locks here, or no lock file (never claimed)
            if self._lock is not None and not self._unguarded:
                self._unguarded = True
                log.warning("%s; rewriting parts unguarded", mounts.lock_failure_hint(self._lock.name, error))
            yield
            return
        try:
            yield
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN, length, start)

    def drop_replaced(self) -> None:
        """Delete the parts --overwrite replaces (at the first publish, or at the end of a run with none)."""
        for part in self.replaced:
            remove_if_present(part.path)
        self.replaced = []


def _sync_directory(root: str) -> None:
    """After a rename: the directory entry must reach the disk too."""
    directory = os.open(root, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _overlap(one: range, other: range) -> bool:
    return one.start < other.stop and other.start < one.stop


def _within(inner: range, outer: range) -> bool:
    return outer.start <= inner.start and inner.stop <= outer.stop


def _outcomes(part: str) -> list[pa.RecordBatch]:
    """A part's names and errors: one chunk's worth, read whole, so that a read that fails midway is
    read again from the start."""
    handle = pq.ParquetFile(part)
    columns = [name for name in ("path", "path_bytes", "error") if name in handle.schema_arrow.names]
    return list(handle.iter_batches(batch_size=65_536, columns=columns))
