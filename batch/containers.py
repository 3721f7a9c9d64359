"""Containers: images packed in tar shards (WebDataset) or Parquet files of image bytes, as inputs.

Parallel file systems choke on millions of small files, so collections there are packed. Each image
inside a container is one input, named `CONTAINER/MEMBER` (`/data/shard-000017.tar/0001234.jpg`,
`/data/part-00000.parquet/0001234.jpg`): a container is a file, so it cannot also be a folder and the
name is unambiguous, and it hashes into a bucket like any file's name, so one big container's images
spread over every shard. Nothing is ever unpacked to disk.

Listing a tar reads its 512-byte headers (and the small `.json` members, for their url) and seeks
over the images; an image's bytes are one contiguous range of the file, read with one `os.pread`, or
streamed when large. A Parquet file is read by row group: the worker keeps the image column of one
row group (its last) in memory, never the whole file. `batch report` finds the members it shows by
their names alone (`locate`), and opens them with the same Reader.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import defaultdict
from typing import BinaryIO, Callable, Iterable, Iterator
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from batch import tars
from batch.manifest import LAYOUT_KEY as MANIFEST_KEY
from batch.manifest import Found
from batch.paths import readable
from batch.transient import DEFAULT_RETRIES, errno_of, is_transient, retried

TAR_EXTENSION = ".tar"
PARQUET_EXTENSION = ".parquet"
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "bytes")  # img2dataset writes `jpg`
WHOLE_READ_BYTES = 16 << 20  # members up to this size are read with one pread; larger ones are streamed

log = logging.getLogger(__name__)


class MemberError(Exception):
    """A member that cannot be read; the message is its row's error. `errno` is that of the system's error
    behind it, if any, so that a transient one is retried (batch.transient)."""

    def __init__(self, message: str, number: int | None = None):
        super().__init__(message)
        self.errno = number


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_EXTENSION)


def webdataset_key(member: str) -> str:
    """WebDataset's key: the member name up to the first dot of its last component (`a/0001.seg.png` -> `a/0001`)."""
    folder, _, base = member.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


def stem(member: str) -> str:
    """The member name up to its last extension (`sample.0001.jpg` -> `sample.0001`): the name a writer
    gave the sample, which `sample.0001.json` shares."""
    folder, _, base = member.rpartition("/")
    return f"{folder}/{base.rsplit('.', 1)[0]}" if folder else base.rsplit(".", 1)[0]


def is_hidden(name: str) -> bool:
    """A name whose last part starts with a dot (`._x.jpg`, `.DS_Store`), as macOS and editors leave them:
    WebDataset's reader drops one at the top of a tar (its key needs a character before the first dot)."""
    return name.rpartition("/")[2].startswith(".")


def climbs_out(member: str) -> bool:
    """Whether CONTAINER/MEMBER, normalised, could name something else: a file outside the container,
    or another member (`a/../b.jpg` is `b.jpg`)."""
    return member.startswith("/") or ".." in member.split("/")


def member_path(container: str, member: str) -> str:
    """The input's name: CONTAINER/MEMBER, with a name that would climb out (`../x.jpg`, `/etc/x.jpg`)
    escaped into one part (`..%2Fx.jpg`), so that no normalising reader takes it for another file."""
    return f"{container}/{quote(member, safe='') if climbs_out(member) else member}"


def list_tar(path: str, is_image: Callable[[str], bool]) -> Iterator[Found]:
    """The image members of a plain tar, from its headers alone, each with the url of the `.json` written
    for it: the member of the same stem (`sample.0001.json` for `sample.0001.jpg`), else the only `.json`
    of its WebDataset key (`0001.json` for `0001.seg.png`). Its `key` is its own json's stem (the writer's
    key) where it has one, else the WebDataset key. Hidden members are skipped, as WebDataset skips them.

    A tar that ends early or breaks midway keeps every member before the break as an input (a member
    whose data the end cuts gets the row `truncated: ...`), and gets one row of its own, `CONTAINER/`,
    saying where it broke: the members after that cannot be found, so that row is what tells of them."""
    images: list[tars.Member] = []
    jsons = _Jsons()
    try:
        with open(path, "rb") as handle:
            listed, broken = tars.members(handle, os.fstat(handle.fileno()).st_size)
            for member in listed:
                if is_hidden(member.name):
                    continue
                if is_image(member.name):
                    images.append(member)
                elif member.name.lower().endswith(".json") and member.size < 1 << 20:
                    jsons.add(member.name, _url(handle, member))
    except OSError as error:
        if is_transient(error):
            raise  # the file system's, not the tar's: sources.py tries again
        broken = f"broken tar: {error}"
    climbing = [info.name for info in images if climbs_out(info.name)]
    if climbing:
        log.warning("%s: %d members have names with '..' or a leading '/' (%s): their rows name them escaped, "
                    "as %s", path, len(climbing), climbing[0], member_path(path, climbing[0]))  # fmt: skip
    for info in images:
        key, url = jsons.of(info.name)
        yield Found(member_path(path, info.name), info.size, int(info.mtime * 1e9), path, info.offset_data,
                    readable(key), url)  # fmt: skip
    if broken:
        yield Found(f"{path}/", None, None, path, None, None, None, broken)


class _Jsons:
    """The `.json` members of a tar, by stem, and which of them each WebDataset key holds."""

    def __init__(self) -> None:
        self.urls: dict[str, str | None] = {}
        self.stems_of_key: dict[str, list[str]] = defaultdict(list)

    def add(self, name: str, url: str | None) -> None:
        self.urls[stem(name)] = url
        self.stems_of_key[webdataset_key(name)].append(stem(name))

    def of(self, image: str) -> tuple[str, str | None]:
        """The image's key and url: from its own json, else its key's one json, else the key and no url."""
        own = stem(image)
        if own in self.urls:
            return own, self.urls[own]
        key = webdataset_key(image)
        only = self.stems_of_key.get(key, [])
        return (key, self.urls[only[0]]) if len(only) == 1 else (key, None)


def _url(handle: BinaryIO, member: tars.Member) -> str | None:
    try:
        url = json.loads(os.pread(handle.fileno(), member.size, member.offset_data)).get("url")
    except (ValueError, AttributeError):
        return None
    return url if isinstance(url, str) else None


def image_column(schema: pa.Schema) -> str | None:
    """The column of image bytes in a Parquet file's schema, if it has one."""
    return next((name for name in IMAGE_COLUMNS if name in schema.names and _is_bytes(schema.field(name).type)), None)


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def list_image_table(path: str) -> Iterator[Found]:
    """The rows of a Parquet file of image bytes, reading only `key`, `url` and img2dataset's `status`
    and `error_message`. A row is named by its key (`KEY.jpg`) when every row has one and no key
    repeats; else every row of the file by its row number (`row-000000123.jpg`), so that no two rows
    share a name. A row img2dataset failed to download carries its reason as its error."""
    handle = pq.ParquetFile(path)
    column = image_column(handle.schema_arrow)
    wanted = [name for name in ("key", "url", "status", "error_message") if name in handle.schema_arrow.names]
    table = handle.read(columns=wanted)
    rows = handle.metadata.num_rows
    keys, urls, statuses, messages = (
        table.column(name).cast(pa.string()).to_pylist() if name in wanted else [None] * rows
        for name in ("key", "url", "status", "error_message")
    )
    by_key = None not in keys and len(set(keys)) == len(keys)
    for row, (key, url, status, message) in enumerate(zip(keys, urls, statuses, messages)):
        name = f"{key}.{column}" if by_key else f"row-{row:09d}.{column}"
        yield Found(member_path(path, name), None, None, path, row, key, url, _failure(status, message))


def _failure(status: str | None, message: str | None) -> str | None:
    """img2dataset's reason for a row without an image: `failed_to_download` -> `download failed: ...`."""
    if status in (None, "success"):
        return None
    what = f"{status.removeprefix('failed_to_')} failed" if status.startswith("failed_to_") else status
    return f"{what}: {message or 'no message'}"


def footer(path: str) -> pa.Schema | None:
    """A Parquet file's schema, from its footer alone; None where it cannot be read as Parquet. A read
    that fails for a moment is tried again; failing still, the file is passed over, and a rerun reads it."""
    try:
        return retried(lambda: pq.read_schema(path), DEFAULT_RETRIES, f"cannot read {path}")
    except (OSError, pa.ArrowException) as error:
        if is_transient(error):
            log.warning("cannot read %s: %s, %d times: passed over; run again once the file system is well",
                        path, error, DEFAULT_RETRIES + 1)  # fmt: skip
        return None


def parquet_kind(schema: pa.Schema | None) -> str | None:
    """What a Parquet file is, by its content: "images" (a column of image bytes, and not a manifest of
    `batch index`, whose metadata says so; a `path` column beside the images is their own metadata),
    "manifest" (a `path` column otherwise), or None (neither, or unreadable)."""
    if schema is None:
        return None
    if image_column(schema) is not None and MANIFEST_KEY not in (schema.metadata or {}):
        return "images"
    return "manifest" if "path" in schema.names else None


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
        listed = {found.path: found for found in list_tar(container, lambda name: member_path(container, name) in members)}
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
    """Opens members in a decoding worker, keeping the last container open (one open per container, not
    per member: opens are what a parallel file system runs out of) and, for Parquet, the image column of
    the last row group read: a worker's memory is one row group's images, whatever the file's size. A
    tar member over WHOLE_READ_BYTES is streamed, so the decoder reads its header (and can refuse it)
    before the rest, and a worker never holds a whole-slide picture's gigabytes."""

    def __init__(self) -> None:
        self._descriptor: tuple[str, int, int] | None = None  # file, descriptor, size
        self._group: tuple[str, int, int, pa.Array] | None = None  # file, row group, its first row, images

    def open(self, member: Found) -> BinaryIO:
        if member.error:
            raise MemberError(member.error)
        if member.container.lower().endswith(PARQUET_EXTENSION):
            return io.BytesIO(self._row(member.container, member.offset))
        return self._range(member.container, member.offset, member.size)

    def _range(self, container: str, offset: int, size: int) -> BinaryIO:
        if self._descriptor is None or self._descriptor[0] != container:
            self.close()
            try:
                descriptor = os.open(container, os.O_RDONLY)
            except OSError as error:
                raise MemberError(f"read error: cannot open {container}: {error.strerror or error}", error.errno) from None
            try:
                self._descriptor = (container, descriptor, os.fstat(descriptor).st_size)
            except OSError as error:
                os.close(descriptor)
                raise MemberError(f"read error: {container}: {error.strerror or error}", error.errno) from None
        _, descriptor, length = self._descriptor
        if offset + size > length:
            raise MemberError(_cut(max(length - offset, 0), size))
        if size > WHOLE_READ_BYTES:
            return io.BufferedReader(_MemberStream(descriptor, offset, size), buffer_size=1 << 20)
        data = _pread(descriptor, size, offset)
        if len(data) < size:
            raise MemberError(_cut(len(data), size))
        return io.BytesIO(data)

    def _row(self, container: str, row: int) -> bytes:
        group = self._group
        if group is None or group[0] != container or not group[2] <= row < group[2] + len(group[3]):
            group = self._group = None  # let the last row group go before the next is read
            try:
                group = self._group = _row_group_holding(container, row)
            except (OSError, pa.ArrowException) as error:
                raise MemberError(f"read error: {container}: {error}", errno_of(error)) from None
        data = group[3][row - group[2]].as_py()
        if data is None:
            raise MemberError("empty file: no image bytes in this row")
        return data

    def close(self) -> None:
        """Let the container go: after a transient error, the next try opens it afresh (a stale handle)."""
        self._group = None
        if self._descriptor is not None:
            os.close(self._descriptor[1])
            self._descriptor = None


def _pread(descriptor: int, count: int, offset: int) -> bytes:
    """COUNT bytes at OFFSET, or fewer where the file ends, in as many reads as it takes: Linux returns
    at most about 2 GB from one."""
    parts, done = [], 0
    while done < count:
        try:
            part = os.pread(descriptor, count - done, offset + done)
        except OSError as error:
            raise MemberError(f"read error: {error.strerror or error}", error.errno) from None
        if not part:
            break
        parts.append(part)
        done += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _cut(read: int, size: int) -> str:
    return f"truncated: the tar ends {read} bytes into this member's {size}"


class _MemberStream(io.RawIOBase):
    """A tar member's byte range as a seekable file, read with pread (the descriptor is shared)."""

    def __init__(self, descriptor: int, offset: int, size: int) -> None:
        self._descriptor, self._offset, self._size, self._position = descriptor, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(base + position, 0)
        return self._position

    def readinto(self, buffer) -> int:  # noqa: ANN001 - any writable buffer
        count = min(len(buffer), self._size - self._position)
        if count <= 0:
            return 0
        data = _pread(self._descriptor, count, self._offset + self._position)
        if len(data) < count:
            raise MemberError(_cut(self._position + len(data), self._size))
        buffer[:count] = data
        self._position += len(data)
        return len(data)


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
