"""`batch index` in bounded memory: names spilled in chunks, sorted out of core, written once each."""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from batch import manifest, sources
from batch.environment import Shard
from batch.paths import BUCKETS, bucket_of, from_columns
from batch.sources import gather
from benchmarks.packing import Sample, write_parquet, write_tar
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


def a_collection(root) -> None:
    """Tars, a cut one, a page named .tar, Parquet files with images and without, plain files."""
    for number in range(7):
        samples = [Sample(f"{number}-{member:04d}", b"\xff\xd8 not decoded here", f"https://x/{member}") for member in range(50)]
        write_tar(root / f"shard-{number}.tar", samples)
        (root / f"plain-{number}.jpg").write_bytes(b"\xff\xd8")
    (root / "cut.tar").write_bytes((root / "shard-0.tar").read_bytes()[:3000])
    (root / "page.tar").write_text("<html>404</html>")
    write_parquet(root / "images.parquet", [Sample(f"{row:03d}", b"\xff\xd8") for row in range(30)])
    manifest.write([manifest.Found("/elsewhere/x.jpg", 1, 1)], str(root / "a-manifest.parquet"))


def test_containers_listed_by_several_processes_give_the_same_inputs_in_the_same_order(tmp_path):
    a_collection(tmp_path)
    alone = list(sources.index([str(tmp_path)], threads=1))
    assert len(alone) == 7 * 50 + 7 + 1 + 1 + 1 + 30  # members, plain files, cut.tar's members and row, page.tar's row
    assert list(sources.index([str(tmp_path)], threads=1, processes=3)) == alone


def test_a_list_stat_ed_by_many_threads_keeps_its_order(tmp_path):
    a_collection(tmp_path / "c")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    names = [*sorted(os.listdir(tmp_path / "c")), "../missing.jpg", "../dangling.jpg"] * 3
    (tmp_path / "c" / "list.txt").write_text("\n".join(["# made by hand", *names, ""]))
    alone = list(sources.read_list(str(tmp_path / "c" / "list.txt"), threads=1))
    assert [item.path for item in alone[-2:]] == [str(tmp_path / "missing.jpg"), str(tmp_path / "dangling.jpg")]
    assert alone[-2].mtime_ns is None and alone[-1].mtime_ns is not None  # the symlink's own time
    assert list(sources.read_list(str(tmp_path / "c" / "list.txt"), threads=8)) == alone


def test_batch_index_lists_with_the_jobs_cpus_and_writes_the_same_manifest(tmp_path):
    a_collection(tmp_path / "c")
    for cpus in ("1", "3"):
        result = run_batch("index", tmp_path / "c", "-o", tmp_path / f"{cpus}.parquet", env={"SLURM_CPUS_PER_TASK": cpus})
        assert "indexed 390 images" in result.stdout
    assert pq.read_table(tmp_path / "3.parquet").equals(pq.read_table(tmp_path / "1.parquet"))
