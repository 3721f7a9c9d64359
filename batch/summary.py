"""`batch summary`: what a results directory holds, and whether it is whole; `batch pending`: what is not.

Healthy means: no path has two rows, all parts share one configuration, and (given a manifest) every
input of the manifest has a row. A Slurm job that runs after the array can use the exit status.
Names are compared exactly (`path_bytes` where set, else `path`) by DuckDB, out of core: its hash
tables over ten million names spill to a temporary folder past `MEMORY_LIMIT` instead of growing,
so a summary job of a few GB checks any output. Labels and errors are counted by Arrow, as
dictionaries: as many entries as distinct values, not rows.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch import manifest as manifests
from batch import transient
from batch.commit import RetryFailed, list_parts
from batch.writer import read_record

SHOWN_PATHS = 5
MEMORY_LIMIT = "1GB"  # DuckDB's own; the process peaks about 0.5 GB above it


def summarize(output: str, manifest: str | None = None, top: int = 10) -> tuple[str, bool]:
    parts = list_parts(output)
    if not parts:
        return f"{output}: no committed results (part-*.parquet)", False
    files = [part.path for part in parts]
    table = pq.read_table(files, columns=["label", "error"], read_dictionary=["label", "error"])
    records = [read_record(path) for path in files]
    lines = [f"{output}: {table.num_rows} rows in {len(parts)} parts from {len({p.buckets for p in parts})} shards"]
    lines += _errors(table)
    lines += _labels(table, top)
    lines += _throughput(records)
    with connect() as connection:
        problems = _doubles(connection, files) + _mixed(records)
        if manifest:
            problems += _missing(connection, files, manifest)
    lines += problems or ["complete: every path has exactly one row" + (" and every input is present" if manifest else "")]
    return "\n".join(lines), not problems


def _errors(table: pa.Table) -> list[str]:
    failed = table.num_rows - table.column("error").null_count
    if not failed:
        return ["errors: none"]
    kinds: Counter[str] = Counter()
    for error, count in _counts(table.column("error")).items():
        kinds[error.split(":", 1)[0]] += count
    share = 100 * failed / table.num_rows
    transient_rows = f", {kinds[transient.KIND]} of them transient" if kinds[transient.KIND] else ""
    return [f"errors: {failed} ({share:.2f}%){transient_rows}"] + [
        f"  {count:>9}  {kind}" + (f"  ({transient.REDO})" if kind == transient.KIND else "")
        for kind, count in kinds.most_common()
    ]


def _labels(table: pa.Table, top: int) -> list[str]:
    counts = _counts(table.column("label"))
    if not counts:
        return []
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    return ["top labels:"] + [f"  {count:>9}  {label}" for label, count in ranked]


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    """Rows per distinct value, nulls left out: as many entries as labels or error texts, not rows."""
    return {item["values"]: item["counts"] for item in pc.value_counts(column.drop_null()).to_pylist()}


def _throughput(records: list[dict]) -> list[str]:
    speed = Throughput.of(records)
    lines = []
    if speed.per_task:
        lines.append(f"throughput: {speed.per_task:.1f} images/s per task (busy time {speed.busy:.0f} s)")
    if speed.overall:
        lines.append(f"overall: {speed.overall:.1f} images/s from {speed.started.isoformat()} to {speed.committed.isoformat()}")
    lines.append("devices: " + ", ".join(f"{name} ({count} parts)" for name, count in speed.devices.most_common()))
    return lines


@dataclass
class Throughput:
    """What the parts' metadata says of a run's speed: each chunk's rows and busy seconds, and the span
    from the first chunk's start to the last commit (`batch summary` prints it, `batch report` draws it)."""

    rows: int
    busy: float
    started: datetime.datetime | None
    committed: datetime.datetime | None
    devices: Counter[str | None]

    @classmethod
    def of(cls, records: list[dict]) -> Throughput:
        chunks = [record.get("chunk", {}) for record in records]
        starts = [datetime.datetime.fromisoformat(chunk["started"]) for chunk in chunks if "started" in chunk]
        ends = [datetime.datetime.fromisoformat(chunk["committed"]) for chunk in chunks if "committed" in chunk]
        return cls(rows=sum(chunk.get("rows", 0) for chunk in chunks), busy=sum(chunk.get("seconds", 0.0) for chunk in chunks),
                   started=min(starts, default=None), committed=max(ends, default=None),
                   devices=Counter(record.get("provenance", {}).get("device_name") for record in records))  # fmt: skip

    @property
    def per_task(self) -> float | None:
        """Images/s of one task while it ran: rows over the chunks' summed busy time."""
        return self.rows / self.busy if self.busy > 0 else None

    @property
    def wall(self) -> float:
        return (self.committed - self.started).total_seconds() if self.started and self.committed else 0.0

    @property
    def overall(self) -> float | None:
        """Images/s of the whole output, from the first chunk's start to the last commit."""
        return self.rows / self.wall if self.wall > 0 else None


@contextmanager
def connect() -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection that spills past MEMORY_LIMIT into a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="batch-summary-") as spill:
        connection = duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "temp_directory": spill,
                                            "preserve_insertion_order": False})  # fmt: skip
        try:
            yield connection
        finally:
            connection.close()


def _key(files: list[str]) -> str:
    """The SQL for a row's exact name; a manifest not written by `batch index` may lack `path_bytes`."""
    return "coalesce(path_bytes, encode(path))" if "path_bytes" in pq.read_schema(files[0]).names else "encode(path)"


def _doubles(connection: duckdb.DuckDBPyConnection, parts: list[str]) -> list[str]:
    count, shown = connection.execute(
        f"""WITH doubled AS (SELECT min(path) AS path FROM read_parquet($parts) GROUP BY {_key(parts)} HAVING count(*) > 1)
            SELECT count(*), min(path, {SHOWN_PATHS}) FROM doubled""",
        {"parts": parts},
    ).fetchone()
    return [f"DOUBLED: {count} paths have more than one row, e.g. {', '.join(shown)}"] if count else []


def _mixed(records: list[dict]) -> list[str]:
    identities = {json.dumps(record.get("identity"), sort_keys=True) for record in records}
    if len(identities) <= 1:
        return []
    return [f"MIXED: parts come from {len(identities)} different configurations (model, weights, preprocessing, top-k)"]


def _missing(connection: duckdb.DuckDBPyConnection, parts: list[str], manifest: str) -> list[str]:
    examples = f"count(*), min(path, {SHOWN_PATHS})"
    expected = pq.read_metadata(manifest).num_rows
    problems = []
    missing, shown = _without_match(connection, examples, [manifest], parts).fetchone()
    if missing:
        problems.append(f"MISSING: {missing} of {expected} inputs in {os.path.basename(manifest)} have no row, e.g. {', '.join(shown)}")
    extra, shown = _without_match(connection, examples, parts, [manifest]).fetchone()
    if extra:
        problems.append(f"EXTRA: {extra} rows are not in the manifest, e.g. {', '.join(shown)}")
    return problems


def _without_match(connection: duckdb.DuckDBPyConnection, select: str, left: list[str], right: list[str],
                   retry: RetryFailed | None = None) -> duckdb.DuckDBPyConnection:  # fmt: skip
    """`select` over the rows of the `left` files whose exact name no row of the `right` files has (with
    `retry`, no row but one to redo)."""
    kept = "TRUE"
    if retry:
        kept = "error IS NULL" + (" OR NOT list_contains($kinds, split_part(error, ':', 1))" if retry.kinds else "")
    return connection.execute(
        f"""SELECT {select} FROM (SELECT *, {_key(left)} AS exact_name FROM read_parquet($left, file_row_number = true))
            ANTI JOIN (SELECT {_key(right)} AS exact_name FROM read_parquet($right) WHERE {kept}) USING (exact_name)""",
        {"left": left, "right": right, **({"kinds": list(retry.kinds)} if retry and retry.kinds else {})},
    )


def pending(manifest: str, output: str, to_do: str, retry: RetryFailed | None = None) -> int:
    """Write the rows of a `batch index` manifest that have no row in OUTPUT yet (with `retry`, or a row
    to redo), as a manifest for the next array; how many. The rows are picked by number and copied, so
    sizes and mtimes stay exact."""
    manifests.check_laid_out(manifest)
    parts = [part.path for part in list_parts(output)] if os.path.isdir(output) else []
    if not parts:
        return manifests.copy_rows(manifest, None, to_do)
    with connect() as connection:
        rows = _without_match(connection, "file_row_number", [manifest], parts, retry).fetchnumpy()["file_row_number"]
    return manifests.copy_rows(manifest, np.sort(np.asarray(rows, np.int64)), to_do)
