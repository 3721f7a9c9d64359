"""`batch bench` on tiny inputs: every stage reports, bad files are named, temporary files go away.

The numbers are this machine's and are not asserted; docs/benchmarks.md records them.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
from PIL import Image

from batch.bench import generate_images
from tests.conftest import FAST, run_batch

TINY = ("--generate", "6", "--width", "80-120", "--batch-size", "4", "--workers", "1")
STAGES = ("read", "decode+preprocess", "check for --decode gpu", "decode+preprocess on device", "model", "write", "end to end",
          "end to end, --decode gpu")  # fmt: skip


def stage_lines(report: str) -> list[str]:
    return re.findall(r"^  (\S.*?) +[0-9.]+ images/s", report, re.MULTILINE)


def test_bench_reports_every_stage_and_a_suggestion(tmp_path):
    result = run_batch("bench", *TINY, *FAST, env={"TMPDIR": str(tmp_path)})
    report = result.stdout
    assert report.startswith("batch bench: 6 generated JPEGs 80-120 px wide, smooth random scenes; mobilenet_v3_small (none)")
    assert stage_lines(report) == list(STAGES), report
    assert re.search(r"^suggestion: .*--cpus-per-task of about N/[0-9]+ \+ 1", report, re.MULTILINE)
    assert list(tmp_path.iterdir()) == [], "generated images and outputs must be deleted"


def test_generated_pictures_are_camera_shaped_and_the_same_every_time(tmp_path):
    paths = generate_images(tmp_path / "a", 8, (80, 120))
    again = generate_images(tmp_path / "b", 8, (80, 120))
    for number, (path, same) in enumerate(zip(paths, again)):
        with Image.open(path) as picture:
            width, height = picture.size if number % 4 else picture.size[::-1]  # every fourth is portrait
            assert 80 <= width <= 120 and height == width * 3 // 4, (number, picture.size)
            assert np.asarray(picture).std() > 2  # a scene with sensor noise, not a flat colour
        assert open(path, "rb").read() == open(same, "rb").read()


def test_bench_refuses_an_empty_folder_and_a_bad_width(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_batch("bench", tmp_path / "empty", *FAST, check=False)
    assert result.returncode == 2 and "no images found in" in result.stderr
    result = run_batch("bench", "--width", "2000-x", check=False)
    assert result.returncode == 2 and "is not a width" in result.stderr


def test_bench_times_the_files_that_decode_and_names_those_that_do_not(photos, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    (folder / "page.jpg").write_text("<html><body>404</body></html>")
    result = run_batch("bench", folder, *FAST, "--workers", "1")
    assert f"1 of 4 files cannot be decoded, such as {folder / 'page.jpg'}: not an image" in result.stdout
    assert stage_lines(result.stdout) == list(STAGES)
    for photo in folder.glob("*.jpg"):
        photo.write_bytes(b"")
    result = run_batch("bench", folder, *FAST, check=False)
    assert result.returncode == 2 and "none of the 4 files can be decoded, such as" in result.stderr
