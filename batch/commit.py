"""Shard commit: the output directory's state, and the only code that publishes or deletes part files.

Layout: OUT/part-SSSSS-of-NNNNN-cCCCCCC.parquet, one file per committed chunk of shard S of N. A chunk
is written as a hidden staging file (`.part-....parquet.tmp`, invisible to pyarrow, DuckDB, pandas and
Polars) and appears by an atomic rename. A task killed at any moment therefore leaves whole chunks
and at most one staging file, which the next run of the same shard deletes before redoing its rows.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch.environment import Shard
from batch.writer import read_record, remove_if_present

PART = re.compile(r"^part-(?P<shard>\d{5,})-of-(?P<count>\d{5,})-c(?P<chunk>\d{6,})\.parquet$")


class OutputError(ValueError):
    """The output directory cannot take this run's results; the message says why and what to do."""


@dataclass(frozen=True)
class Part:
    path: str
    shard: int
    count: int
    chunk: int


def part_name(shard: Shard, chunk: int) -> str:
    return f"part-{shard.index:05d}-of-{shard.count:05d}-c{chunk:06d}.parquet"


def list_parts(root: str) -> list[Part]:
    parts = []
    for name in sorted(os.listdir(root)):
        match = PART.match(name)
        if match:
            parts.append(Part(os.path.join(root, name), int(match["shard"]), int(match["count"]), int(match["chunk"])))
    return parts


def check_writable(root: str) -> None:
    """Create OUT if needed and prove we can write there, before the model is loaded."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise OutputError(f"output {root} exists and is not a directory")
    try:
        os.makedirs(root, exist_ok=True)
        # A random name: tasks in containers all run as PID 1, so a PID in the name would collide.
        with tempfile.NamedTemporaryFile(dir=root, prefix=".batch-write-test-"):
            pass
    except OSError as error:
        raise OutputError(f"cannot write to the output directory {root}: {error.strerror or error}") from None


def describe_differences(existing: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = sorted(set(existing) | set(wanted))
    return "; ".join(
        f"{key}: {existing.get(key)!r} there, {wanted.get(key)!r} now" for key in keys if existing.get(key) != wanted.get(key)
    )


class OutputDir:
    """One shard's view of OUT: what it already finished, and how it adds more."""

    def __init__(self, root: str, shard: Shard, identity: dict[str, Any]):
        self.root = os.path.abspath(root)
        self.shard = shard
        self.identity = identity
        self.next_chunk = 0
        self._lock: object | None = None

    def _mine(self, part: Part) -> bool:
        return part.shard == self.shard.index and part.count == self.shard.count

    def _stale_staging(self) -> list[str]:
        prefix = f".part-{self.shard.index:05d}-of-{self.shard.count:05d}-"
        return [os.path.join(self.root, name) for name in os.listdir(self.root) if name.startswith(prefix)]

    def _claim(self) -> None:
        """One writer per shard, held until the process exits: a second would delete the first's staging file."""
        path = os.path.join(self.root, f".lock-{self.shard.index:05d}-of-{self.shard.count:05d}")
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise OutputError(
                f"another process is writing shard {self.shard.index} of {self.shard.count} into {self.root}; "
                "wait for it to end, or choose another output"
            ) from None
        except OSError:
            pass  # a filesystem without flock: go on unguarded, as Slurm runs one task per shard anyway
        self._lock = handle

    def prepare(self, overwrite: bool) -> set[str]:
        """Claim the shard, clear its leftovers, and return the paths it already finished (empty with overwrite)."""
        self._claim()
        for path in self._stale_staging():
            remove_if_present(path)
        parts = list_parts(self.root)
        mine = [part for part in parts if self._mine(part)]
        other_layout = [part for part in parts if part.count != self.shard.count]
        if overwrite:
            # Sibling shards of this run may be writing now: only our own parts and parts of another
            # shard count (which no task of this run owns) are ours to delete.
            for part in mine + other_layout:
                remove_if_present(part.path)
            return set()
        if other_layout:
            raise OutputError(
                f"{self.root} holds results split into {other_layout[0].count} shards (e.g. "
                f"{os.path.basename(other_layout[0].path)}), this run uses {self.shard.count}: resume with the "
                "same number of shards, choose another output, or pass --overwrite"
            )
        siblings = [part for part in parts if not self._mine(part)][:1]
        for part in mine + siblings:
            self._check_identity(part)
        if mine:
            self.next_chunk = max(part.chunk for part in mine) + 1
        return self._finished_paths(mine)

    def _check_identity(self, part: Part) -> None:
        try:
            existing = read_record(part.path).get("identity", {})
        except (OSError, ValueError, pa.ArrowException) as error:
            raise OutputError(f"cannot read {part.path} ({error}); move it away or pass --overwrite") from None
        if existing != self.identity:
            raise OutputError(
                f"{self.root} holds results of a different configuration ({describe_differences(existing, self.identity)}); "
                "results are never mixed: choose another output or pass --overwrite"
            )

    def _finished_paths(self, parts: list[Part]) -> set[str]:
        if not parts:
            return set()
        table = pq.read_table([part.path for part in parts], columns=["path"])
        return set(table.column("path").to_pylist())

    def staging_path(self) -> str:
        return os.path.join(self.root, f".{part_name(self.shard, self.next_chunk)}.tmp")

    def publish(self, staging: str) -> str:
        """Atomically make a closed, fsynced staging file a visible part; the directory entry is synced too."""
        final = os.path.join(self.root, part_name(self.shard, self.next_chunk))
        os.replace(staging, final)
        directory = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.next_chunk += 1
        return final
