"""Sources: turn what the user named (folders, files, tars, Parquet files of images, @lists, manifests)
into the inputs of a shard.

A shard is a range of buckets (`paths.bucket_of`), so each source yields only the inputs that hash
into it: manifests from `batch index` by reading just the row groups that hold those buckets,
folders, lists and containers by walking or listing them (each task lists every tar's headers and
walks the whole tree: index big collections once instead).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator

import pyarrow as pa

from batch import containers, manifest, transient
from batch.paths import BUCKETS, bucket_of

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source the user named cannot be used; the message names it."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_input_name(name: str) -> bool:
    """What a folder walk keeps: images, tars and Parquet files (those of images are read, the others
    skipped by `_expand`), never hidden files (`._x.jpg` from macOS), as WebDataset skips them in tars."""
    packed = containers.is_tar_name(name) or name.lower().endswith(containers.PARQUET_EXTENSION)
    return not containers.is_hidden(name) and (is_image_name(name) or packed)


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


def index(sources: Iterable[str], threads: int | None = None) -> Iterator[manifest.Found]:
    """Every input of the sources with its size and mtime, as found, for `manifest.write`; manifests are
    refused."""
    counter = manifest.Counter("indexing")
    for source in sources:
        if is_manifest(source):
            raise SourceError(f"{source} is a manifest already: index the folders it was made from")
        for found in _expand(source, threads):
            counter.tick()
            yield found


def _expand(source: str, threads: int | None = None, facts: bool = True,
            whole: set[str] | None = None) -> Iterator[manifest.Found]:  # fmt: skip
    """The inputs a source names; with `facts`, their size and mtime (which costs a stat each). The images
    inside tars and Parquet files come with their size and place, which their listing gives for free.
    The containers listed whole (without a `CONTAINER/` row) are added to `whole`."""
    if source.startswith("@"):
        found: Iterable[manifest.Found] = read_list(source[1:], threads, facts)
    elif os.path.isdir(source):
        found = manifest.walk(source, is_input_name, threads, facts)
    else:
        found = [manifest.describe(os.path.abspath(source), facts)]
    inputs, skipped = 0, []
    for item in found:
        if containers.is_tar_name(item.path) and os.path.isfile(item.path):
            listed = _listing(item.path, partial(containers.list_tar, item.path, is_image_name), whole)
        elif is_parquet_name(item.path):
            if _kind(item.path) != "images":
                skipped.append(item.path)
                continue
            listed = _listing(item.path, partial(containers.list_image_table, item.path), whole)
        else:
            listed = [item]
        for each in listed:
            inputs += 1
            yield each
    _tell(source, inputs, skipped)


def _listing(container: str, members: Callable[[], Iterable[manifest.Found]],
             whole: set[str] | None = None) -> list[manifest.Found]:  # fmt: skip
    """A container's members, and `container` added to `whole` when they are all there. A listing that
    fails for a reason outside the file is tried again; one that still fails is one row, `CONTAINER/`,
    whose error is an `io error`, which --retry-failed redoes."""
    try:
        listed = transient.retried(lambda: list(members()), transient.DEFAULT_RETRIES, f"cannot list {container}")
    except (OSError, pa.ArrowException) as error:
        if not transient.is_transient(error):
            raise
        failure = transient.describe(error, transient.DEFAULT_RETRIES + 1)
        return [manifest.Found(f"{container}/", None, None, container, None, None, None, failure)]
    if whole is not None and all(found.path != f"{container}/" for found in listed):
        whole.add(container)
    return listed


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
    """One path per line; blank lines and '#' comments are skipped; relative paths are relative to the list."""
    base = os.path.dirname(os.path.abspath(list_file))
    with open(list_file, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            entry = line.rstrip("\r\n")
            if not entry.strip() or entry.lstrip().startswith("#"):
                continue
            path = os.path.abspath(os.path.join(base, entry))
            try:  # one stat tells a folder and gives a file's facts: on Lustre each is a server's answer
                info: os.stat_result | None = os.stat(path)
            except OSError:
                info = None
            if info is not None and stat.S_ISDIR(info.st_mode):
                yield from manifest.walk(path, is_input_name, threads, facts)
            else:
                yield manifest.found_from(path, info) if facts else manifest.Found(path, None, None)
