"""Pillow's own test images, every format and fault, through the real `batch classify`.

No one here made these files, so they hold what our own writers never thought to write. Each must get
exactly one row, the run must not fail, and every file that plain Pillow fully loads must be classified.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests import corpus
from tests.conftest import FAST, read_rows, run_batch

@pytest.fixture(scope="module")
def corpus_files() -> dict[str, Path]:
    """Every file of the corpus by a unique flat name."""
    folder = corpus.images_folder()
    if folder is None:
        pytest.skip(f"the public corpus is not in {corpus.CACHE}: .ci/run fetches it")
    files = {corpus.flat_name(path.relative_to(folder)): path for path in corpus.files_of(folder)}
    assert len(files) > 1000, "the corpus is Pillow's whole Tests/images, each file under its own name"
    return files


def test_every_corpus_file_gets_one_row_and_what_pillow_loads_is_classified(corpus_files, tmp_path):
    started = time.monotonic()
    by_path = corpus.verdicts(corpus_files.values())
    verdicts = {name: by_path[path] for name, path in corpus_files.items()}
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, path in corpus_files.items():  # those that crash or hang Pillow too: the pool isolates them
        shutil.copyfile(path, inputs / name)
    judged = time.monotonic()

    run_batch("classify", inputs, "-o", tmp_path / "out", *FAST, "--workers", "2", "--decode-timeout", "60")  # about 25 s
    rows = {Path(row["path"]).name: row for row in read_rows(tmp_path / "out")}
    print(f"{len(rows)} files: Pillow's verdicts {judged - started:.0f} s, batch classify {time.monotonic() - judged:.0f} s")

    assert sorted(rows) == sorted(path.name for path in inputs.iterdir()), "exactly one row per file"
    loads = {name for name, verdict in verdicts.items() if verdict == corpus.LOADS}
    unclassified = {name: rows[name]["error"] for name in loads if rows[name]["label"] is None or rows[name]["error"]}
    assert unclassified == {}, "Pillow loads these, batch must classify them"
    no_error = sorted(name for name in set(rows) - loads if rows[name]["error"] is None)
    assert no_error == [], "Pillow cannot load these: each must have an error row"
    assert len(loads) > 500 and len(rows) - len(loads) > 100  # both halves of the check saw real files
