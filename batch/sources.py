"""Sources: turn what the user named (folders, files, @lists, manifests) into the inputs of a shard.

A shard is a range of buckets (`paths.bucket_of`), so each source yields only the inputs that hash
into it: manifests from `batch index` by reading just the row groups that hold those buckets,
folders and lists by walking them (each task walks the whole tree: index big trees once instead).
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import pyarrow as pa

from batch import manifest
from batch import paths as stored
from batch.paths import BUCKETS, bucket_of

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class SourceError(ValueError):
    """A source the user named cannot be used; the message names it."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


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
        elif source.startswith("@") or is_manifest(target):
            if not os.access(target, os.R_OK):
                raise SourceError(f"cannot read {target}")
        elif not is_image_name(target):
            raise SourceError(
                f"source is neither a folder, an image, a @list nor a manifest: {target} "
                f"(image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )


def is_manifest(source: str) -> bool:
    return not source.startswith("@") and source.lower().endswith(".parquet") and not os.path.isdir(source)


def collect(sources: Iterable[str], buckets: range = range(BUCKETS)) -> list[str]:
    """The inputs named by the sources that fall in `buckets`: absolute, without duplicates, sorted."""
    paths: set[str] = set()
    for source in sources:
        if is_manifest(source):
            paths.update(stored.from_columns(manifest.read(source, buckets)))
        else:
            paths.update(found.path for found in _expand(source, facts=False) if bucket_of(found.path) in buckets)
    return sorted(paths)


def index(sources: Iterable[str], threads: int | None = None) -> pa.Table:
    """Every input of the sources with its size and mtime, as a manifest table; manifests are refused."""
    counter = manifest.Counter("indexing")

    def everything() -> Iterator[manifest.Found]:
        for source in sources:
            if is_manifest(source):
                raise SourceError(f"{source} is a manifest already: index the folders it was made from")
            for found in _expand(source, threads):
                counter.tick()
                yield found

    return manifest.table_of(everything())


def _expand(source: str, threads: int | None = None, facts: bool = True) -> Iterator[manifest.Found]:
    """The inputs a source names; with `facts`, their size and mtime (which costs a stat each)."""
    if source.startswith("@"):
        yield from read_list(source[1:], threads, facts)
    elif os.path.isdir(source):
        yield from manifest.walk(source, is_image_name, threads, facts)
    else:
        yield manifest.describe(os.path.abspath(source), facts)


def read_list(list_file: str, threads: int | None = None, facts: bool = True) -> Iterator[manifest.Found]:
    """One path per line; blank lines and '#' comments are skipped; relative paths are relative to the list."""
    base = os.path.dirname(os.path.abspath(list_file))
    with open(list_file, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            entry = line.rstrip("\r\n")
            if not entry.strip() or entry.lstrip().startswith("#"):
                continue
            path = os.path.join(base, entry)
            if os.path.isdir(path):
                yield from manifest.walk(path, is_image_name, threads, facts)
            else:
                yield manifest.describe(os.path.abspath(path), facts)
