"""Sources: turn what the user named (folders, files, @lists, manifests) into one sorted list of paths.

The order is the sorted absolute path, so every array task, and every re-run, sees the same list and
the same shard boundaries. `batch index` walks once and writes that list to a Parquet manifest, so a
thousand array tasks need not each walk a ten-million-file tree on a shared filesystem.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_KEY = b"batch.manifest"
MANIFEST_SCHEMA = pa.schema(
    [("path", pa.string()), ("size", pa.int64()), ("mtime", pa.timestamp("ns", tz="UTC"))],
    metadata={MANIFEST_KEY: b"1"},
)


class SourceError(ValueError):
    """A source the user named cannot be used; the message names it."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def as_text(path: str) -> str:
    """The path as it is stored in Parquet: file names that are not UTF-8 get backslash escapes."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


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
        elif source.startswith("@") or is_manifest_name(target):
            if not os.access(target, os.R_OK):
                raise SourceError(f"cannot read {target}")
        elif not is_image_name(target):
            raise SourceError(
                f"source is neither a folder, an image, a @list nor a manifest: {target} "
                f"(image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )


def is_manifest_name(path: str) -> bool:
    return path.lower().endswith(".parquet")


def collect(sources: Iterable[str]) -> list[str]:
    """Every input path named by the sources, absolute, without duplicates, sorted."""
    paths: set[str] = set()
    for source in sources:
        paths.update(_expand(source))
    return sorted(paths)


def _expand(source: str) -> Iterator[str]:
    if source.startswith("@"):
        yield from read_list(source[1:])
    elif os.path.isdir(source):
        yield from walk(source)
    elif is_manifest_name(source):
        yield from read_manifest(source)
    else:
        yield os.path.abspath(source)


def walk(root: str) -> Iterator[str]:
    """Image files below root, following symlinked folders but never into a loop.

    Anything with an image extension that is not a folder is an input, dangling symlinks and
    unreadable files included: each gets a row that says what is wrong with it.
    """
    seen: set[tuple[int, int]] = set()
    pending = [os.path.abspath(root)]
    while pending:
        folder = pending.pop()
        try:
            info = os.stat(folder)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # an unreadable sub-folder has no names to report
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                pending.append(entry.path)
            elif is_image_name(entry.name):
                yield entry.path


def read_list(list_file: str) -> Iterator[str]:
    """One path per line; blank lines and '#' comments are skipped; relative paths are relative to the list."""
    base = os.path.dirname(os.path.abspath(list_file))
    with open(list_file, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            entry = line.rstrip("\r\n")
            if not entry.strip() or entry.lstrip().startswith("#"):
                continue
            path = os.path.join(base, entry)
            if os.path.isdir(path):
                yield from walk(path)
            else:
                yield os.path.abspath(path)


def read_manifest(manifest: str) -> list[str]:
    try:
        schema = pq.read_schema(manifest)
    except (OSError, pa.ArrowException) as error:
        raise SourceError(f"{manifest} is not a readable Parquet manifest: {error}") from None
    if "path" not in schema.names:
        raise SourceError(f"{manifest} has no 'path' column; write manifests with `batch index`")
    return pq.read_table(manifest, columns=["path"]).column("path").to_pylist()


@dataclass(frozen=True)
class FileFacts:
    size: int | None
    mtime_ns: int | None


def facts(path: str) -> FileFacts:
    try:
        info = os.stat(path)
    except OSError:
        try:
            info = os.lstat(path)
        except OSError:
            return FileFacts(None, None)
    size = info.st_size if stat.S_ISREG(info.st_mode) else None
    return FileFacts(size, info.st_mtime_ns)


def write_manifest(paths: list[str], output: str) -> None:
    """Write the sorted inputs with their size and mtime, atomically, so a half-written manifest never exists."""
    known = [facts(path) for path in paths]
    table = pa.table(
        {
            "path": pa.array([as_text(path) for path in paths], pa.string()),
            "size": pa.array([fact.size for fact in known], pa.int64()),
            "mtime": pa.array([fact.mtime_ns for fact in known], pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
        },
        schema=MANIFEST_SCHEMA,
    )
    target = Path(output)
    staging = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, staging, compression="zstd")
    os.replace(staging, target)
