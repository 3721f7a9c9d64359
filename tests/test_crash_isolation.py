"""A decoder that dies or hangs costs only its file: real crashes, from a Pillow plugin the test registers
(conftest.py's `crashing_plugin`)."""

from __future__ import annotations

import signal
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests import images
from tests.conftest import FAST, read_rows, run_batch


def crashing_file(path: Path, how: str) -> Path:
    path.write_bytes(f"CRASH-WITH-{how}\n".encode() + bytes(1000))
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crashing_decoder_costs_one_row_and_the_run_goes_on(crashing_plugin, tmp_path, workers):
    folder = tmp_path / "in"
    good = images.small_images(folder, 14)
    # Six crashes of four kinds among 20 files in batches of 4: some batches meet two.
    crashes = {"a00": "SIGSEGV", "b05": "SIGKILL", "b06": "ABORT", "c11": "SIGSEGV", "d15": "SIGBUS", "z99": "SIGKILL"}
    crashed = [crashing_file(folder / f"{name}.jpg", how) for name, how in crashes.items()]
    output = tmp_path / "out"

    result = run_batch("classify", folder, "-o", output, *FAST, "--batch-size", "4", "--workers", str(workers),
                       env=crashing_plugin)  # fmt: skip

    rows = read_rows(output)
    by_name = {Path(row["path"]).stem: row for row in rows}
    assert sorted(row["path"] for row in rows) == sorted(str(path) for path in good + crashed)  # each once
    for name, how in crashes.items():
        signal_name = "SIGABRT" if how == "ABORT" else how
        assert by_name[name]["error"].startswith(f"decoder crashed: killed by {signal_name}"), by_name[name]
        assert by_name[name]["label"] is None
    assert all(by_name[path.stem]["error"] is None and by_name[path.stem]["label"] for path in good)
    assert "the decoder died on" in result.stderr and "a new worker takes over" in result.stderr


def test_a_killed_decoder_is_named_as_a_possible_out_of_memory(crashing_plugin, tmp_path):
    folder = tmp_path / "in"
    images.small_images(folder, 2)
    crashing_file(folder / "huge.png", "SIGKILL")

    run_batch("classify", folder, "-o", tmp_path / "out", *FAST, "--workers", "1", env=crashing_plugin)

    errors = [row["error"] for row in read_rows(tmp_path / "out") if row["error"]]
    assert errors == [f"decoder crashed: killed by SIGKILL ({signal.strsignal(signal.SIGKILL)}; out of memory?)"]


def test_a_rerun_after_crashes_has_nothing_left_to_do(crashing_plugin, tmp_path):
    """The crashed files' rows are answers: a rerun does not meet the same files and die again."""
    folder = tmp_path / "in"
    images.small_images(folder, 3)
    crashing_file(folder / "bad.jpg", "SIGSEGV")
    output = tmp_path / "out"
    run_batch("classify", folder, "-o", output, *FAST, "--workers", "1", env=crashing_plugin)

    again = run_batch("classify", folder, "-o", output, *FAST, "--workers", "1", env=crashing_plugin)

    assert "nothing to classify" in again.stderr
    assert ds.dataset(output, format="parquet").count_rows() == 4


def test_a_decoder_that_hangs_is_killed_after_the_timeout(crashing_plugin, tmp_path):
    folder = tmp_path / "in"
    good = images.small_images(folder, 5)
    crashing_file(folder / "endless.jpg", "HANG")

    run_batch("classify", folder, "-o", tmp_path / "out", *FAST, "--batch-size", "2", "--workers", "2",
              "--decode-timeout", "3", env=crashing_plugin, timeout=120)  # fmt: skip

    rows = {Path(row["path"]).name: row for row in read_rows(tmp_path / "out")}
    assert rows.pop("endless.jpg")["error"] == "decoder hung: no answer in 3 s, killed"
    assert sorted(rows) == sorted(path.name for path in good) and all(row["label"] for row in rows.values())


def test_a_file_that_hangs_holds_back_only_its_own_worker(crashing_plugin, tmp_path):
    """Batches come out as they are done: the other worker goes on while one is stuck on a file, and
    their rows are committed (a part per batch here) before the stuck one is killed."""
    folder = tmp_path / "in"
    images.small_images(folder, 40)
    crashing_file(folder / "aaa-endless.jpg", "HANG")  # sorts first: in the first batch
    output = tmp_path / "out"

    run_batch("classify", folder, "-o", output, *FAST, "--batch-size", "2", "--workers", "2", "--commit-every", "0",
              "--decode-timeout", "5", env=crashing_plugin, timeout=120)  # fmt: skip

    committed = {Path(row["path"]).name: int(part.name.split("-c")[1][:6])
                 for part in output.glob("part-*.parquet") for row in read_rows(part)}  # fmt: skip
    assert len(committed) == 41 and len(set(committed.values())) == 21
    assert committed["aaa-endless.jpg"] >= 18, f"the stuck batch was committed as chunk {committed['aaa-endless.jpg']} of 21"
