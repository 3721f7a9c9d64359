"""Sources: turn what the user named (folders, files, tars, Parquet files of images, @lists, manifests)
into the inputs of a shard.

A shard is a range of buckets (`paths.bucket_of`), so each source yields only the inputs that hash
into it: manifests from `batch index` by reading just the row groups that hold those buckets,
folders, lists and containers by walking or listing them (each task lists every tar's headers and
walks the whole tree: index big collections once instead).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import stat
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator, TypeVar

import pyarrow as pa

from batch import containers, manifest, transient
from batch.paths import BUCKETS, bucket_of

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
STATS_AHEAD = 64  # a list's names stat-ed ahead of the one being yielded, per thread
LISTINGS_AHEAD = 2  # containers listed ahead of the one being yielded, per process: each holds its members

T = TypeVar("T")

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source the user named cannot be used; the message names it."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_input_name(name: str) -> bool:
    """What a folder walk keeps: images, tars and Parquet files (those of images are read, the others
    skipped by `_expand`), never hidden files (`._x.jpg` from macOS), as WebDataset skips them in tars."""
    return not containers.is_hidden(name) and (is_image_name(name) or is_packed_name(name))


def is_packed_name(name: str) -> bool:
    """A name that may hold images: a tar or a Parquet file."""
    return containers.is_tar_name(name) or name.lower().endswith(containers.PARQUET_EXTENSION)


def check_sources(sources: Iterable[str]) -> None:
    """Fail fast, before anything is created, on a source that does not exist or cannot be read."""
    for source in sources:
        target = source[1:] if source.startswith("@") else source
        if not os.path.lexists(target):
            what = "list file" if source.startswith("@") else "source"
            raise SourceError(f"{what} does not exist: {target}")
        if os.path.isdir(target):
            if not os.access(target, os.R_OK | os.X_OK):
                raise SourceError(f"source directory cannot be read: {target}")
        elif not os.path.exists(target):
            raise SourceError(f"source is a dangling symlink: {target}")
        elif source.startswith("@") or is_parquet_name(target) or containers.is_tar_name(target):
            if not os.access(target, os.R_OK):
                raise SourceError(f"cannot read {target}")
            if is_parquet_name(target):
                _check_parquet(target)
        elif not is_image_name(target):
            raise SourceError(
                f"source is neither a folder, an image, a tar, a @list nor a Parquet file: {target} "
                f"(image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )


def _check_parquet(source: str) -> None:
    """A Parquet source is a manifest or a file of images, decided by its content; say which when both
    could be meant."""
    schema = containers.footer(source)
    kind = containers.parquet_kind(schema)
    if kind is None:
        raise SourceError(
            f"{source} is neither a manifest (a 'path' column) nor a Parquet file of images "
            f"(a binary column named one of {', '.join(containers.IMAGE_COLUMNS)})"
        )
    if kind == "images" and "path" in schema.names:
        log.info("%s has a 'path' column and image bytes in '%s', and no batch.manifest metadata: "
                 "reading its images, not the files its paths name", source, containers.image_column(schema))  # fmt: skip


def is_parquet_name(source: str) -> bool:
    return not source.startswith("@") and source.lower().endswith(containers.PARQUET_EXTENSION) and not os.path.isdir(source)


def is_manifest(source: str) -> bool:
    """A Parquet file of the paths to classify (`containers.parquet_kind`)."""
    return is_parquet_name(source) and _kind(source) == "manifest"


def _kind(path: str) -> str | None:
    return containers.parquet_kind(containers.footer(path))


@dataclass
class Inputs:
    paths: list[str]  # absolute, without duplicates, sorted
    members: dict[str, manifest.Found]  # those inside a tar or Parquet file, by path: where to read them
    listed: set[str] = field(default_factory=set)  # the containers this run listed whole (walks, not manifests)


def gather(sources: Iterable[str], buckets: range = range(BUCKETS)) -> Inputs:
    """The inputs named by the sources that fall in `buckets`, with where the packed ones lie."""
    paths: set[str] = set()
    members: dict[str, manifest.Found] = {}
    listed: set[str] = set()
    for source in sources:
        for item in _in_buckets(source, buckets, listed):
            paths.add(item.path)
            if item.container is not None:
                members[item.path] = item
    return Inputs(sorted(paths), members, listed)


def _in_buckets(source: str, buckets: range, listed: set[str]) -> Iterator[manifest.Found]:
    if is_manifest(source):
        yield from manifest.found_in(manifest.read(source, buckets))
    else:
        yield from (item for item in _expand(source, facts=False, whole=listed) if bucket_of(item.path) in buckets)


def collect(sources: Iterable[str], buckets: range = range(BUCKETS)) -> list[str]:
    """The inputs named by the sources that fall in `buckets`: absolute, without duplicates, sorted."""
    return gather(sources, buckets).paths


def index(sources: Iterable[str], threads: int | None = None, processes: int = 1) -> Iterator[manifest.Found]:
    """Every input of the sources with its size and mtime, as found, for `manifest.write`; manifests are
    refused. Tars and Parquet files of images are listed by `processes` processes at once: a member
    costs about 25 microseconds of one core (its header and its `.json`), 40 minutes for 10^8."""
    counter = manifest.Counter("indexing")
    with _pool(processes, forked=True) as listers:
        for source in sources:
            if is_manifest(source):
                raise SourceError(f"{source} is a manifest already: index the folders it was made from")
            for found in _expand(source, threads, listers=listers, ahead=LISTINGS_AHEAD * processes):
                counter.tick()
                yield found


@contextmanager
def _pool(workers: int, forked: bool = False) -> Iterator[Executor | None]:
    """WORKERS threads, or forked processes, to work in; None (work here and now) for one."""
    if workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context) if forked else ThreadPoolExecutor(workers) as pool:
        if forked:  # a fork-context pool forks every process on its first task: now, before any thread exists
            pool.submit(int).result()
        yield pool


def _expand(source: str, threads: int | None = None, facts: bool = True,
            whole: set[str] | None = None, listers: Executor | None = None, ahead: int = 1) -> Iterator[manifest.Found]:  # fmt: skip
    """The inputs a source names; with `facts`, their size and mtime (which costs a stat each). The images
    inside tars and Parquet files come with their size and place, which their listing gives for free;
    `listers` list them in parallel, AHEAD at a time, in the order found. The containers listed whole
    (without a `CONTAINER/` row) are added to `whole`."""
    if source.startswith("@"):
        found: Iterable[manifest.Found] = read_list(source[1:], threads, facts)
    elif os.path.isdir(source):
        found = manifest.walk(source, is_input_name, threads, facts)
    else:
        found = [manifest.describe(os.path.abspath(source), facts)]
    opened = (_submit(listers, _open, item) if is_packed_name(item.path) else (item, [item]) for item in found)
    inputs, skipped = 0, []
    for item, listed in _in_order(opened, ahead):
        if listed is None:
            skipped.append(item.path)
            continue
        if whole is not None and listed != [item] and all(each.path != f"{item.path}/" for each in listed):
            whole.add(item.path)
        inputs += len(listed)
        yield from listed
    _tell(source, inputs, skipped)


def _open(item: manifest.Found) -> tuple[manifest.Found, list[manifest.Found] | None]:
    """What a found input holds: a container's members, None for a Parquet file without images (passed
    over), or else the input itself."""
    if containers.is_tar_name(item.path) and os.path.isfile(item.path):
        return item, _listing(item.path, partial(containers.list_tar, item.path, is_image_name))
    if is_parquet_name(item.path):
        if _kind(item.path) != "images":
            return item, None
        return item, _listing(item.path, partial(containers.list_image_table, item.path))
    return item, [item]


def _listing(container: str, members: Callable[[], Iterable[manifest.Found]]) -> list[manifest.Found]:
    """A container's members. A listing that fails for a reason outside the file is tried again; one
    that still fails is one row, `CONTAINER/`, whose error is an `io error`, which --retry-failed redoes."""
    try:
        return transient.retried(lambda: list(members()), transient.DEFAULT_RETRIES, f"cannot list {container}")
    except (OSError, pa.ArrowException) as error:
        if not transient.is_transient(error):
            raise
        failure = transient.describe(error, transient.DEFAULT_RETRIES + 1)
        return [manifest.Found(f"{container}/", None, None, container, None, None, None, failure)]


def _submit(pool: Executor | None, work: Callable[..., T], *arguments: object) -> Future[T] | T:
    """WORK done in POOL, or here and now without one."""
    return work(*arguments) if pool is None else pool.submit(work, *arguments)


def _in_order(results: Iterable[Future[T] | T], ahead: int) -> Iterator[T]:
    """The values of RESULTS in their order, with at most AHEAD of them in flight: taken lazily from a
    generator that submits work, it keeps AHEAD pieces busy and memory bounded however many there are."""
    window: deque[Future[T] | T] = deque()
    for result in results:
        window.append(result)
        if len(window) >= ahead:
            yield _value(window.popleft())
    while window:
        yield _value(window.popleft())


def _value(result: Future[T] | T) -> T:
    return result.result() if isinstance(result, Future) else result


def _tell(source: str, inputs: int, skipped: list[str]) -> None:
    """Say what a source held where it could surprise: Parquet files passed over, or nothing at all."""
    if skipped:
        log.info("%s: %d Parquet files without image bytes passed over (manifests, results, or metadata as "
                 "img2dataset writes beside its tars), such as %s; name a manifest as a source to use it",
                 source, len(skipped), skipped[0])  # fmt: skip
    if not inputs:
        log.warning("%s holds no images, tars of images or Parquet files of images (image extensions: %s)",
                    source, ", ".join(sorted(IMAGE_EXTENSIONS)))  # fmt: skip


def read_list(list_file: str, threads: int | None = None, facts: bool = True) -> Iterator[manifest.Found]:
    """One path per line; blank lines and '#' comments are skipped; relative paths are relative to the list.
    Each name costs one stat, which tells a folder and gives a file's facts; on a network file system
    (`manifest.threads_for` the first name's folder) `threads` of them at once, in the list's order."""
    names = _names_in(list_file)
    first = next(names, None)
    if first is None:
        return
    threads = threads or manifest.threads_for(os.path.dirname(first))
    with _pool(threads) as pool:
        stated = (_submit(pool, _stat, name) for name in itertools.chain([first], names))
        for path, info in _in_order(stated, STATS_AHEAD * threads):
            if info is not None and stat.S_ISDIR(info.st_mode):
                yield from manifest.walk(path, is_input_name, threads, facts)
            else:
                yield manifest.found_from(path, info) if facts else manifest.Found(path, None, None)


def _names_in(list_file: str) -> Iterator[str]:
    base = os.path.dirname(os.path.abspath(list_file))
    with open(list_file, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            entry = line.rstrip("\r\n")
            if entry.strip() and not entry.lstrip().startswith("#"):
                yield os.path.abspath(os.path.join(base, entry))


def _stat(path: str) -> tuple[str, os.stat_result | None]:
    try:
        return path, os.stat(path)
    except OSError:
        return path, None
