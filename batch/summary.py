"""`batch summary`: what a results directory holds, and whether it is whole.

Healthy means: no path has two rows, all parts share one configuration, and (given a manifest) every
input of the manifest has a row. A Slurm job that runs after the array can use the exit status.
Everything is counted with Arrow's hash kernels over the exact names (`paths.keys`), never Python
sets: ten million rows against a ten-million-row manifest fit in the summary job's memory.
"""

from __future__ import annotations

import datetime
import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch import manifest as manifests
from batch import paths as stored
from batch.commit import list_parts
from batch.writer import read_record

SHOWN_PATHS = 5


def summarize(output: str, manifest: str | None = None, top: int = 10) -> tuple[str, bool]:
    parts = list_parts(output)
    if not parts:
        return f"{output}: no committed results (part-*.parquet)", False
    table = pq.read_table([part.path for part in parts], columns=["path", "path_bytes", "label", "error"],
                          read_dictionary=["label", "error"])  # fmt: skip
    records = [read_record(part.path) for part in parts]
    lines = [f"{output}: {table.num_rows} rows in {len(parts)} parts from {len({p.buckets for p in parts})} shards"]
    lines += _errors(table)
    lines += _labels(table, top)
    lines += _throughput(records)
    problems = _doubles(table) + _mixed(records)
    if manifest:
        problems += _missing(table, manifest)
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
    return [f"errors: {failed} ({share:.2f}%)"] + [f"  {count:>9}  {kind}" for kind, count in kinds.most_common()]


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
    keys = pa.table({"key": stored.keys(table)})
    counts = keys.group_by("key").aggregate([("key", "count")])
    doubled = counts.filter(pc.greater(counts.column("key_count"), 1)).column("key")
    if not len(doubled):
        return []
    return [f"DOUBLED: {len(doubled)} paths have more than one row, e.g. " + _examples(doubled)]


def _mixed(records: list[dict]) -> list[str]:
    identities = {json.dumps(record.get("identity"), sort_keys=True) for record in records}
    if len(identities) <= 1:
        return []
    return [f"MIXED: parts come from {len(identities)} different configurations (model, weights, preprocessing, top-k)"]


def pending(manifest: str, output: str) -> pa.Table:
    """The rows of a `batch index` manifest that have no row in OUTPUT yet: a manifest for the next array."""
    table = manifests.read_laid_out(manifest)
    parts = list_parts(output) if os.path.isdir(output) else []
    if not parts:
        return table
    present = stored.keys(pq.read_table([part.path for part in parts], columns=["path", "path_bytes"]))
    return table.filter(_absent(stored.keys(table), present))


def _absent(keys: pa.ChunkedArray, present: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.invert(pc.is_in(keys, value_set=present))


def _missing(table: pa.Table, manifest: str) -> list[str]:
    expected = stored.keys(manifests.read(manifest))
    present = stored.keys(table)
    problems = []
    missing = pc.filter(expected, _absent(expected, present))
    if len(missing):
        problems.append(
            f"MISSING: {len(missing)} of {len(expected)} inputs in {os.path.basename(manifest)} have no row, e.g. "
            + _examples(missing)
        )
    extra = pc.filter(present, _absent(present, expected))
    if len(extra):
        problems.append(f"EXTRA: {len(extra)} rows are not in the manifest, e.g. " + _examples(extra))
    return problems


def _examples(keys: pa.Array | pa.ChunkedArray) -> str:
    """The first few, sorted, shown as the `path` column shows them."""
    shown = pc.sort_indices(keys)[:SHOWN_PATHS]
    return ", ".join(stored.readable(os.fsdecode(key)) for key in keys.take(shown).to_pylist())
