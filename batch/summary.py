"""`batch summary`: what a results directory holds, and whether it is whole.

Healthy means: no path has two rows, all parts share one configuration, and (given a manifest) every
input of the manifest has a row. A Slurm job that runs after the array can use the exit status.
"""

from __future__ import annotations

import datetime
import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.commit import list_parts
from batch.sources import read_manifest
from batch.writer import read_record

SHOWN_PATHS = 5


def summarize(output: str, manifest: str | None = None, top: int = 10) -> tuple[str, bool]:
    parts = list_parts(output)
    if not parts:
        return f"{output}: no committed results (part-*.parquet)", False
    table = pq.read_table([part.path for part in parts], columns=["path", "label", "error"])
    records = [read_record(part.path) for part in parts]
    lines = [f"{output}: {table.num_rows} rows in {len(parts)} parts from {len({(p.shard, p.count) for p in parts})} shards"]
    lines += _errors(table)
    lines += _labels(table, top)
    lines += _throughput(records)
    problems = _doubles(table) + _mixed(records)
    if manifest:
        problems += _missing(table, manifest)
    lines += problems or ["complete: every path has exactly one row" + (" and every input is present" if manifest else "")]
    return "\n".join(lines), not problems


def _errors(table: pa.Table) -> list[str]:
    errors = table.column("error").drop_null().to_pylist()
    if not errors:
        return ["errors: none"]
    kinds = Counter(error.split(":", 1)[0] for error in errors)
    share = 100 * len(errors) / table.num_rows
    return [f"errors: {len(errors)} ({share:.2f}%)"] + [f"  {count:>9}  {kind}" for kind, count in kinds.most_common()]


def _labels(table: pa.Table, top: int) -> list[str]:
    labels = table.column("label").drop_null()
    if not len(labels):
        return []
    counts = pa.table({"label": labels}).group_by("label").aggregate([("label", "count")]).sort_by(
        [("label_count", "descending"), ("label", "ascending")]
    )
    rows = counts.slice(0, top).to_pylist()
    return ["top labels:"] + [f"  {row['label_count']:>9}  {row['label']}" for row in rows]


def _throughput(records: list[dict]) -> list[str]:
    chunks = [record.get("chunk", {}) for record in records]
    rows = sum(chunk.get("rows", 0) for chunk in chunks)
    busy = sum(chunk.get("seconds", 0.0) for chunk in chunks)
    starts = [datetime.datetime.fromisoformat(chunk["started"]) for chunk in chunks if "started" in chunk]
    ends = [datetime.datetime.fromisoformat(chunk["committed"]) for chunk in chunks if "committed" in chunk]
    lines = []
    if busy > 0:
        lines.append(f"throughput: {rows / busy:.1f} images/s per task (busy time {busy:.0f} s)")
    if starts and ends:
        wall = (max(ends) - min(starts)).total_seconds()
        if wall > 0:
            lines.append(f"overall: {rows / wall:.1f} images/s from {min(starts).isoformat()} to {max(ends).isoformat()}")
    devices = Counter(record.get("provenance", {}).get("device_name") for record in records)
    lines.append("devices: " + ", ".join(f"{name} ({count} parts)" for name, count in devices.most_common()))
    return lines


def _doubles(table: pa.Table) -> list[str]:
    counts = table.group_by("path").aggregate([("path", "count")])
    doubled = counts.filter(pc.greater(counts.column("path_count"), 1))
    if not doubled.num_rows:
        return []
    examples = doubled.column("path").to_pylist()[:SHOWN_PATHS]
    return [f"DOUBLED: {doubled.num_rows} paths have more than one row, e.g. " + ", ".join(examples)]


def _mixed(records: list[dict]) -> list[str]:
    identities = {json.dumps(record.get("identity"), sort_keys=True) for record in records}
    if len(identities) <= 1:
        return []
    return [f"MIXED: parts come from {len(identities)} different configurations (model, weights, preprocessing, top-k)"]


def _missing(table: pa.Table, manifest: str) -> list[str]:
    expected = set(read_manifest(manifest))
    present = set(table.column("path").to_pylist())
    problems = []
    missing = sorted(expected - present)
    if missing:
        problems.append(
            f"MISSING: {len(missing)} of {len(expected)} inputs in {os.path.basename(manifest)} have no row, e.g. "
            + ", ".join(missing[:SHOWN_PATHS])
        )
    extra = sorted(present - expected)
    if extra:
        problems.append(f"EXTRA: {len(extra)} rows are not in the manifest, e.g. " + ", ".join(extra[:SHOWN_PATHS]))
    return problems
