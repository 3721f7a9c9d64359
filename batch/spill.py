"""DuckDB out of core: the whole-output questions (doubles, missing inputs, pending rows, counts by label)
and the sort of a new manifest hold every name, 10^8 of them or more. A `Budget` says how much memory
such a command may hold and where it spills past that: DuckDB's sorts and hash tables go to disk
instead of growing, so a small job answers them for any output."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import duckdb
import pyarrow as pa

from batch.environment import JobEnvironment

DEFAULT_MEMORY = 3 * 2**29  # 1.5 GiB outside a Slurm allocation: a fair share of a login node
SMALLEST_MEMORY = 2**30
HEADROOM = 3 * 2**28  # what Python, Arrow and DuckDB hold beyond its limit: up to 0.57 GiB measured (summary, 10^8 rows)
# and for each CPU past the first: its DuckDB thread's buffers and, while indexing, a tar listing in flight
# (measured: an index of 10^6 tar members held 326 MiB more with 8 CPUs than with one, a list's 141 MiB)
HEADROOM_PER_CPU = 3 * 2**24


class SpillError(RuntimeError):
    """The budget cannot be kept: its folder is unusable or full, or a query needs more memory."""


@dataclass(frozen=True)
class Budget:
    """At most `memory` bytes for the whole process, spilling into a temporary folder in `folder`, with
    DuckDB on `cpus` threads (the task's, not the node's)."""

    memory: int
    folder: str
    origin: str = "--memory"
    cpus: int = 1

    @classmethod
    def of(cls, memory: int | None = None, folder: str | None = None,
           environment: JobEnvironment | None = None) -> Budget:  # fmt: skip
        """The budget asked for, else Slurm's allocation of this job, else DEFAULT_MEMORY; spilling to
        FOLDER, else TMPDIR. Raises ValueError naming an unusable folder or a budget under 1 GiB."""
        origin, environment = "--memory", environment or JobEnvironment()
        if memory is None:
            allotted = environment.allotted_memory()
            memory, origin = (allotted, "the Slurm allocation") if allotted else (DEFAULT_MEMORY, "the default")
        if memory < SMALLEST_MEMORY:
            raise ValueError(f"a memory budget of {_size(memory)} ({origin}) is too small: give at least "
                             f"{_size(SMALLEST_MEMORY)} with --memory")  # fmt: skip
        folder = folder or tempfile.gettempdir()
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"cannot spill to {folder}: not a writable folder (choose one with --spill-dir)")
        return cls(memory, folder, origin, environment.cpus())

    def __str__(self) -> str:
        return f"at most {_size(self.memory)} of memory ({self.origin}), spilling to {self.folder}"

    @contextmanager
    def folder_of_its_own(self, prefix: str) -> Iterator[str]:
        """A new folder inside `folder`, removed afterwards."""
        try:
            folder = tempfile.mkdtemp(prefix=prefix, dir=self.folder)
        except OSError as error:
            raise self.cannot_spill(error) from None
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def cannot_spill(self, error: OSError) -> SpillError:
        return SpillError(f"cannot spill to {self.folder}: {error.strerror or error} (choose a folder with more "
                          "space with --spill-dir)")  # fmt: skip

    @property
    def duckdb_memory(self) -> int:
        """DuckDB's memory limit: the budget less what Python, Arrow and the CPUs past the first hold."""
        return max(self.memory - HEADROOM - HEADROOM_PER_CPU * (self.cpus - 1), 2**26)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A DuckDB connection within the budget (results keep the order of an ORDER BY, and only then).
        DuckDB running out of memory and spill space becomes a SpillError saying what to change."""
        limit = f"{self.duckdb_memory // 2**20}MiB"
        with self.folder_of_its_own("batch-spill-") as folder:
            connection = duckdb.connect(config={"memory_limit": limit, "temp_directory": folder,
                                                "preserve_insertion_order": False, "threads": self.cpus})  # fmt: skip
            try:
                yield connection
            except duckdb.OutOfMemoryException as error:  # DuckDB's word for a full spill folder too
                raise SpillError(f"{_first_line(error)}: {self} is not enough; give more memory with --memory "
                                 "(or Slurm's --mem), or a folder with more space with --spill-dir") from None  # fmt: skip
            finally:
                connection.close()


def arrow_reader(relation: duckdb.DuckDBPyRelation, rows: int) -> pa.RecordBatchReader:
    """The relation's rows streamed in batches of ROWS (`fetch_arrow_reader` before DuckDB 2.0, whose
    wheels need Python 3.11)."""
    read = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
    return read(rows)


def parse_size(text: str) -> int:
    """Bytes from a size as Slurm writes it: 4G, 4096M, 1.5T, 512MB, 2GiB; a bare number is MiB."""
    units = {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        value = float(number[: len(number) - len(unit)])
    except ValueError:
        raise ValueError(f"{text!r} is not a size such as 4G or 4096M") from None
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value * units[unit])


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0]
