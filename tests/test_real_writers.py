"""What img2dataset and webdataset themselves write, classified: every row's key, url and error against
what the writer recorded (tests/writers.py runs the real tools)."""

from __future__ import annotations

import json
import tarfile

import pyarrow.parquet as pq
import pytest

from batch import sources
from benchmarks.packing import add_member
from tests.conftest import FAST, read_rows, run_batch
from tests.images import PHOTOS
from tests.writers import img2dataset_output, webdataset_read, webdataset_shards

PICTURES = {f"{name}.jpg": (PHOTOS / f"{name}.jpg").read_bytes() for name in ("chelsea", "coffee", "rocket")}
MISSING = ["gone.jpg", "moved.jpg"]


def rows_by_key(output) -> dict[str, dict]:
    rows = read_rows(output)
    assert len({row["path"] for row in rows}) == len(rows), "a path has two rows"
    return {row["key"]: row for row in rows}


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> dict:
    """img2dataset's output in both formats, downloaded from a loopback server: three pictures, two 404s."""
    return {format: img2dataset_output(tmp_path_factory.mktemp(format), PICTURES, MISSING, format)
            for format in ("parquet", "webdataset")}  # fmt: skip


def test_img2dataset_parquet_output_folder_classifies_as_named_with_its_own_failure_reasons(downloaded, tmp_path):
    folder = downloaded["parquet"]
    output = tmp_path / "out"
    run_batch("classify", folder, "-o", output, *FAST, "--workers", "1")

    recorded = pq.read_table(folder / "00000.parquet", columns=["key", "url", "status", "error_message"]).to_pylist()
    rows = rows_by_key(output)
    assert sorted(rows) == sorted(row["key"] for row in recorded) and len(rows) == 5
    for written in recorded:
        row = rows[written["key"]]
        assert row["path"] == f"{folder}/00000.parquet/{written['key']}.jpg"
        assert row["url"] == written["url"]
        if written["status"] == "success":
            assert row["error"] is None and row["label"] is not None
        else:
            assert row["error"] == f"download failed: {written['error_message']}"
    assert sorted(row["error"] for row in rows.values() if row["error"]) == ["download failed: HTTP Error 404: File not found"] * 2
    assert "download failed" in run_batch("summary", output).stdout


def test_img2dataset_webdataset_output_folder_reads_the_tar_and_passes_over_its_metadata(downloaded, tmp_path):
    folder = downloaded["webdataset"]
    output, index = tmp_path / "out", tmp_path / "index.parquet"
    result = run_batch("classify", folder, "-o", output, *FAST, "--workers", "1")
    assert "1 Parquet files without image bytes passed over" in result.stderr

    recorded = pq.read_table(folder / "00000.parquet", columns=["key", "url", "status"]).to_pylist()
    successes = {row["key"]: row["url"] for row in recorded if row["status"] == "success"}
    rows = rows_by_key(output)
    assert {key: (row["url"], row["error"]) for key, row in rows.items()} == {key: (url, None) for key, url in successes.items()}
    run_batch("index", folder, "-o", index)
    indexed = pq.read_table(index, columns=["key", "url"]).to_pylist()
    assert {row["key"]: row["url"] for row in indexed} == successes


def test_webdataset_shards_with_dotted_keys_and_hidden_members_match_webdatasets_own_reader(tmp_path):
    samples = [{"__key__": f"sample.{number:04d}", "jpg": data, "json": {"url": f"https://example.org/{name}"}}
               for number, (name, data) in enumerate(PICTURES.items())]  # fmt: skip
    samples.append({"__key__": "plain", "jpg": PICTURES["coffee.jpg"], "json": {"url": "https://example.org/plain"}})
    shards = webdataset_shards(tmp_path / "shards", samples, per_shard=2)
    with tarfile.open(shards[-1], "a") as tar:  # what a copy from a Mac leaves in a shard
        add_member(tar, "._plain.jpg", b"\0\5\26\7 resource fork")
    output = tmp_path / "out"
    run_batch("classify", tmp_path / "shards", "-o", output, *FAST, "--workers", "1")

    rows = rows_by_key(output)
    assert {key: row["url"] for key, row in rows.items()} == {sample["__key__"]: sample["json"]["url"] for sample in samples}
    assert {row["error"] for row in rows.values()} == {None}
    read_back = [sample for shard in shards for sample in webdataset_read(shard)]
    assert "._plain" not in {sample["__key__"] for sample in read_back}, "webdataset's reader drops the hidden member"
    ours = {found.path.rpartition("/")[2] for found in sources.gather([str(tmp_path / "shards")]).members.values()}
    assert ours == {f"{sample['__key__']}.jpg" for sample in samples}
    plain = next(sample for sample in read_back if sample["__key__"] == "plain")
    assert rows["plain"]["url"] == json.loads(plain["json"])["url"], "where webdataset's key is whole, ours is the same"
