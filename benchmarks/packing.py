"""Packed collections as img2dataset writes them: WebDataset tar shards and Parquet files of image bytes.

The tests make their containers with these, and `benchmarks/tar_vs_files.py` packs its pictures with
them, so both read what a user's downloader wrote: in a tar `KEY.jpg` beside `KEY.json` (holding the
url) and `KEY.txt` (a caption); in Parquet the columns `key`, `url`, `caption` and `jpg` (the bytes).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq


class Sample(NamedTuple):
    key: str
    image: bytes | None  # None: a row of img2dataset's Parquet whose download failed
    url: str | None = None
    extension: str = "jpg"


def write_tar(target: Path, samples: Iterable[Sample]) -> Path:
    """A WebDataset shard: each sample's image, its `.json` with the url, its `.txt` caption."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            add_member(tar, f"{sample.key}.{sample.extension}", sample.image)
            add_member(tar, f"{sample.key}.json", json.dumps({"key": sample.key, "url": sample.url}).encode())
            add_member(tar, f"{sample.key}.txt", f"a picture numbered {sample.key}".encode())
    return target


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def write_parquet(target: Path, samples: Iterable[Sample], row_group_rows: int = 1000) -> Path:
    """An img2dataset Parquet file: key, url, caption and the image bytes in `jpg`, in row groups."""
    rows = list(samples)
    table = pa.table({
        "key": pa.array([sample.key for sample in rows], pa.string()),
        "url": pa.array([sample.url for sample in rows], pa.string()),
        "caption": pa.array([f"a picture numbered {sample.key}" for sample in rows], pa.string()),
        "jpg": pa.array([sample.image for sample in rows], pa.binary()),
    })  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, target, row_group_size=row_group_rows)
    return target
