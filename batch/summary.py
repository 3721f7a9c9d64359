"""`batch summary`: what a results directory holds, and whether it is whole; `batch pending`: what is not.

Healthy means: no path has two rows, all parts share one configuration, and (given a manifest) every
input of the manifest has a row. A Slurm job that runs after the array can use the exit status.
Names are compared exactly (`path_bytes` where set, else `path`) by DuckDB, out of core: its hash
tables over 10^8 names spill to a folder past the memory budget (batch.spill) instead of growing, so
a summary job of a few GB checks any output. Labels and error kinds are counted by DuckDB too: as many
entries as distinct values, not rows.
"""

from __future__ import annotations

import datetime
import json
import os
from collections import Counter
from dataclasses import dataclass

import duckdb
import pyarrow.parquet as pq

from batch import manifest as manifests
from batch import spill, transient
from batch.commit import list_parts
from batch.retry_failed import RetryFailed
from batch.spill import Budget
from batch.writer import read_record

SHOWN_PATHS = 5


def summarize(output: str, manifest: str | None = None, top: int = 10, budget: Budget | None = None) -> tuple[str, bool]:
    parts = list_parts(output)
    if not parts:
        return f"{output}: no committed results (part-*.parquet)", False
    files = [part.path for part in parts]
    records = [read_record(path) for path in files]
    with (budget or Budget.of()).connect() as connection:
        labels = _counts(connection, files, "label")
        errors = _counts(connection, files, "split_part(error, ':', 1)")
        rows = sum(labels.values())
        labels.pop(None, None)  # the failed rows'
        lines = [f"{output}: {rows} rows in {len(parts)} parts from {len({p.buckets for p in parts})} shards"]
        lines += _errors(errors, rows) + _labels(labels, top) + _throughput(records)
        problems = _doubles(connection, files) + _mixed(records)
        if manifest:
            problems += _missing(connection, files, manifest)
    lines += problems or ["complete: every path has exactly one row" + (" and every input is present" if manifest else "")]
    return "\n".join(lines), not problems


def _counts(connection: duckdb.DuckDBPyConnection, parts: list[str], value: str) -> dict[str | None, int]:
    """Rows per distinct VALUE (an SQL expression; nulls under None), out of core."""
    return dict(connection.execute(f"SELECT {value}, count(*) FROM read_parquet($parts) GROUP BY ALL",
                                   {"parts": parts}).fetchall())  # fmt: skip


def _errors(kinds: dict[str | None, int], rows: int) -> list[str]:
    kinds.pop(None, 0)
    failed = sum(kinds.values())
    if not failed:
        return ["errors: none"]
    share = 100 * failed / rows
    transient_rows = f", {kinds[transient.KIND]} of them transient" if kinds.get(transient.KIND) else ""
    ranked = sorted(kinds.items(), key=lambda item: (-item[1], item[0]))
    return [f"errors: {failed} ({share:.2f}%){transient_rows}"] + [
        f"  {count:>9}  {kind}" + (f"  ({transient.REDO})" if kind == transient.KIND else "")
        for kind, count in ranked
    ]


def _labels(counts: dict[str | None, int], top: int) -> list[str]:
    if not counts:
        return []
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    return ["top labels:"] + [f"  {count:>9}  {label}" for label, count in ranked]


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


def _key(files: list[str]) -> str:
    """The SQL for a row's exact name; a manifest not written by `batch index` may lack `path_bytes`."""
    return "coalesce(path_bytes, encode(path))" if "path_bytes" in pq.read_schema(files[0]).names else "encode(path)"


def _doubles(connection: duckdb.DuckDBPyConnection, parts: list[str]) -> list[str]:
    count, shown = connection.execute(
        f"""WITH doubled AS (SELECT min(path) AS path FROM read_parquet($parts) GROUP BY {_key(parts)} HAVING count(*) > 1)
            SELECT count(*), min(path, {SHOWN_PATHS}) FROM doubled""",
        {"parts": parts},
    ).fetchall()[0]
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
    missing, shown = _without_match(connection, examples, [manifest], parts).fetchall()[0]
    if missing:
        problems.append(f"MISSING: {missing} of {expected} inputs in {os.path.basename(manifest)} have no row, e.g. {', '.join(shown)}")
    extra, shown = _without_match(connection, examples, parts, [manifest]).fetchall()[0]
    if extra:
        problems.append(f"EXTRA: {extra} rows are not in the manifest, e.g. {', '.join(shown)}")
    return problems


def _without_match(connection: duckdb.DuckDBPyConnection, select: str, left: list[str], right: list[str],
                   retry: RetryFailed | None = None, order: str | None = None) -> duckdb.DuckDBPyRelation:  # fmt: skip
    """`select` over the rows of the `left` files whose exact name no row of the `right` files has (with
    `retry`, no row but one to redo), ordered by `order` where given."""
    kept = "TRUE"
    if retry:
        kept = "error IS NULL" + (" OR NOT list_contains($kinds, split_part(error, ':', 1))" if retry.kinds else "")
    return connection.sql(
        f"""SELECT {select} FROM (SELECT *, {_key(left)} AS exact_name FROM read_parquet($left, file_row_number = true))
            ANTI JOIN (SELECT {_key(right)} AS exact_name FROM read_parquet($right) WHERE {kept}) USING (exact_name)
            {f"ORDER BY {order}" if order else ""}""",
        params={"left": left, "right": right, **({"kinds": list(retry.kinds)} if retry and retry.kinds else {})},
    )


def pending(manifest: str, output: str, to_do: str, retry: RetryFailed | None = None,
            budget: Budget | None = None) -> int:  # fmt: skip
    """Write the rows of a `batch index` manifest that have no row in OUTPUT yet (with `retry`, or a row
    to redo), as a manifest for the next array; how many. The rows are picked by number, streamed in
    order from DuckDB, and copied, so sizes and mtimes stay exact and memory stays within the BUDGET."""
    manifests.check_laid_out(manifest)
    parts = [part.path for part in list_parts(output)] if os.path.isdir(output) else []
    if not parts:
        return manifests.copy_rows(manifest, None, to_do)
    with (budget or Budget.of()).connect() as connection:
        numbers = _without_match(connection, "file_row_number", [manifest], parts, retry, order="file_row_number")
        batches = spill.arrow_reader(numbers, manifests.ROW_GROUP_ROWS)
        return manifests.copy_rows(manifest, (batch.column(0).to_numpy() for batch in batches), to_do)
