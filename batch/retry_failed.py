"""--retry-failed: which failed rows a run redoes, and how the new rows take their places.

The redone rows go back into the parts that held the failed ones (`commit.OutputDir.rewrite`), not into
new parts, so that every name keeps exactly one row; a reader sees the old part or the new one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from batch import paths as stored
from batch.writer import ROW_GROUP_ROWS

if TYPE_CHECKING:
    from batch.commit import OutputDir


@dataclass(frozen=True)
class RetryFailed:
    """--retry-failed: which failed rows a run redoes: every one, or those whose error is of the named
    kinds (the text before the first colon: `io error`, `decoder crashed`...)."""

    kinds: tuple[str, ...] = ()

    def selects(self, errors: pa.Array) -> pa.Array:
        """True where a row's error is one to redo."""
        failed = pc.is_valid(errors)
        if not self.kinds:
            return failed
        kind = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)
        return pc.and_(failed, pc.fill_null(pc.is_in(kind, value_set=pa.array(self.kinds, pa.string())), False))


class RetriedRows:
    """--retry-failed: where each failed row being redone lies, and the new rows for them, held until they
    take the old ones' place (`OutputDir.rewrite`) at the next commit, or sooner once a row group's worth
    is held: what waits in memory is bounded, and a kill loses at most that, never a row."""

    def __init__(self, output: OutputDir):
        self.output = output
        self.where: dict[bytes, str] = {}  # name -> the part holding its failed row
        self.stale: dict[bytes, str] = {}  # name -> the part holding a failed `CONTAINER/` row to drop
        self.held: list[pa.RecordBatch] = []
        self.rows = 0
        self.since = time.monotonic()

    def take(self, rows: pa.RecordBatch) -> pa.RecordBatch:
        """Hold the rows that redo failed ones; the others are new, and go to a new part."""
        if not self.where:
            return rows
        redo = pa.array([key in self.where for key in stored.keys(rows).to_pylist()], pa.bool_())
        count = pc.sum(redo).as_py() or 0
        if not count:
            return rows
        if not self.rows:
            self.since = time.monotonic()
        self.held.append(rows.filter(redo))
        self.rows += count
        return rows.filter(pc.invert(redo))

    def due(self, every: float) -> bool:
        return self.rows >= ROW_GROUP_ROWS or (self.rows > 0 and time.monotonic() - self.since >= every)

    def drop_stale(self) -> int:
        """Drop the failed `CONTAINER/` rows that are no input now, part by part; how many."""
        by_part: dict[str, list[bytes]] = {}
        for key, part in self.stale.items():
            by_part.setdefault(part, []).append(key)
        for part, keys in by_part.items():
            self.output.rewrite(part, None, keys)
        count, self.stale = len(self.stale), {}
        return count

    def replace(self) -> int:
        """Put the held rows in their parts, part by part; how many."""
        if not self.rows:
            return 0
        table = pa.Table.from_batches(self.held)
        self.held, self.rows = [], 0
        parts = pa.array([self.where[key] for key in stored.keys(table).to_pylist()], pa.string())
        for part in pc.unique(parts).to_pylist():
            self.output.rewrite(part, table.filter(pc.equal(parts, part)))
        for key in stored.keys(table).to_pylist():
            del self.where[key]
        return table.num_rows
