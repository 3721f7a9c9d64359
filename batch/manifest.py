"""Manifests: the inputs of a tree written once, laid out so an array task reads only its own buckets.

`batch index` walks the tree, with many threads on a network file system (each `stat` is a round
trip there, and threads overlap them), and writes path, size, mtime and bucket, sorted by bucket then path,
in row groups of `ROW_GROUP_ROWS`. A task reads the footer, picks the row groups whose bucket
statistics meet its range and reads those alone: its memory and start-up follow its share, not the
tree. The key-value metadata `batch.manifest` says a file is laid out so; any other Parquet file with
a `path` column still works, but every task then reads all of it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch import paths as stored
from batch import spill
from batch.paths import BUCKETS, bucket_of

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 65_536
SPILL_ROWS = 500_000  # inputs held as Python objects at once while indexing: 0.15 GB of names, 0.3 GB of tar members
LAYOUT_KEY = b"batch.manifest"
LAYOUT = {"version": 2, "buckets": BUCKETS, "sorted_by": ["bucket", "path"]}
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("path_bytes", pa.binary()),
        ("bucket", pa.uint16()),
        ("size", pa.int64()),
        ("mtime", pa.timestamp("ns", tz="UTC")),
        ("member", pa.binary()),  # inside a tar or Parquet file: the name after `CONTAINER/`; null for files
        ("offset", pa.int64()),  # where the member is: its data's byte offset in a tar, its row in a Parquet file
        ("key", pa.string()),  # WebDataset / img2dataset key
        ("url", pa.string()),
        ("error", pa.string()),  # why a container could not be read whole, on its own `CONTAINER/` row
    ],
    metadata={LAYOUT_KEY: json.dumps(LAYOUT, sort_keys=True).encode()},
)
NETWORK_THREADS = 32
NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "glusterfs", "fuse.")
PROGRESS_SECONDS = 10.0


class ManifestError(ValueError):
    """A manifest cannot be read; the message names it."""


# --- walking -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    path: str
    size: int | None  # None: not a regular file (dangling symlink, FIFO...), which still gets a row
    mtime_ns: int | None
    container: str | None = None  # the tar or Parquet file holding this input (`containers.py`)
    offset: int | None = None
    key: str | None = None
    url: str | None = None
    error: str | None = None

    @property
    def member(self) -> bytes | None:
        """The exact name of the input inside its container."""
        return None if self.container is None else os.fsencode(self.path)[len(os.fsencode(self.container)) + 1 :]


@dataclass
class _Folder:
    files: list[Found] = field(default_factory=list)
    folders: list[tuple[str, tuple[int, int]]] = field(default_factory=list)  # path, (device, inode)


def threads_for(folder: str) -> int:
    """NETWORK_THREADS on a network file system, where every stat waits a round trip and threads overlap
    them; 1 on a local one, where stats come from memory and threads only contend for the interpreter
    (one million files on this machine's disk: 8.9 s with one thread, 28 s with 32)."""
    return NETWORK_THREADS if file_system_of(folder).startswith(NETWORK_FILE_SYSTEMS) else 1


def file_system_of(folder: str, mount_table: str = "/proc/self/mounts") -> str:
    """The type of the mount holding `folder` ("" where the mount table cannot be read)."""
    target, best, kind = os.path.realpath(folder), "", ""
    try:
        with open(mount_table, encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                point = fields[1].replace("\\040", " ") if len(fields) > 2 else ""
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def walk(root: str, is_input: Callable[[str], bool], threads: int | None = None, facts: bool = True) -> Iterator[Found]:
    """Every input below root, following symlinked folders but never into a loop; folders are listed,
    and with `facts` their files stat-ed for size and mtime, by `threads` threads at once (default:
    `threads_for` the root). Without `facts` a file costs no stat. Order is not defined: callers sort."""
    root = os.path.abspath(root)
    threads = threads or threads_for(root)
    try:
        top = os.stat(root)
    except OSError:
        return
    seen = {(top.st_dev, top.st_ino)}
    done: queue.SimpleQueue[Future[_Folder]] = queue.SimpleQueue()
    with ThreadPoolExecutor(threads, thread_name_prefix="walk") as pool:
        pending = 1
        pool.submit(_list_folder, root, is_input, facts).add_done_callback(done.put)
        while pending:
            folder = done.get().result()
            pending -= 1
            yield from folder.files
            for path, identity in folder.folders:
                if identity not in seen:
                    seen.add(identity)
                    pending += 1
                    pool.submit(_list_folder, path, is_input, facts).add_done_callback(done.put)


def _list_folder(folder: str, is_input: Callable[[str], bool], facts: bool) -> _Folder:
    listed = _Folder()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return listed  # an unreadable sub-folder has no names to report
    for entry in entries:
        if _is_folder(entry):
            try:
                info = entry.stat()  # follows symlinks: its identity guards against loops
            except OSError:
                continue
            listed.folders.append((entry.path, (info.st_dev, info.st_ino)))
        elif is_input(entry.name):
            listed.files.append(describe(entry.path, facts))
    return listed


def _is_folder(entry: os.DirEntry) -> bool:
    """From the directory entry's own type where the file system gives one: a stat only for symlinks."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def found_from(path: str, info: os.stat_result | None) -> Found:
    """The input at PATH from its stat, or from None where the stat failed."""
    if info is None:  # dangling symlink: its own mtime still says when it changed
        try:
            return Found(path, None, os.lstat(path).st_mtime_ns)
        except OSError:
            return Found(path, None, None)
    return Found(path, info.st_size if stat.S_ISREG(info.st_mode) else None, info.st_mtime_ns)


def describe(path: str, facts: bool = True) -> Found:
    """One input; with `facts` its size and mtime (a stat each), else the name alone."""
    if not facts:
        return Found(path, None, None)
    try:
        return found_from(path, os.stat(path))
    except OSError:
        return found_from(path, None)


class Counter:
    """Logs how many inputs a long walk has found, every PROGRESS_SECONDS."""

    def __init__(self, what: str, interval: float = PROGRESS_SECONDS):
        self.what, self.interval, self.count, self.started = what, interval, 0, time.monotonic()
        self._last = self.started

    def tick(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.info("%s: %d inputs so far, %.0f/s", self.what, self.count, self.count / (now - self.started))


# --- writing and reading -------------------------------------------------------------------------


@contextmanager
def _atomically(output: str) -> Iterator[Path]:
    """A staging name to write, renamed onto `output` once whole: a half-written manifest never exists."""
    target = Path(output)
    staging = target.with_name(f".{target.name}.tmp")
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def write(found: Iterable[Found], output: str, budget: spill.Budget | None = None) -> int:
    """Write the inputs FOUND as a laid-out manifest at OUTPUT; how many rows (a file named by two
    sources keeps one, the first found). Memory does not grow with the count: the names are spilled
    to Parquet SPILL_ROWS at a time, DuckDB sorts them out of core within the BUDGET, and the sorted
    rows are streamed into the manifest a row group at a time."""
    budget = budget or spill.Budget.of()
    with budget.folder_of_its_own("batch-index-") as folder, _atomically(output) as staging:
        chunks = _spill(found, folder, budget)
        with pq.ParquetWriter(staging, SCHEMA, compression="zstd") as writer:
            if not chunks:
                writer.write_table(SCHEMA.empty_table())
                return 0
            with budget.connect() as connection:
                ordered = connection.sql(
                    "SELECT * FROM read_parquet($chunks) ORDER BY bucket, exact, found", params={"chunks": chunks}
                )
                return _write_once_each(spill.arrow_reader(ordered, ROW_GROUP_ROWS), writer)


def _spill(found: Iterable[Found], folder: str, budget: spill.Budget) -> list[str]:
    """FOUND as Parquet files in FOLDER of SPILL_ROWS rows each, with each row's exact name (`exact`)
    and place in FOUND (`found`); mtime as integer nanoseconds, which DuckDB would round to microseconds."""
    chunks: list[str] = []
    items = iter(found)
    first = 0
    while chunk := list(itertools.islice(items, SPILL_ROWS)):
        names = [item.path for item in chunk]
        table = pa.table({
            **stored.path_columns(names),
            "bucket": pa.array([bucket_of(name) for name in names], pa.uint16()),
            "size": pa.array([item.size for item in chunk], pa.int64()),
            "mtime": pa.array([item.mtime_ns for item in chunk], pa.int64()),
            "member": pa.array([item.member for item in chunk], pa.binary()),
            **{name: pa.array([getattr(item, name) for item in chunk], SCHEMA.field(name).type)
               for name in ("offset", "key", "url", "error")},
            "found": pa.array(range(first, first + len(chunk)), pa.int64()),
        })  # fmt: skip
        chunks.append(os.path.join(folder, f"{len(chunks)}.parquet"))
        try:
            pq.write_table(table.append_column("exact", stored.keys(table)), chunks[-1], compression="lz4")
        except OSError as error:
            raise budget.cannot_spill(error) from None
        first += len(chunk)
    return chunks


def _write_once_each(ordered: pa.RecordBatchReader, writer: pq.ParquetWriter) -> int:
    """The sorted rows into WRITER in row groups of ROW_GROUP_ROWS, each exact name once; how many."""
    pending: list[pa.Table] = []
    held = written = 0
    last: pa.Scalar | None = None
    for batch in ordered:
        exact = batch.column("exact")
        differs = pc.not_equal(exact.slice(1), exact.slice(0, len(batch) - 1))
        head = pa.array([last is None or not last.equals(exact[0])]) if len(batch) else pa.array([], pa.bool_())
        kept = pa.Table.from_batches([batch]).filter(pa.concat_arrays([head, differs]))
        if len(batch):
            last = exact[len(batch) - 1]
        table = kept.select(SCHEMA.names).cast(SCHEMA)  # mtime: integer nanoseconds to the timestamp
        pending.append(table)
        held += table.num_rows
        while held >= ROW_GROUP_ROWS:
            whole = pa.concat_tables(pending)
            writer.write_table(whole.slice(0, ROW_GROUP_ROWS))
            pending, held = [whole.slice(ROW_GROUP_ROWS)], whole.num_rows - ROW_GROUP_ROWS
            written += ROW_GROUP_ROWS
    if held or not written:
        writer.write_table(pa.concat_tables(pending) if pending else SCHEMA.empty_table())
    return written + held


def copy_rows(manifest: str, rows: Iterable[np.ndarray] | None, output: str) -> int:
    """Rows `rows` of a laid-out manifest into a new one, one row group at a time; how many. `rows` are
    row numbers in ascending order, in arrays of any length (None for all), so memory is that of a row
    group and an array whatever the count."""
    source = pq.ParquetFile(manifest)
    batches = iter(rows) if rows is not None else None
    held = np.empty(0, np.int64)
    copied, first = 0, 0
    schema = source.schema_arrow  # as it was written: a manifest of an earlier version lacks the member columns
    with _atomically(output) as staging, pq.ParquetWriter(staging, schema, compression="zstd") as writer:
        for group in range(source.num_row_groups):
            end = first + source.metadata.row_group(group).num_rows
            if batches is None:
                writer.write_table(source.read_row_group(group))
                copied, first = copied + end - first, end
                continue
            while not (held.size and held[-1] >= end) and (more := next(batches, None)) is not None:
                held = np.concatenate([held, np.asarray(more, np.int64)])
            cut = int(np.searchsorted(held, end))
            if cut:
                writer.write_table(source.read_row_group(group).take(held[:cut] - first))
                copied += cut
            held, first = held[cut:], end
        if not copied:
            writer.write_table(schema.empty_table())
    return copied


def is_laid_out(schema: pa.Schema) -> bool:
    """Whether the file was written by `batch index` for this bucket count, so row groups can be skipped."""
    raw = (schema.metadata or {}).get(LAYOUT_KEY)
    try:
        return raw is not None and json.loads(raw).get("buckets") == BUCKETS and "bucket" in schema.names
    except ValueError:
        return False


def _open(manifest: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(manifest)
    except (OSError, pa.ArrowException) as error:
        raise ManifestError(f"{manifest} is not a readable Parquet manifest: {error}") from None


READ_COLUMNS = ("path", "path_bytes", "member", "offset", "size", "key", "url", "error")


def read(manifest: str, buckets: range = range(BUCKETS)) -> pa.Table:
    """The manifest's rows in `buckets` (path and path_bytes, and where a member lies in its container),
    reading only the row groups that hold them."""
    handle = _open(manifest)
    schema = handle.schema_arrow
    if "path" not in schema.names:
        raise ManifestError(f"{manifest} has no 'path' column; write manifests with `batch index`")
    members = "member" in schema.names  # written by `batch index` since it reads containers
    columns = [name for name in (READ_COLUMNS if members else ("path", "path_bytes")) if name in schema.names]
    everything = buckets == range(BUCKETS)
    if everything or not is_laid_out(schema):
        if not everything:
            log.warning("%s was not written by `batch index`: every task reads all of it", manifest)
        table = handle.read(columns=columns)
        if everything:
            return table
        wanted = [bucket_of(name) in buckets for name in stored.from_columns(table)]
        return table.filter(pa.array(wanted, pa.bool_()))
    groups = _row_groups_meeting(handle.metadata, schema.get_field_index("bucket"), buckets)
    table = handle.read_row_groups(groups, columns=[*columns, "bucket"]) if groups else SCHEMA.empty_table()
    bucket = table.column("bucket")
    inside = pc.and_(pc.greater_equal(bucket, buckets.start), pc.less(bucket, buckets.stop))
    return table.filter(inside).select(columns)


def found_in(table: pa.Table) -> Iterator[Found]:
    """The inputs of rows `read` returned, with their place in a container where they have one."""
    paths = stored.from_columns(table)
    if "member" not in table.schema.names:
        yield from (Found(path, None, None) for path in paths)
        return
    facts = zip(*(table.column(name).to_pylist() for name in ("member", "offset", "size", "key", "url", "error")))
    for path, (member, offset, size, key, url, error) in zip(paths, facts):
        if member is None:
            yield Found(path, None, None)
        else:
            container = os.fsdecode(os.fsencode(path)[: -len(member) - 1])
            yield Found(path, size, None, container, offset, key, url, error)


def check_laid_out(manifest: str) -> None:
    if not is_laid_out(_open(manifest).schema_arrow):
        raise ManifestError(f"{manifest} was not written by this version of `batch index`: index the tree again")


def _row_groups_meeting(metadata: pq.FileMetaData, column: int, buckets: range) -> list[int]:
    groups = []
    for index in range(metadata.num_row_groups):
        statistics = metadata.row_group(index).column(column).statistics
        if statistics is None or not statistics.has_min_max:
            groups.append(index)
        elif statistics.min < buckets.stop and statistics.max >= buckets.start:
            groups.append(index)
    return groups
