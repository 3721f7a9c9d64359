"""Images packed in WebDataset tar shards and img2dataset Parquet files, classified without unpacking."""

from __future__ import annotations

import io
import os
import re
import tarfile
import tracemalloc
from dataclasses import replace

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import manifest, sources
from batch.containers import WHOLE_READ_BYTES, MemberError, Reader
from batch.tars import BLOCK
from batch.decode import Preprocess, decode
from batch.environment import Shard
from benchmarks.packing import Sample, add_member, write_parquet, write_tar
from tests.conftest import FAST, by_path, run_batch
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


def test_each_image_gets_the_url_of_its_own_json_even_when_keys_have_dots(tmp_path):
    """`sample.0001.jpg` beside `sample.0001.json`: WebDataset's key of both is `sample`."""
    samples = [Sample(f"sample.{number:04d}", sample.image, sample.url) for number, sample in enumerate(small_samples(3))]
    segmented = (PHOTOS / "rocket.jpg").read_bytes()
    shard = write_tar(tmp_path / "shard.tar", samples)
    with tarfile.open(shard, "a", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "0009.seg.jpg", segmented)  # no json of its own: its key's only json gives the url
        add_member(tar, "0009.json", b'{"url": "https://example.org/nine"}')
        add_member(tar, "twin.a.jpg", segmented)  # two jsons under key `twin`, neither its own: no url
        add_member(tar, "twin.b.json", b'{"url": "https://example.org/b"}')
        add_member(tar, "twin.c.json", b'{"url": "https://example.org/c"}')
    index = tmp_path / "index.parquet"
    run_batch("index", shard, "-o", index)
    output = tmp_path / "out"
    run_batch("classify", shard, "-o", output, *FAST, "--workers", "1")

    expected = {f"{shard}/{sample.key}.jpg": (sample.key, sample.url) for sample in samples}
    expected |= {f"{shard}/0009.seg.jpg": ("0009", "https://example.org/nine"), f"{shard}/twin.a.jpg": ("twin", None)}
    assert {path: (row["key"], row["url"]) for path, row in by_path(output).items()} == expected
    indexed = pq.read_table(index, columns=["path", "key", "url"]).to_pylist()
    assert {row["path"]: (row["key"], row["url"]) for row in indexed} == expected


def test_hidden_files_are_skipped_in_tars_and_folders_as_webdataset_skips_them(tmp_path):
    folder = tmp_path / "photos"
    shard = write_tar(folder / "shard.tar", photo_samples()[:1])
    with tarfile.open(shard, "a", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "._0000000.jpg", b"\0\5\26\7 macOS resource fork")
        add_member(tar, "deeper/.hidden.jpg", truncated_jpeg())
    (folder / "._IMG_0001.jpg").write_bytes(b"\0\5\26\7 macOS resource fork")
    (folder / "IMG_0001.jpg").write_bytes((PHOTOS / "coffee.jpg").read_bytes())
    assert sources.collect([str(folder)]) == [str(folder / "IMG_0001.jpg"), f"{shard}/0000000.jpg"]
    named = folder / "._IMG_0001.jpg"
    assert sources.collect([str(named)]) == [str(named)], "a hidden file named as a source is still read"


@pytest.mark.parametrize("name", ["../../escape.jpg", "/abs/path.jpg", "ok/../../x.jpg"])
def test_a_member_name_with_dot_dot_or_a_leading_slash_gets_an_escaped_path(tmp_path, name):
    """Normalised, `TAR/../../escape.jpg` names a file outside the tar, and `TAR/fine/../fine.jpg` another member."""
    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, name, (PHOTOS / "coffee.jpg").read_bytes())
        add_member(tar, "fine/../fine.jpg", (PHOTOS / "rocket.jpg").read_bytes())
        add_member(tar, "fine.jpg", (PHOTOS / "chelsea.jpg").read_bytes())
    output = tmp_path / "out"
    result = run_batch("classify", shard, "-o", output, *FAST, "--workers", "1")

    rows = by_path(output)
    escaped = f"{shard}/{name.replace('/', '%2F')}"
    assert sorted(rows) == sorted([escaped, f"{shard}/fine%2F..%2Ffine.jpg", f"{shard}/fine.jpg"])
    assert all(os.path.normpath(path).startswith(f"{shard}/") for path in rows), "normalised, each still names a member"
    assert rows[escaped]["error"] is None and rows[escaped]["width"] == photo("coffee").width
    assert "2 members have names with '..' or a leading '/'" in result.stderr
    run_batch("report", output, "-o", tmp_path / "report.html")
    assert "class=placeholder" not in (tmp_path / "report.html").read_text(), "every row shown has its thumbnail"


def test_a_member_of_three_gigabytes_is_read_as_far_as_its_decoder_needs_and_never_held_whole(tmp_path):
    """A 3 GiB member, all of it present (a sparse file): a JPEG, then zeros past its end. One pread
    returns at most about 2 GB, and the member used to be read whole, then taken for a cut tar."""
    shard, jpeg, size = tmp_path / "big.tar", (PHOTOS / "chelsea.jpg").read_bytes(), 3 << 30
    info = tarfile.TarInfo("big.jpg")
    info.size, info.mtime = size, 1_700_000_000
    with open(shard, "wb") as handle:
        handle.write(info.tobuf(tarfile.GNU_FORMAT))
        handle.write(jpeg)
        handle.truncate(BLOCK + size + 2 * BLOCK)  # the rest: zeros, not stored on disk; then the end of the tar
    with tarfile.open(shard, "a", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "after.jpg", (PHOTOS / "rocket.jpg").read_bytes())
    members = sources.gather([str(shard)]).members
    tracemalloc.start()
    try:
        decoded = decode(0, f"{shard}/big.jpg", Preprocess(256, 224), members[f"{shard}/big.jpg"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (decoded.error, decoded.width, decoded.height) == (None, *photo("chelsea").size)
    assert peak < 64 << 20, f"the worker held {peak / 2**20:.0f} MiB"

    output = tmp_path / "out"
    run_batch("classify", shard, "-o", output, *FAST, "--workers", "1")
    assert [row["error"] for row in by_path(output).values()] == [None, None]


def test_a_member_cut_by_the_end_of_its_tar_says_how_much_of_it_is_there(tmp_path):
    big = bytes(WHOLE_READ_BYTES + 1)  # over the whole-read size: streamed, so cut while it is being read
    shard = tmp_path / "cut.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "big.jpg", (PHOTOS / "coffee.jpg").read_bytes() + big)
    whole = shard.read_bytes()
    shard.write_bytes(whole[: BLOCK + 1000])
    found = sources.gather([str(shard)]).members[f"{shard}/big.jpg"]
    assert decode(0, found.path, Preprocess(256, 224), found).error == f"truncated: the tar ends 1000 bytes into this member's {found.size}"
    shard.write_bytes(whole)
    with open(shard, "r+b") as handle:  # the tar shrinks after it was listed, while the member is read
        stream = Reader().open(found)
        handle.truncate(BLOCK + 70_000)
        with pytest.raises(MemberError, match=f"truncated: the tar ends 70000 bytes into this member's {found.size}"):
            stream.read()


def test_a_parquet_file_with_paths_and_images_is_read_for_its_images_and_says_so(tmp_path):
    table = tmp_path / "listing.parquet"
    images = [(PHOTOS / f"{name}.jpg").read_bytes() for name in NAMES]
    pq.write_table(pa.table({"path": [f"/somewhere/{name}.jpg" for name in NAMES], "key": list(NAMES),
                             "jpg": pa.array(images, pa.binary())}), table)  # fmt: skip
    output = tmp_path / "out"
    result = run_batch("classify", table, "-o", output, *FAST, "--workers", "1")
    assert sorted(by_path(output)) == sorted(f"{table}/{name}.jpg" for name in NAMES)
    assert {row["error"] for row in by_path(output).values()} == {None}
    assert f"{table} has a 'path' column and image bytes in 'jpg', and no batch.manifest metadata" in result.stderr


def test_a_folder_of_parquet_files_reads_those_of_images_and_passes_over_the_rest(tmp_path):
    folder = tmp_path / "downloaded"
    write_parquet(folder / "00000.parquet", small_samples(3))
    write_parquet(folder / "00001.parquet", small_samples(2, first=3))
    pq.write_table(pa.table({"key": ["a"], "status": ["success"]}), folder / "00002_metadata.parquet")
    run_batch("index", folder, "-o", folder / "index.parquet")  # a manifest in the folder is passed over too
    output = tmp_path / "out"
    result = run_batch("classify", folder, "-o", output, *FAST, "--workers", "1")
    assert len(by_path(output)) == 5
    assert "2 Parquet files without image bytes passed over" in result.stderr

    empty = tmp_path / "nothing"
    empty.mkdir()
    result = run_batch("classify", empty, "-o", tmp_path / "none", *FAST)
    assert f"{empty} holds no images, tars of images or Parquet files of images" in result.stderr


def test_img2dataset_failures_carry_its_own_reason_and_count_apart(tmp_path):
    table = tmp_path / "00000.parquet"
    image = (PHOTOS / "coffee.jpg").read_bytes()
    pq.write_table(pa.table({
        "key": ["000000000", "000000001", "000000002"],
        "jpg": pa.array([image, None, None], pa.binary()),
        "status": ["success", "failed_to_download", "failed_to_resize"],
        "error_message": [None, "HTTP Error 404: Not Found", "cannot identify image file"],
    }), table)  # fmt: skip
    output = tmp_path / "out"
    run_batch("classify", table, "-o", output, *FAST, "--workers", "1")
    errors = {row["key"]: row["error"] for row in by_path(output).values()}
    assert errors == {"000000000": None, "000000001": "download failed: HTTP Error 404: Not Found",
                      "000000002": "resize failed: cannot identify image file"}  # fmt: skip
    summary = run_batch("summary", output).stdout
    assert re.search(r"1\s+download failed", summary) and re.search(r"1\s+resize failed", summary)
