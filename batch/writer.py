"""The writer stage: model answers in, Arrow rows out, streamed into a staging Parquet file.

A staging file holds one chunk; `commit.OutputDir` makes it visible by an atomic rename. Rows are
buffered into row groups of many thousand rows, never one group per batch.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.paths import path_columns

if TYPE_CHECKING:  # summary and pending read parts through this module, and must not wait for torch
    from batch.decode import Decoded
    from batch.inference import Predictions
    from batch.manifest import Found

ROW_GROUP_ROWS = 32_768
METADATA_KEY = b"batch"


def schema(embeddings: bool) -> pa.Schema:
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("path_bytes", pa.binary()),  # the exact name, only where `path` had to escape bytes
        pa.field("key", pa.string()),  # of an image in a tar or Parquet file (WebDataset, img2dataset)
        pa.field("url", pa.string()),  # where img2dataset downloaded it from
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("topk_ids", pa.list_(pa.int32())),
        pa.field("topk_labels", pa.list_(pa.string())),
        pa.field("topk_scores", pa.list_(pa.float32())),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("error", pa.string()),
    ]
    if embeddings:
        fields.append(pa.field("embedding", pa.list_(pa.float16())))
    return pa.schema(fields)


class RowBuilder:
    """Turns one batch of decoded files and the model's answers for the good ones into a RecordBatch."""

    def __init__(self, labels: Sequence[str], topk: int, embeddings: bool):
        self.labels = np.asarray(labels, dtype=object)
        self.topk = min(topk, len(labels))
        self.schema = schema(embeddings)
        self.embeddings = embeddings

    def build(self, paths: Sequence[str], decoded: Sequence[Decoded], answers: Predictions | None,
              members: Mapping[str, Found] | None = None) -> pa.RecordBatch:  # fmt: skip
        """`members`: the inputs packed in tars or Parquet files, whose key and url the rows carry."""
        count = len(paths)
        packed = [(members or {}).get(path) for path in paths]
        good = np.fromiter((item.error is None for item in decoded), bool, count)
        failed = pa.array(~good)
        ids = np.zeros((count, self.topk), np.int32)
        scores = np.zeros((count, self.topk), np.float32)
        if answers is not None:
            ids[good], scores[good] = answers.topk_ids, answers.topk_scores
        columns: dict[str, pa.Array] = {
            **path_columns(paths),
            "key": pa.array([member and member.key for member in packed], pa.string()),
            "url": pa.array([member and member.url for member in packed], pa.string()),
            "label": pa.array(self.labels[ids[:, 0]], pa.string(), mask=~good),
            "score": pa.array(scores[:, 0], pa.float32(), mask=~good),
            "topk_ids": _lists(ids, pa.int32(), failed),
            "topk_labels": _lists(self.labels[ids], pa.string(), failed),
            "topk_scores": _lists(scores, pa.float32(), failed),
            "width": pa.array([item.width for item in decoded], pa.int32()),
            "height": pa.array([item.height for item in decoded], pa.int32()),
            "error": pa.array([item.error for item in decoded], pa.string()),
        }
        if self.embeddings:
            width = answers.embeddings.shape[1] if answers is not None and answers.embeddings is not None else 0
            vectors = np.zeros((count, width), np.float16)
            if width:
                vectors[good] = answers.embeddings
            columns["embedding"] = _lists(vectors, pa.float16(), failed)
        return pa.RecordBatch.from_pydict(columns, schema=self.schema)


def _lists(matrix: np.ndarray, value_type: pa.DataType, nulls: pa.Array) -> pa.Array:
    """A (rows, k) matrix as list<value_type>, with a null list where `nulls` is set."""
    rows, width = matrix.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    values = pa.array(matrix.reshape(-1), value_type)
    return pa.ListArray.from_arrays(offsets, values, pa.list_(value_type), mask=nulls)


class ChunkWriter:
    """Streams rows into one staging file; `close` fsyncs it so the rename that follows publishes whole data."""

    def __init__(self, path: str, schema: pa.Schema, metadata: dict[str, Any]):
        self.path = path
        self.started = time.monotonic()
        self._started_at = _now()
        self.rows = 0
        self.errors = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._metadata = metadata
        try:
            self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        except BaseException:
            remove_if_present(path)  # created, then its first bytes found the disk full
            raise

    def add(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self.rows += batch.num_rows
        self.errors += batch.num_rows - batch.column("error").null_count
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            table = pa.Table.from_batches(self._pending)
            self._writer.write_table(table, row_group_size=max(ROW_GROUP_ROWS, table.num_rows))
            self._pending, self._pending_rows = [], 0

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    def close(self) -> None:
        self._flush()
        chunk = {"started": self._started_at, "committed": _now(), "seconds": round(self.age, 3), "rows": self.rows,
                 "errors": self.errors}  # fmt: skip
        record = {**self._metadata, "chunk": chunk}
        self._writer.add_key_value_metadata({METADATA_KEY: json.dumps(record, sort_keys=True).encode()})
        self._writer.close()
        with open(self.path, "rb+") as handle:
            os.fsync(handle.fileno())

    def abandon(self) -> None:
        try:
            self._writer.close()
        except (OSError, pa.ArrowException):
            pass  # on a full disk the close fails too; the staging file goes either way
        remove_if_present(self.path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def read_record(path: str) -> dict[str, Any]:
    """The metadata record a chunk was committed with."""
    metadata = pq.read_metadata(path).metadata or {}
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} was not written by batch (no '{METADATA_KEY.decode()}' metadata)")
    return json.loads(raw)
