"""Exactly once at scale: grown trees, other array sizes, exact names, manifests and summaries of many rows."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import manifest
from batch.environment import Shard
from batch.paths import BUCKETS, bucket_of
from batch.summary import summarize
from benchmarks.scale import write_results
from tests.conftest import FAST, read_rows, run_batch
from tests.images import PHOTOS, small_images

MANY = 300_000  # rows: several manifest row groups, a few seconds to make


def classify_array(manifest_file: Path, output: Path, tasks: int) -> int:
    """Every task of an array of `tasks`, one after another; how many inputs they classified in all."""
    classified = 0
    for task in range(tasks):
        result = run_batch("classify", manifest_file, "-o", output, *FAST, "--workers", "1",
                           "--num-shards", str(tasks), "--shard-index", str(task))  # fmt: skip
        classified += int(re.search(r"(\d+) to classify", result.stderr)[1])
    return classified


def test_a_grown_tree_rerun_with_another_array_size_classifies_only_what_is_new(tmp_path):
    tree, output, full, to_do = tmp_path / "tree", tmp_path / "out", tmp_path / "all.parquet", tmp_path / "todo.parquet"
    first = small_images(tree / "b", 60)
    run_batch("index", tree, "-o", full)
    assert classify_array(full, output, 3) == 60

    grown = small_images(tree / "a", 25)  # new files that sort before every old one
    run_batch("index", tree, "-o", full)
    assert run_batch("pending", full, output, "-o", to_do).stdout == "25\n"
    assert classify_array(full, output, 2) == 25, "a different array size over the whole new manifest"
    assert sorted(row["path"] for row in read_rows(output)) == sorted(map(str, first + grown))
    assert run_batch("summary", output, "--manifest", full).returncode == 0

    unchanged = run_batch("classify", full, "-o", output, *FAST, "--num-shards", "5", "--shard-index", "3")
    assert "nothing to classify: every input of this shard already has a row" in unchanged.stderr
    assert run_batch("pending", full, output, "-o", to_do).stdout == "0\n"
    assert pq.read_table(to_do).num_rows == 0


def test_a_name_that_is_not_utf8_round_trips_exactly(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    name = b"caf\xe9 \xff.jpg"  # Latin-1, as old cameras and Windows shares write them
    shutil.copy(PHOTOS / "coffee.jpg", os.path.join(os.fsencode(tree), name))
    run_batch("index", tree, "-o", tmp_path / "inputs.parquet")
    stored = pq.read_table(tmp_path / "inputs.parquet", columns=["path", "path_bytes"]).to_pylist()
    exact = os.path.join(os.fsencode(tree), name)
    assert [(row["path"], row["path_bytes"]) for row in stored] == [(f"{tree}/caf\\xe9 \\xff.jpg", exact)]

    run_batch("classify", tmp_path / "inputs.parquet", "-o", tmp_path / "out", *FAST)
    (row,) = read_rows(tmp_path / "out")
    assert row["path_bytes"] == exact and row["error"] is None and row["width"] == 600
    with open(row["path_bytes"], "rb") as handle:  # the stored name opens the very file
        assert handle.read() == (PHOTOS / "coffee.jpg").read_bytes()
    assert duckdb.sql(f"select path from '{tmp_path}/out/*.parquet'").fetchall() == [(row["path"],)]
    report, healthy = summarize(str(tmp_path / "out"), str(tmp_path / "inputs.parquet"))
    assert healthy, report


@pytest.fixture(scope="module")
def many_inputs(tmp_path_factory) -> tuple[Path, list[str]]:
    """A manifest of MANY made-up paths (nothing is read from them), as `batch index` lays it out."""
    names = [f"/archive/camera-{number % 97:02d}/{number:08d}.jpg" for number in range(MANY)]
    found = (manifest.Found(name, 1000, 0) for name in names)
    path = tmp_path_factory.mktemp("many") / "inputs.parquet"
    manifest.write(found, str(path))
    return path, names


def test_a_task_reads_only_the_row_groups_of_its_buckets(many_inputs):
    path, names = many_inputs
    shard = Shard(7, 40)
    mine = manifest.read(str(path), shard.buckets).column("path").to_pylist()
    assert sorted(mine) == sorted(name for name in names if bucket_of(name) in shard.buckets)
    metadata = pq.ParquetFile(path).metadata
    read = manifest._row_groups_meeting(metadata, pq.ParquetFile(path).schema_arrow.get_field_index("bucket"), shard.buckets)
    assert metadata.num_row_groups == 5 and len(read) == 1


def test_a_manifest_of_another_making_still_works_but_is_read_whole(many_inputs, tmp_path, caplog):
    path, names = many_inputs
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"path": names[:5000]}), plain)
    shard = Shard(1, 3)
    with caplog.at_level(logging.WARNING, logger="batch.manifest"):
        mine = manifest.read(str(plain), shard.buckets).column("path").to_pylist()
    assert sorted(mine) == sorted(name for name in names[:5000] if bucket_of(name) in shard.buckets)
    assert "every task reads all of it" in caplog.text


def test_summary_of_many_rows_names_missing_and_doubled_paths(many_inputs, tmp_path):
    path, names = many_inputs
    written = names[3:] + names[100:102]  # three never classified, two classified twice
    write_results(tmp_path / "out", written, range(BUCKETS))
    report, healthy = summarize(str(tmp_path / "out"), str(path))
    assert not healthy
    assert f"{len(written)} rows in 30 parts from 1 shards" in report and f"{len(written)}  tench" in report
    assert f"DOUBLED: 2 paths have more than one row, e.g. {names[100]}, {names[101]}" in report
    assert f"MISSING: 3 of {MANY} inputs in inputs.parquet have no row, e.g. {names[0]}, {names[1]}, {names[2]}" in report


def test_index_logs_its_progress_on_long_walks(tmp_path, caplog):
    small_images(tmp_path / "tree", 3)
    counter = manifest.Counter("indexing", interval=0)
    with caplog.at_level(logging.INFO, logger="batch.manifest"):
        for _found in manifest.walk(str(tmp_path / "tree"), lambda name: True):
            counter.tick()
    assert "indexing: 1 inputs so far" in caplog.text and "indexing: 3 inputs so far" in caplog.text


def test_index_uses_threads_on_network_file_systems_only(tmp_path):
    table = tmp_path / "mounts"
    table.write_text("/dev/vda / ext4 rw 0 0\nserver:/export /data nfs4 rw 0 0\n"
                     "lustre@o2ib:/scratch /lus\\040tre lustre rw 0 0\n")  # fmt: skip
    kinds = [manifest.file_system_of(folder, str(table)) for folder in ("/data/images", "/data2", "/lus tre/x", "/")]
    assert kinds == ["nfs4", "ext4", "lustre", "ext4"]
    assert manifest.threads_for(str(tmp_path)) == 1  # this machine's own disk
