"""Containers: images packed in tar shards (WebDataset) or Parquet files of image bytes, as inputs.

Parallel file systems choke on millions of small files, so collections there are packed. Each image
inside a container is one input, named `CONTAINER/MEMBER` (`/data/shard-000017.tar/0001234.jpg`,
`/data/part-00000.parquet/0001234.jpg`): a container is a file, so it cannot also be a folder and the
name is unambiguous, and it hashes into a bucket like any file's name, so one big container's images
spread over every shard. Nothing is ever unpacked to disk.

Listing a tar reads its 512-byte headers (and the small `KEY.json` members, for their url) and seeks
over the images; an image's bytes are one contiguous range of the file, read with one `os.pread`. A Parquet file is read by row group: the worker keeps the
image column of one row group (its last) in memory, never the whole file. `batch report` finds the
members it shows by their names alone (`locate`), and reads them with the same Reader.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import defaultdict
from typing import BinaryIO, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from batch.manifest import Found
from batch.paths import readable

TAR_EXTENSION = ".tar"
PARQUET_EXTENSION = ".parquet"
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "bytes")  # img2dataset writes `jpg`
BLOCK = 512


class MemberError(Exception):
    """A member that cannot be read; the message is its row's error."""


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_EXTENSION)


def webdataset_key(member: str) -> str:
    """WebDataset's key: the member name up to the first dot of its last component (`a/0001.seg.png` -> `a/0001`)."""
    folder, _, base = member.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


def list_tar(path: str, is_image: Callable[[str], bool]) -> Iterator[Found]:
    """The image members of a plain tar, from its headers alone; `KEY.json`'s `url` is carried to KEY's image.

    A tar that ends early or breaks midway keeps every member before the break as an input (a member
    whose data the end cuts gets the row `truncated: ...`), and gets one row of its own, `CONTAINER/`,
    saying where it broke: the members after that cannot be found, so that row is what tells of them."""
    images: list[tuple[str, tarfile.TarInfo]] = []
    urls: dict[str, str] = {}
    broken = None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()  # a tar of a million members must not hold a million headers
                if not info.isfile():
                    continue
                if is_image(info.name):
                    images.append((readable(webdataset_key(info.name)), info))
                elif info.name.lower().endswith(".json") and info.size < 1 << 20:
                    url = _url(tar, info)
                    if url:
                        urls[readable(webdataset_key(info.name))] = url
            broken = _where_it_broke(tar.fileobj, tar.offset, size)
    except tarfile.ReadError as error:
        cut = "unexpected end of data" in str(error)
        broken = _truncated(size) if cut else f"broken tar: {error}"
    except (tarfile.TarError, OSError) as error:
        broken = f"broken tar: {error}"
    for key, info in images:
        yield Found(f"{path}/{info.name}", info.size, int(info.mtime * 1e9), path, info.offset_data, key, urls.get(key))
    if broken:
        yield Found(f"{path}/", None, None, path, None, None, None, broken)


def _url(tar: tarfile.TarFile, info: tarfile.TarInfo) -> str | None:
    tar.fileobj.seek(info.offset_data)
    try:
        url = json.loads(tar.fileobj.read(info.size)).get("url")
    except (ValueError, AttributeError):
        return None
    return url if isinstance(url, str) else None


def _where_it_broke(handle: BinaryIO, offset: int, size: int) -> str | None:
    """Why tarfile stopped listing at `offset`, if not at the end: a whole tar ends in zero blocks."""
    handle.seek(offset)
    rest = handle.read(BLOCK)
    if not rest.strip(b"\0"):
        return None
    if len(rest) < BLOCK:
        return _truncated(size)
    return f"broken tar: no valid header at byte {offset} of {size}; the members after it cannot be read"


def _truncated(size: int) -> str:
    return f"truncated tar: the file ends at byte {size}, before the tar does; members after that are lost"


def image_column(schema: pa.Schema) -> str | None:
    """The column of image bytes in a Parquet file's schema, if it has one."""
    return next((name for name in IMAGE_COLUMNS if name in schema.names and _is_bytes(schema.field(name).type)), None)


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def list_image_table(path: str) -> Iterator[Found]:
    """The rows of a Parquet file of image bytes, reading only `key` and `url`. A row is named by its key
    (`KEY.jpg`) when every row has one and no key repeats; else every row of the file by its row number
    (`row-000000123.jpg`), so that no two rows share a name."""
    handle = pq.ParquetFile(path)
    column = image_column(handle.schema_arrow)
    wanted = [name for name in ("key", "url") if name in handle.schema_arrow.names]
    table = handle.read(columns=wanted) if wanted else pa.table({})
    keys = table.column("key").cast(pa.string()).to_pylist() if "key" in wanted else [None] * handle.metadata.num_rows
    urls = table.column("url").cast(pa.string()).to_pylist() if "url" in wanted else [None] * len(keys)
    by_key = None not in keys and len(set(keys)) == len(keys)
    for row, (key, url) in enumerate(zip(keys, urls)):
        name = f"{key}.{column}" if by_key else f"row-{row:09d}.{column}"
        yield Found(f"{path}/{name}", None, None, path, row, key, url)


def is_image_table(path: str) -> bool:
    try:
        return image_column(pq.read_schema(path)) is not None
    except (OSError, pa.ArrowException):
        return False


def container_of(path: str) -> str | None:
    """The tar or Parquet file that PATH names a member of, whether it is still there or not; None for a
    plain file's path. A container is a file, so it is PATH's first ancestor that is not a folder."""
    parts = path.split("/")
    for end in range(1, len(parts)):
        ancestor = "/".join(parts[:end])
        if ancestor and not os.path.isdir(ancestor):
            named = is_tar_name(ancestor) or ancestor.lower().endswith(PARQUET_EXTENSION)
            return ancestor if named else None
    return None


def locate(paths: Iterable[str]) -> list[Found]:
    """Where each member among PATHS lies now, for `Reader`, or (as its `error`) why it cannot be read;
    plain files' paths are left out. For the few rows `batch report` shows: each container is listed
    once, keeping only the members asked for, and they come container by container in file order, so
    a Reader opens each container (and reads each Parquet row group) once."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        container = container_of(path)
        if container is not None:
            wanted[container].add(path)
    located = []
    for container, members in wanted.items():
        listed, why_not = _listed(container, members)
        located += sorted(listed.values(), key=lambda found: found.offset)
        located += [Found(path, None, None, container, error=why_not) for path in sorted(members - listed.keys())]
    return located


def _listed(container: str, members: set[str]) -> tuple[dict[str, Found], str]:
    """Those of MEMBERS that CONTAINER holds now, by path, and why any other is not there."""
    kind = "tar" if is_tar_name(container) else "Parquet file"
    if not os.path.isfile(container):
        return {}, f"{kind} gone"
    if is_tar_name(container):
        listed = {found.path: found for found in list_tar(container, lambda name: f"{container}/{name}" in members)}
        broken = listed.pop(f"{container}/", None)
        return listed, broken.error if broken else "no longer in the tar"
    try:
        if image_column(pq.read_schema(container)) is None:
            return {}, "no longer a Parquet file of images"
        listed = {found.path: found for found in list_image_table(container) if found.path in members}
        return listed, "no longer in the Parquet file"
    except (OSError, pa.ArrowException) as error:
        return {}, f"unreadable Parquet file: {error}"


class Reader:
    """Reads members in a decoding worker, keeping the last container open (one open per container, not
    per member: opens are what a parallel file system runs out of) and, for Parquet, the image column of
    the last row group read: a worker's memory is one row group's images, whatever the file's size."""

    def __init__(self) -> None:
        self._descriptor: tuple[str, int] | None = None
        self._group: tuple[str, int, int, pa.Array] | None = None  # file, row group, its first row, images

    def read(self, member: Found) -> bytes:
        if member.error:
            raise MemberError(member.error)
        if member.container.lower().endswith(PARQUET_EXTENSION):
            return self._row(member.container, member.offset)
        return self._range(member.container, member.offset, member.size)

    def _range(self, container: str, offset: int, size: int) -> bytes:
        if self._descriptor is None or self._descriptor[0] != container:
            self.close()
            try:
                self._descriptor = (container, os.open(container, os.O_RDONLY))
            except OSError as error:
                raise MemberError(f"read error: cannot open {container}: {error.strerror or error}") from None
        try:
            data = os.pread(self._descriptor[1], size, offset)
        except OSError as error:
            raise MemberError(f"read error: {error.strerror or error}") from None
        if len(data) < size:
            raise MemberError(f"truncated: the tar ends {len(data)} bytes into this member's {size}")
        return data

    def _row(self, container: str, row: int) -> bytes:
        group = self._group
        if group is None or group[0] != container or not group[2] <= row < group[2] + len(group[3]):
            group = self._group = None  # let the last row group go before the next is read
            try:
                group = self._group = _row_group_holding(container, row)
            except (OSError, pa.ArrowException) as error:
                raise MemberError(f"read error: {container}: {error}") from None
        data = group[3][row - group[2]].as_py()
        if data is None:
            raise MemberError("empty file: no image bytes in this row")
        return data

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor[1])
            self._descriptor = None


def _row_group_holding(container: str, row: int) -> tuple[str, int, int, pa.Array]:
    handle = pq.ParquetFile(container)
    first = 0
    for group in range(handle.num_row_groups):
        rows = handle.metadata.row_group(group).num_rows
        if row < first + rows:
            column = image_column(handle.schema_arrow)
            images = handle.read_row_group(group, columns=[column]).column(0).combine_chunks()
            return container, group, first, images
        first += rows
    raise MemberError(f"read error: {container} has no row {row}; it changed since it was listed")
