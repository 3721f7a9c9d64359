"""Errors that go away: failed rows redone in place (--retry-failed), a full output met with a clean stop.

Transient reads are failed in the real program by a preloaded shim (tests/faults.py); the full disk
is a real tmpfs, mounted small as the output.
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import FAST, read_rows, run_batch
from tests.faults import fault_env, lock_fault_env, tokens_left
from tests.images import small_images

HTML = b"<html>a saved error page</html>"


def rows_by_path(output: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = collections.defaultdict(list)
    for row in read_rows(output):
        rows[row["path"]].append(row)
    return rows


def broken_then_mended(folder: Path, count: int, broken: int) -> tuple[list[Path], dict[Path, bytes]]:
    """COUNT pictures, the first BROKEN of them replaced by an error page; and their good bytes."""
    paths = small_images(folder, count)
    good = {path: path.read_bytes() for path in paths[:broken]}
    for path in good:
        path.write_bytes(HTML)
    return paths, good


def test_retry_failed_redoes_only_the_failed_rows_each_in_its_old_rows_place(tmp_path):
    paths, good = broken_then_mended(tmp_path / "in", 40, 6)
    output = tmp_path / "out"
    for task in range(2):  # parts of two shards; the retry runs as one task over both
        run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", "--num-shards", "2",
                  "--shard-index", str(task))  # fmt: skip
    parts = sorted(output.glob("part-*.parquet"))
    kept = {path: found for path, found in rows_by_path(output).items() if found[0]["error"] is None}
    for path, data in good.items():
        path.write_bytes(data)  # the cause is fixed
    (tmp_path / "in" / "new.png").write_bytes(paths[-1].read_bytes())  # and the tree grew

    result = run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", "--retry-failed")

    assert "7 to classify (6 of them to redo, whose rows failed)" in result.stderr
    rows = rows_by_path(output)
    assert len(rows) == 41 and all(len(found) == 1 for found in rows.values())
    assert all(found[0]["error"] is None for found in rows.values())
    # The failed rows' parts were rewritten under their own names; a new part holds the new input only.
    after = sorted(output.glob("part-*.parquet"))
    assert [pq.read_metadata(part).num_rows for part in after if part not in parts] == [1]
    assert all(rows[path] == found for path, found in kept.items())  # the other rows, as they were
    summary = run_batch("summary", output).stdout
    assert "errors: none" in summary and "complete: every path has exactly one row" in summary
    again = run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", "--retry-failed")
    assert "nothing to classify" in again.stderr


def test_retry_kind_redoes_only_errors_of_that_kind(tmp_path):
    paths, good = broken_then_mended(tmp_path / "in", 12, 3)
    truncated = paths[5]
    truncated.write_bytes(truncated.read_bytes()[:100])
    output = tmp_path / "out"
    run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1")
    for path, data in good.items():
        path.write_bytes(data)

    run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", "--retry-failed",
              "--retry-kind", "not an image")  # fmt: skip

    errors = {path: found[0]["error"] for path, found in rows_by_path(output).items()}
    assert len(errors) == 12
    assert [path for path, error in errors.items() if error] == [str(truncated)]
    assert errors[str(truncated)].startswith("truncated")
    refused = run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--retry-kind", "x", check=False)
    assert refused.returncode == 2 and "--retry-kind narrows --retry-failed" in refused.stderr
    both = run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--retry-failed", "--overwrite", check=False)
    assert both.returncode == 2 and "choose one" in both.stderr


def test_pending_with_retry_failed_lists_the_failed_inputs_too(tmp_path):
    paths, _ = broken_then_mended(tmp_path / "in", 10, 2)
    output, manifest, to_do = tmp_path / "out", tmp_path / "all.parquet", tmp_path / "todo.parquet"
    run_batch("index", tmp_path / "in", "-o", manifest)
    run_batch("classify", manifest, "-o", output, *FAST, "--workers", "1")
    small_images(tmp_path / "in" / "more", 3)
    run_batch("index", tmp_path / "in", "-o", manifest)

    assert run_batch("pending", manifest, output, "-o", to_do).stdout.strip() == "3"
    assert run_batch("pending", manifest, output, "-o", to_do, "--retry-failed").stdout.strip() == "5"
    listed = set(pq.read_table(to_do, columns=["path"]).column("path").to_pylist())
    assert {str(path) for path in paths[:2]} <= listed
    only = run_batch("pending", manifest, output, "-o", to_do, "--retry-failed", "--retry-kind", "truncated")
    assert only.stdout.strip() == "3"


def test_a_kill_at_any_moment_of_a_retry_leaves_every_input_exactly_one_row(tmp_path):
    """Killed again and again just after it has put some new rows in place: while it runs and after each
    kill, a reader sees every input with exactly one row, the old failed one or the new one."""
    _, good = broken_then_mended(tmp_path / "in", 300, 150)
    output = tmp_path / "out"
    run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", "--batch-size", "16",
              "--commit-every", "0")  # fmt: skip
    for path, data in good.items():
        path.write_bytes(data)
    command = [sys.executable, "-m", "batch", "classify", str(tmp_path / "in"), "-o", str(output), *FAST,
               "--workers", "1", "--retry-failed", "--batch-size", "16", "--commit-every", "0"]  # fmt: skip
    failing = [150]  # rows still failed, after each kill
    while len(failing) <= 5:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while child.poll() is None and whole_and_failing(output) == failing[-1]:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
        failing.append(whole_and_failing(output))
    assert failing == sorted(failing, reverse=True) and failing[-1] > 0, failing  # each kill came mid-retry
    run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", "--retry-failed")
    assert whole_and_failing(output) == 0
    assert not [name for name in os.listdir(output) if name.endswith(".tmp")]


def whole_and_failing(output: Path) -> int:
    """How many rows failed, once it is checked that each of the 300 inputs has exactly one."""
    rows = rows_by_path(output)
    assert len(rows) == 300 and all(len(found) == 1 for found in rows.values())
    return sum(found[0]["error"] is not None for found in rows.values())


def test_a_full_output_stops_cleanly_and_a_rerun_after_freeing_space_goes_on(tmp_path, small_disk):
    small_images(tmp_path / "in", 300)
    output = small_disk / "out"
    arguments = ["classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", "--embeddings",
                 "--batch-size", "16", "--commit-every", "0"]  # fmt: skip

    full = run_batch(*arguments, check=False)

    assert full.returncode == 74, full.stderr
    assert "Traceback" not in full.stderr
    assert f"the output {output} is full (ENOSPC: No space left on device)" in full.stderr
    committed = int(full.stderr.split("this run committed ")[1].split()[0])
    assert 0 < committed < 300
    assert not [name for name in os.listdir(output) if name.startswith(".part-")]  # the staging file went
    rows = rows_by_path(output)  # every committed part reads whole
    assert len(rows) == committed and all(len(found) == 1 for found in rows.values())

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    run_batch(*arguments)
    rows = rows_by_path(output)
    assert len(rows) == 300 and all(len(found) == 1 for found in rows.values())


def test_summary_and_report_count_the_transient_errors_apart(tmp_path):
    from batch.paths import BUCKETS
    from benchmarks.scale import made_up_paths, write_results

    output = tmp_path / "out"
    paths = made_up_paths(20)
    write_results(output, paths, range(BUCKETS), failed={0, 1, 2})
    summary = run_batch("summary", output).stdout
    assert "errors: 3 (15.00%), 3 of them transient" in summary
    assert "io error  (transient: once the file system is well, `batch classify --retry-failed` redoes them)" in summary
    run_batch("report", output, "-o", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "<td class=kind>io error<p class=note>transient: once the file system is well" in page


def test_a_read_that_fails_twice_is_tried_again_and_the_file_classified(tmp_path):
    """The waits (0.5 and 2 s) are longer than --decode-timeout together and one alone: it times each try."""
    paths = small_images(tmp_path / "in", 6)
    tokens = tmp_path / "tokens"
    env = fault_env(paths[3].name, 2, errno.EIO, tokens_dir=tokens)
    result = run_batch("classify", tmp_path / "in", "-o", tmp_path / "out", *FAST, "--workers", "2",
                       "--decode-timeout", "1.5", env=env)  # fmt: skip
    assert tokens_left(tokens) == 0  # both faults were met
    rows = rows_by_path(tmp_path / "out")
    assert len(rows) == 6 and all(found[0]["error"] is None for found in rows.values())
    assert "classified 6 images, 0 failed" in result.stderr


def test_a_read_that_keeps_failing_gets_its_own_kind_and_retry_failed_redoes_it(tmp_path):
    paths = small_images(tmp_path / "in", 6)
    env = fault_env(paths[2].name, 100, errno.ESTALE, tokens_dir=tmp_path / "tokens")
    output = tmp_path / "out"
    failed = run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", "--io-retries", "1", env=env)
    row = rows_by_path(output)[str(paths[2])][0]
    assert row["error"] == "io error: [Errno 116] Stale file handle (failed 2 times)"
    assert "6 images, 1 failed (1 of them 'io error'" in failed.stderr and "--retry-failed redoes them" in failed.stderr
    assert "1 of them transient" in run_batch("summary", output).stdout

    run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", "--retry-failed")  # mended
    rows = rows_by_path(output)
    assert len(rows) == 6 and all(len(found) == 1 and found[0]["error"] is None for found in rows.values())


def test_a_tar_whose_listing_and_member_reads_fail_for_a_moment(tmp_path):
    pictures = small_images(tmp_path / "pictures", 8)
    tar = tmp_path / "in" / "shard.tar"
    tar.parent.mkdir()
    with tarfile.open(tar, "w") as archive:
        for picture in pictures:
            archive.add(picture, arcname=picture.name)
    output = tmp_path / "out"
    env = fault_env("shard.tar", 4, errno.EIO, tokens_dir=tmp_path / "tokens")  # listed 4 times, each failing

    result = run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", env=env)

    assert f"cannot list {tar}: [Errno 5] Input/output error; trying again in 0.5 s" in result.stderr
    rows = rows_by_path(output)
    assert list(rows) == [f"{tar}/"]
    assert rows[f"{tar}/"][0]["error"] == "io error: [Errno 5] Input/output error (failed 4 times)"

    small_images(tmp_path / "other", 2)  # a run that does not list the tar leaves its row alone
    run_batch("classify", tmp_path / "other", "-o", output, *FAST, "--workers", "1", "--retry-failed")
    assert rows_by_path(output)[f"{tar}/"][0]["error"].startswith("io error")

    run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", "--retry-failed",
              env=fault_env("shard.tar", 2, errno.EIO, tokens_dir=tmp_path / "tokens"))  # member reads fail twice
    rows = {path: found for path, found in rows_by_path(output).items() if "/other/" not in path}
    assert sorted(rows) == sorted(f"{tar}/{picture.name}" for picture in pictures)  # the tar's row is gone
    assert all(len(found) == 1 and found[0]["error"] is None for found in rows.values())


def test_a_lock_that_fails_is_explained_and_the_run_goes_on(tmp_path):
    small_images(tmp_path / "in", 3)
    output = tmp_path / "out"
    result = run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--workers", "1", env=lock_fault_env())
    assert f"cannot lock {output}/.lock (ENOLCK: No locks available)" in result.stderr
    assert "going on unguarded" in result.stderr and len(rows_by_path(output)) == 3


def test_a_parquet_file_of_images_whose_reads_fail_for_a_moment(tmp_path):
    pictures = small_images(tmp_path / "pictures", 5)
    table = tmp_path / "in" / "images.parquet"
    table.parent.mkdir()
    pq.write_table(pa.table({"key": [p.stem for p in pictures], "jpg": [p.read_bytes() for p in pictures]}), table)
    tokens = tmp_path / "tokens"

    result = run_batch("classify", tmp_path / "in", "-o", tmp_path / "out", *FAST, "--workers", "1",
                       env=fault_env("images.parquet", 3, errno.EIO, tokens_dir=tokens))  # fmt: skip

    assert tokens_left(tokens) == 0 and "trying again in" in result.stderr
    rows = rows_by_path(tmp_path / "out")
    assert sorted(rows) == sorted(f"{table}/{p.stem}.jpg" for p in pictures)
    assert all(found[0]["error"] is None for found in rows.values())
