"""The memory budget of the commands that hold every name: where it comes from, and a clear stop where it
cannot be kept."""

from __future__ import annotations

import pytest

from batch import manifest, spill
from batch.environment import JobEnvironment
from batch.spill import Budget, SpillError, parse_size
from tests.conftest import run_batch


@pytest.mark.parametrize(("text", "size"), [("4G", 4 * 2**30), ("4096M", 4 * 2**30), ("1.5T", 3 * 2**39),
                                            ("512MB", 2**29), ("2GiB", 2**31), ("3000", 3000 * 2**20)])  # fmt: skip
def test_sizes_are_read_as_slurm_writes_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "G", "-1G", "0"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError, match=repr(text)):
        parse_size(text)


def test_the_budget_is_the_one_asked_for_else_slurms_else_the_default(tmp_path):
    job = JobEnvironment({"SLURM_JOB_ID": "7", "SLURM_MEM_PER_NODE": "8192", "SLURM_CPUS_PER_TASK": "3"})
    assert Budget.of(3 * 2**30, str(tmp_path), job) == Budget(3 * 2**30, str(tmp_path), "--memory", 3)
    assert Budget.of(None, str(tmp_path), job) == Budget(8 * 2**30, str(tmp_path), "the Slurm allocation", 3)
    per_cpu = JobEnvironment({"SLURM_MEM_PER_CPU": "2048", "SLURM_CPUS_PER_TASK": "4"})
    assert Budget.of(None, str(tmp_path), per_cpu).memory == 8 * 2**30
    default = Budget.of(None, str(tmp_path), JobEnvironment({}))
    assert (default.memory, default.origin) == (spill.DEFAULT_MEMORY, "the default")
    assert str(default) == f"at most 1.5 GiB of memory (the default), spilling to {tmp_path}"


def test_a_folder_that_cannot_take_the_spill_is_named_before_any_work(tmp_path):
    outputs = tmp_path / "out"
    outputs.mkdir()
    missing = tmp_path / "nowhere"
    manifest.write([], str(tmp_path / "given.parquet"))
    for command in (["summary", outputs], ["report", outputs, "-o", tmp_path / "page.html"],
                    ["pending", tmp_path / "given.parquet", outputs, "-o", tmp_path / "todo.parquet"],
                    ["index", tmp_path, "-o", tmp_path / "m.parquet"]):  # fmt: skip
        refused = run_batch(*command, "--spill-dir", missing, check=False)
        assert refused.returncode == 2, refused.stderr
        assert f"cannot spill to {missing}: not a writable folder" in refused.stderr
    small = run_batch("summary", outputs, "--memory", "100M", check=False)
    assert small.returncode == 2 and "a memory budget of 0.1 GiB (--memory) is too small" in small.stderr
    assert not (tmp_path / "m.parquet").exists() and not (tmp_path / "todo.parquet").exists()


def test_duckdb_out_of_memory_and_spill_space_says_what_to_change(small_disk):
    budget = Budget(spill.HEADROOM + 2**25, str(small_disk))  # DuckDB's least, 64 MiB: it spills at once
    with pytest.raises(SpillError, match=f"spilling to {small_disk} is not enough; give more memory with --memory"):
        with budget.connect() as connection:
            connection.sql("SELECT count(*) FROM (SELECT * FROM range(20000000) ORDER BY random())").fetchall()


def test_duckdb_is_left_the_budget_less_what_python_and_each_more_cpu_hold(tmp_path):
    """A 2 GiB job: 1.25 GiB for DuckDB on one CPU, 48 MiB less for each CPU past it (its thread, a listing)."""
    assert Budget(2**31, str(tmp_path), cpus=1).duckdb_memory == 1280 * 2**20
    eight = Budget(2**31, str(tmp_path), cpus=8)
    assert eight.duckdb_memory == (1280 - 7 * 48) * 2**20
    with eight.connect() as connection:
        assert connection.sql("SELECT current_setting('memory_limit')").fetchall() == [("944.0 MiB",)]
