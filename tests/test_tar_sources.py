"""Images packed in WebDataset tar shards and img2dataset Parquet files, classified without unpacking."""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import manifest, sources
from batch.environment import Shard
from benchmarks.packing import Sample, add_member, write_parquet, write_tar
from tests.conftest import FAST, read_rows, run_batch
from tests.images import PHOTOS, photo

NAMES = ("chelsea", "coffee", "rocket")


def photo_samples(first: int = 0) -> list[Sample]:
    return [Sample(f"{first + number:07d}", (PHOTOS / f"{name}.jpg").read_bytes(), f"https://example.org/{name}.jpg")
            for number, name in enumerate(NAMES)]  # fmt: skip


def small_samples(count: int, first: int = 0) -> list[Sample]:
    samples = []
    for number in range(first, first + count):
        buffer = io.BytesIO()
        photo(NAMES[number % 3]).resize((64, 48)).save(buffer, "JPEG")
        samples.append(Sample(f"{number:07d}", buffer.getvalue(), f"https://example.org/{number}.jpg"))
    return samples


def truncated_jpeg() -> bytes:
    data = (PHOTOS / "chelsea.jpg").read_bytes()
    return data[: len(data) // 2]


def by_path(output: Path) -> dict[str, dict]:
    rows = read_rows(output)
    assert len(rows) == len({row["path"] for row in rows}), "a path has two rows"
    return {row["path"]: row for row in rows}


def test_every_image_of_a_webdataset_tar_gets_one_row_with_its_key_and_url(tmp_path):
    bad = [Sample("0000100", b"just some text\n", None), Sample("0000101", truncated_jpeg(), None),
           Sample("0000102", b"", None, "png")]  # fmt: skip
    shard = write_tar(tmp_path / "shard-000000.tar", photo_samples() + bad)
    output = tmp_path / "out"
    run_batch("classify", shard, "-o", output, *FAST, "--workers", "1")

    rows = by_path(output)
    assert sorted(rows) == sorted(f"{shard}/{sample.key}.{sample.extension}" for sample in photo_samples() + bad), (
        "one row per image member; the .json and .txt members are not inputs"
    )
    for sample, name in zip(photo_samples(), NAMES):
        row = rows[f"{shard}/{sample.key}.jpg"]
        assert (row["key"], row["url"], row["error"]) == (sample.key, f"https://example.org/{name}.jpg", None)
        assert (row["width"], row["height"]) == photo(name).size
    errors = {row["key"]: row["error"] for row in rows.values() if row["error"]}
    assert errors["0000100"] == "not an image: the file is text"
    assert errors["0000101"].startswith("truncated")
    assert errors["0000102"] == "empty file: 0 bytes"

    again = run_batch("classify", shard, "-o", output, *FAST, "--workers", "1")
    assert "nothing to classify: every input of this shard already has a row" in again.stderr


def test_an_image_in_a_tar_or_a_parquet_file_gets_the_answers_it_gets_as_a_file(tmp_path):
    shard = write_tar(tmp_path / "shard.tar", photo_samples())
    table = write_parquet(tmp_path / "part-00000.parquet", photo_samples(), row_group_rows=2)
    output = tmp_path / "out"
    run_batch("classify", PHOTOS, shard, table, "-o", output, "--workers", "2")  # the default, trained model

    rows = by_path(output)
    assert len(rows) == 9
    compared = ("label", "topk_labels", "width", "height", "error")
    for sample, name in zip(photo_samples(), NAMES):
        as_file = rows[str(PHOTOS / f"{name}.jpg")]
        assert as_file["error"] is None
        for packed in (rows[f"{shard}/{sample.key}.jpg"], rows[f"{table}/{sample.key}.jpg"]):
            assert {column: packed[column] for column in compared} == {column: as_file[column] for column in compared}
            # the same pixels; only the batch around them differs, which moves float sums in the 7th digit
            assert packed["topk_scores"] == pytest.approx(as_file["topk_scores"], abs=1e-5)
            assert packed["key"] == sample.key


def test_a_tar_cut_short_or_broken_costs_only_what_it_lost(tmp_path):
    """A folder of tars: a cut one, one with a broken header midway, a file named .tar that is not one."""
    folder = tmp_path / "shards"
    whole = write_tar(folder / "whole.tar", photo_samples()).read_bytes()
    write_tar(folder / "nested" / "good.tar", photo_samples())
    with tarfile.open(folder / "whole.tar") as tar:
        second_image, third_header = tar.getmember("0000001.jpg").offset_data, tar.getmember("0000002.jpg").offset
    (folder / "cut.tar").write_bytes(whole[: second_image + 5000])
    (folder / "cut in a header.tar").write_bytes(whole[: third_header + 100])
    broken = bytearray(whole)
    header = whole.index(b"0000002.jpg")
    broken[header : header + 512] = bytes(range(256)) * 2  # no valid checksum
    (folder / "broken.tar").write_bytes(bytes(broken))
    (folder / "page.tar").write_text("<html>404</html>")
    output = tmp_path / "out"
    run_batch("classify", folder, "-o", output, *FAST, "--workers", "1")

    rows = by_path(output)
    errors = {path.removeprefix(f"{folder}/"): row["error"] for path, row in rows.items()}
    assert errors["cut.tar/0000000.jpg"] is None
    assert re.match(r"truncated: the tar ends \d+ bytes into this member's \d+", errors["cut.tar/0000001.jpg"])
    assert "cut.tar/0000002.jpg" not in errors, "members after the cut cannot be known: the tar's own row tells of them"
    assert re.match(r"truncated tar: the file ends at byte \d+, before the tar does", errors["cut.tar/"])
    assert [errors[f"cut in a header.tar/{sample.key}.jpg"] for sample in photo_samples()[:2]] == [None, None]
    assert errors["cut in a header.tar/"].startswith("truncated tar: ")
    assert errors["broken.tar/0000000.jpg"] is None and errors["broken.tar/0000001.jpg"] is None
    assert re.match(r"broken tar: no valid header at byte \d+ of \d+", errors["broken.tar/"])
    assert errors["page.tar/"].startswith("broken tar: ")
    assert [errors[f"nested/good.tar/{sample.key}.jpg"] for sample in photo_samples()] == [None] * 3


def test_shards_of_an_indexed_collection_classify_every_packed_image_exactly_once(tmp_path):
    collection = tmp_path / "collection"
    write_tar(collection / "shard-000000.tar", small_samples(20))
    write_tar(collection / "shard-000001.tar", small_samples(20, first=20))
    bad_rows = [Sample("0000090", b"<html>404</html>"), Sample("0000091", None)]  # img2dataset's failed downloads
    table = write_parquet(tmp_path / "part-00000.parquet", small_samples(20, first=40) + bad_rows, row_group_rows=7)
    index, output = tmp_path / "index.parquet", tmp_path / "out"
    run_batch("index", collection, table, "-o", index)
    assert pq.read_metadata(index).num_rows == 62

    classified = 0
    for task in range(3):
        result = run_batch("classify", index, "-o", output, *FAST, "--workers", "1", "--num-shards", "3", "--shard-index", str(task))
        classified += int(re.search(r"(\d+) to classify", result.stderr)[1])
    assert classified == 62
    paths = f"'{output}/*.parquet'"
    assert duckdb.sql(f"select count(*), count(distinct path), count(key), count(url) from {paths}").fetchall() == [(62, 62, 62, 60)]
    errors = dict(duckdb.sql(f"select key, error from {paths} where error is not null").fetchall())
    assert errors == {"0000090": "not an image: the file is HTML or XML (a saved error page?)",
                      "0000091": "empty file: no image bytes in this row"}  # fmt: skip
    assert run_batch("summary", output, "--manifest", index).returncode == 0

    unindexed = run_batch("classify", collection, table, "-o", output, *FAST, "--num-shards", "2", "--shard-index", "1")
    assert "nothing to classify" in unindexed.stderr, "listing the containers names the images as the index did"


def test_parquet_rows_are_named_by_key_unless_keys_are_missing_or_repeated(tmp_path):
    image = (PHOTOS / "coffee.jpg").read_bytes()
    keyed = write_parquet(tmp_path / "keyed.parquet", [Sample("a", image), Sample("b", image)])
    repeated = write_parquet(tmp_path / "repeated.parquet", [Sample("a", image), Sample("a", image)])
    keyless = tmp_path / "keyless.parquet"
    pq.write_table(pa.table({"image": pa.array([image], pa.binary())}), keyless)
    assert sources.collect([str(keyed), str(repeated), str(keyless)]) == [
        f"{keyed}/a.jpg", f"{keyed}/b.jpg", f"{keyless}/row-000000000.image",
        f"{repeated}/row-000000000.jpg", f"{repeated}/row-000000001.jpg",
    ]  # fmt: skip


def test_a_member_name_that_is_not_utf8_keeps_its_place_through_the_index(tmp_path):
    shard, odd = tmp_path / "shard.tar", os.fsdecode(b"caf\xe9.jpg")  # Latin-1, as old archivers wrote it
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        add_member(tar, odd, (PHOTOS / "coffee.jpg").read_bytes())
        add_member(tar, "plain.jpg", (PHOTOS / "rocket.jpg").read_bytes())
    index = tmp_path / "index.parquet"
    manifest.write(sources.index([str(shard)]), str(index))
    listed = sources.gather([str(shard)])
    from_index = sources.gather([str(index)], Shard(0, 1).buckets)
    assert from_index.paths == listed.paths == sorted([f"{shard}/{odd}", f"{shard}/plain.jpg"])
    assert from_index.members == {path: replace(found, mtime_ns=None) for path, found in listed.members.items()}
    assert pq.read_table(index).column("path_bytes").null_count == 1


def test_a_parquet_file_without_paths_or_images_is_refused_before_anything_is_made(tmp_path):
    table = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"n": [1, 2]}), table)
    result = run_batch("classify", table, "-o", tmp_path / "out", *FAST, check=False)
    assert result.returncode == 2
    assert f"{table} is neither a manifest (a 'path' column) nor a Parquet file of images" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_member_that_crashes_its_decoder_costs_one_row(crashing_plugin, tmp_path):
    """conftest.py's crashing codec, met inside a tar and a Parquet file."""
    crash = b"CRASH-WITH-SIGSEGV\n" + bytes(1000)
    shard = write_tar(tmp_path / "shard.tar", [*small_samples(3), Sample("0000050", crash)])
    table = write_parquet(tmp_path / "part.parquet", [*small_samples(3, first=10), Sample("0000060", crash)], row_group_rows=2)
    output = tmp_path / "out"
    run_batch("classify", shard, table, "-o", output, *FAST, "--workers", "1", "--batch-size", "2", env=crashing_plugin)

    errors = {row["key"]: row["error"] for row in by_path(output).values()}
    assert len(errors) == 8
    assert errors.pop("0000050") == errors.pop("0000060") == "decoder crashed: killed by SIGSEGV (Segmentation fault)"
    assert set(errors.values()) == {None}
    again = run_batch("classify", shard, table, "-o", output, *FAST, "--workers", "1", env=crashing_plugin)
    assert "nothing to classify" in again.stderr
