"""`batch index` in bounded memory: names spilled in chunks, sorted out of core, written once each."""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from batch import manifest
from batch.environment import Shard
from batch.paths import BUCKETS, bucket_of, from_columns
from batch.sources import gather
from tests.conftest import run_batch


def made_up(count: int) -> list[manifest.Found]:
    """Names in a shuffled order, some not UTF-8, each with facts of its own."""
    names = [f"/archive/camera-{number % 13}/{number:07d}.jpg" for number in range(count)]
    names += [os.fsdecode(b"/archive/odd/caf\xe9-%d.jpg" % number) for number in range(5)]
    random.Random(7).shuffle(names)
    return [manifest.Found(name, len(name), 1_700_000_000_123_456_789 + number) for number, name in enumerate(names)]


@pytest.mark.parametrize("spill_rows", [7, 1_000_000])
def test_the_manifest_is_sorted_by_bucket_then_exact_name_whatever_the_chunks(tmp_path, monkeypatch, spill_rows):
    monkeypatch.setattr(manifest, "SPILL_ROWS", spill_rows)
    found = made_up(200)
    twice = [manifest.Found(item.path, -1, -1) for item in found[:20]]  # named again later: the first row stays
    count = manifest.write([*found, *twice], str(tmp_path / "m.parquet"))

    table = pq.read_table(tmp_path / "m.parquet")
    keys = [os.fsencode(path) for path in from_columns(table)]
    assert count == table.num_rows == len(found) == len(set(keys))
    assert [(bucket_of(os.fsdecode(key)), key) for key in keys] == sorted((bucket_of(item.path), os.fsencode(item.path)) for item in found)
    facts = {os.fsencode(item.path): (item.size, item.mtime_ns) for item in found}
    rows = zip(keys, table.column("size").to_pylist(), table.column("mtime").cast("int64").to_pylist())
    assert all(facts[key] == (size, mtime) for key, size, mtime in rows)  # nanoseconds kept, the first found kept
    assert manifest.is_laid_out(pq.read_schema(tmp_path / "m.parquet"))


def test_a_task_of_a_manifest_written_in_chunks_reads_its_own_buckets(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "SPILL_ROWS", 1000)
    monkeypatch.setattr(manifest, "ROW_GROUP_ROWS", 500)
    found = made_up(5000)
    manifest.write(found, str(tmp_path / "m.parquet"))
    assert pq.ParquetFile(tmp_path / "m.parquet").metadata.num_row_groups == 11
    shard = Shard(3, 10)
    mine = gather([str(tmp_path / "m.parquet")], shard.buckets).paths
    assert sorted(mine) == sorted(item.path for item in found if bucket_of(item.path) in shard.buckets)


def test_nothing_found_is_an_empty_manifest(tmp_path):
    assert manifest.write([], str(tmp_path / "m.parquet")) == 0
    assert pq.read_table(tmp_path / "m.parquet").num_rows == 0
    assert gather([str(tmp_path / "m.parquet")], range(BUCKETS)).paths == []


def test_a_full_spill_folder_stops_the_index_with_its_name_and_leaves_nothing(tmp_path, small_disk):
    listing = tmp_path / "names.txt"
    listing.write_text("".join(f"/archive/site-{number % 100}/{number:08d}.jpg\n" for number in range(50_000)))

    full = run_batch("index", f"@{listing}", "-o", tmp_path / "m.parquet", "--spill-dir", small_disk, check=False)

    assert full.returncode == 1, full.stderr
    assert f"batch index: at most 1.5 GiB of memory (the default), spilling to {small_disk}\n" in full.stderr
    assert f"cannot spill to {small_disk}: " in full.stderr and "No space left on device" in full.stderr
    assert "--spill-dir" in full.stderr and "Traceback" not in full.stderr
    assert not os.path.exists(tmp_path / "m.parquet") and os.listdir(small_disk) == []
    run_batch("index", f"@{listing}", "-o", tmp_path / "m.parquet", "--spill-dir", tmp_path)
    assert pq.read_metadata(tmp_path / "m.parquet").num_rows == 50_000


def test_copy_rows_takes_row_numbers_in_arrays_of_any_length(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "ROW_GROUP_ROWS", 100)
    manifest.write(made_up(1000), str(tmp_path / "m.parquet"))
    whole = pq.read_table(tmp_path / "m.parquet")
    chosen = sorted(random.Random(3).sample(range(whole.num_rows), 300))
    cuts = sorted(random.Random(4).sample(range(1, 300), 40))
    arrays = [np.array(chosen[start:stop]) for start, stop in zip([0, *cuts], [*cuts, 300])]

    assert manifest.copy_rows(str(tmp_path / "m.parquet"), iter([np.array([], np.int64), *arrays]), str(tmp_path / "some.parquet")) == 300
    assert pq.read_table(tmp_path / "some.parquet").equals(whole.take(chosen))
    assert manifest.copy_rows(str(tmp_path / "m.parquet"), iter([]), str(tmp_path / "none.parquet")) == 0
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
