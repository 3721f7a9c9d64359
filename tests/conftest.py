from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests import images

# Running as root reads any file; drop the capabilities that allow it so "unreadable" means unreadable.
DROP_ROOT_READ = (
    ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if os.geteuid() == 0
    else []
)


def pytest_configure(config):
    config.addinivalue_line("markers", "may_skip_in_ci: the one test allowed to skip in CI (it needs a real apptainer)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped test is a failure: nothing there may pass by not running."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and "may_skip_in_ci" not in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Each test gets its own torch cache, so staged weights never leak between tests or from the user."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)


def run_batch(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process, as a user would."""
    result = subprocess.run(
        [*DROP_ROOT_READ, sys.executable, "-m", "batch", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"batch {' '.join(map(str, args))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def read_rows(output: Path) -> list[dict]:
    return ds.dataset(output, format="parquet").to_table().to_pylist()


@pytest.fixture(scope="session")
def awkward_folder(tmp_path_factory) -> Path:
    """Every awkward image that must classify and every bad file that must get an error row."""
    root = tmp_path_factory.mktemp("awkward")
    images.write_all(root / "good", images.GOOD)
    images.write_all(root / "bad", images.BAD)
    (root / "folder.jpg").mkdir()  # a directory named like an image is walked, not read
    shutil.copy(images.PHOTOS / "coffee.jpg", root / "folder.jpg" / "inside.jpg")
    (root / "loop").mkdir()
    os.symlink("..", root / "loop" / "back")  # a symlink loop must not hang the walk
    (root / "readme.txt").write_text("not an input: no image extension")
    return root


@pytest.fixture
def photos() -> Path:
    return images.PHOTOS
