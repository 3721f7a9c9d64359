from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

import batch

from tests import images

FAST = ("--model", "mobilenet_v3_small", "--weights", "none")  # untrained: for plumbing, not answers


def auto_device_name() -> str:
    """What `--device auto` runs on here, as results record it: the suite passes on a GPU node too."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"

# Running as root reads any file; drop the capabilities that allow it so "unreadable" means unreadable.
DROP_ROOT_READ = (
    ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if os.geteuid() == 0
    else []
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped test is a failure: nothing there may pass by not running."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true":
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a usable CUDA device. Without one (CI never has one) they are deselected
    and the summary says how many, rather than skipped: benchmarks/gpu-check.sh runs them on a GPU node."""
    import torch

    needing = [item for item in items if item.get_closest_marker("gpu")]
    if needing and not torch.cuda.is_available():
        config.hook.pytest_deselected(items=needing)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.stash[_WITHOUT_GPU] = len(needing)


_WITHOUT_GPU = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.stash.get(_WITHOUT_GPU, 0):
        terminalreporter.write_line(f"{config.stash[_WITHOUT_GPU]} GPU tests deselected: no usable CUDA device here "
                                    "(benchmarks/gpu-check.sh runs them on a GPU node)")  # fmt: skip


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Each test gets its own torch cache, so staged weights never leak between tests or from the user."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)


def run_batch(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300,
              umask: int = -1) -> subprocess.CompletedProcess:  # fmt: skip
    """Run the real CLI in a fresh process, as a user would."""
    result = subprocess.run(
        [*DROP_ROOT_READ, sys.executable, "-m", "batch", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, umask=umask,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"batch {' '.join(map(str, args))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def read_rows(output: Path) -> list[dict]:
    return ds.dataset(output, format="parquet").to_table().to_pylist()


def by_path(output: Path) -> dict[str, dict]:
    rows = read_rows(output)
    assert len(rows) == len({row["path"] for row in rows}), "a path has two rows"
    return {row["path"]: row for row in rows}


def assert_same_rows(reference: Path, output: Path, label_changes: int = 0) -> None:
    """Two outputs of the same inputs made another way (device, decoder): the same rows, errors and
    sizes, and the same labels but for at most `label_changes` near-ties."""
    expected, got = by_path(reference), by_path(output)
    assert got.keys() == expected.keys()
    for path, row in expected.items():
        assert (got[path]["error"], got[path]["width"], got[path]["height"]) == (row["error"], row["width"], row["height"]), path
    labels = [(row["label"], got[path]["label"]) for path, row in expected.items()]
    assert sum(before != after for before, after in labels) <= label_changes, labels


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


# A Pillow plugin that claims files starting with a marker and, when Pillow opens one, kills its own
# process the way a native fault in a codec library or the out-of-memory killer would. It is loaded into
# every `batch` process through a sitecustomize module on PYTHONPATH, so the real CLI and its real
# decoding workers meet it exactly as they would meet a broken codec.
PLUGIN = '''
import os
import signal
import time

from PIL import Image, ImageFile

class CrashingFile(ImageFile.ImageFile):
    format = "CRASHING"

    def _open(self):
        how = self.fp.read(32).split(b"\\n")[0].removeprefix(b"CRASH-WITH-").decode()
        if how == "ABORT":
            os.abort()
        if how == "HANG":
            time.sleep(3600)
        os.kill(os.getpid(), getattr(signal, how))

Image.register_open("CRASHING", CrashingFile, lambda head: head.startswith(b"CRASH-WITH-"))
'''


@pytest.fixture
def crashing_plugin(tmp_path) -> dict[str, str]:
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(PLUGIN)
    return {"PYTHONPATH": str(folder)}


REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def podman():
    """Rootless Podman (see tests/podman.py); everything it makes is removed at the end of the session."""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (.ci/run installs it)")
    from tests import podman as harness

    session = harness.start()
    yield session
    session.cleanup()


@pytest.fixture(scope="session")
def base_image(podman) -> str:
    """BATCH_TEST_BASE_IMAGE if given, else Debian 12 made with debootstrap (needs root)."""
    given = os.environ.get("BATCH_TEST_BASE_IMAGE")
    if given:
        return given
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip("set BATCH_TEST_BASE_IMAGE, or run as root with debootstrap installed")
    from tests.podman import debootstrap_base

    return debootstrap_base(podman, f"localhost/batch-test-base-{os.getpid()}:bookworm")


def build_context(podman) -> Path:
    """A checkout of this repository's commit holding the files git would commit as they are now, so the
    image's revision label has a commit to name. Root keeps it (git refuses a checkout another user owns);
    the rootless user only reads it."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPOSITORY, capture_output=True,
                            check=True).stdout.decode().split("\0")  # fmt: skip
    context = podman.workspace / "context"
    shutil.rmtree(context, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", "--depth=1", f"file://{REPOSITORY}", str(context)], check=True)
    subprocess.run(["git", "-C", str(context), "reset", "--quiet"], check=True)  # the index at HEAD, no files yet
    for name in filter(None, listed):
        if (REPOSITORY / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPOSITORY / name, context / name)
    return context


def build_image(podman, context: Path, tag: str, base_image: str) -> subprocess.CompletedProcess:
    """`batch image build` on a context the rootless user can read, with the harness's podman options."""
    return subprocess.run(
        [sys.executable, "-m", "batch", "image", "build", "--tag", tag, "--base-image", base_image, "--context", str(context),
         "--containerfile", str(context / "Containerfile"), "--", *podman.build_options()],
        capture_output=True, text=True, env=podman.env, timeout=3000,
    )  # fmt: skip


@pytest.fixture(scope="session")
def image(podman, base_image) -> str:
    """The real Containerfile, built rootless by `batch image build`."""
    tag = f"localhost/batch-test-{os.getpid()}"  # its own: another session's cleanup removes its images by name
    podman.made += [f"{tag}:latest", f"{tag}:{batch.__version__}"]
    started = time.monotonic()
    result = build_image(podman, build_context(podman), tag, base_image)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    print(f"image build: {time.monotonic() - started:.0f} s")
    return f"{tag}:latest"


@pytest.fixture(scope="session")
def apptainer(podman):
    """The real Apptainer (see tests/apptainer.py), run as Podman's rootless user by default."""
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip("the Apptainer tests run as root with debootstrap installed (.ci/run installs it)")
    from tests import apptainer as harness

    running = harness.start([podman.user, "nobody"])
    yield running
    running.cleanup()


@pytest.fixture(scope="session")
def cluster():
    """A real one-node Slurm (see tests/slurm.py), stopped and removed at the end of the session."""
    if os.geteuid() != 0 or not shutil.which("slurmctld"):
        pytest.skip("the Slurm tests run as root with slurm-wlm and munge installed (.ci/run does both)")
    from tests import slurm

    running = slurm.start()
    yield running
    running.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A real file system that fills: a tmpfs of 192 KiB (root only: CI and this project's machines)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
