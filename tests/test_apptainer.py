"""The SIF, with the real Apptainer (tests/apptainer.py): made by `batch image sif` from the real image, run
the way the README says and the way a cluster runs it, and as the default runtime of slurm/classify.sh."""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path

import pytest

import batch
from tests.conftest import REPOSITORY, build_context, read_rows, run_batch
from tests.images import small_images
from tests.test_container import data_folder, model_folder, same_rows
from batch.environment import Shard
from tests.test_slurm import (CPU_JOBS, ON_THE_CPU, SMALL_TASKS, SUBMIT, assert_every_input_once, run_container_array,
                              wait_for_part)


@pytest.fixture(scope="module")
def sif(podman, image, apptainer) -> Path:
    """`batch image sif`: podman save, apptainer build from the OCI archive, apptainer test."""
    folder = podman.workspace / "sif-real"
    folder.mkdir()
    podman.give(folder)
    started = time.monotonic()
    run_batch("image", "sif", "-o", folder / "classify.sif", "--image", image, env=apptainer.env(podman.env),
              timeout=3000)  # fmt: skip
    size = (folder / "classify.sif").stat().st_size
    print(f"batch image sif: {time.monotonic() - started:.0f} s, SIF {size / 2**30:.2f} GiB")
    (folder / "classify.oci.tar").unlink()
    return folder / "classify.sif"


def readme_apptainer_lines(command: str = "exec|run") -> list[str]:
    text = (REPOSITORY / "README.md").read_text()
    return [line.split("  #")[0].strip() for line in text.splitlines() if re.match(rf"apptainer ({command}) ", line)]


@pytest.fixture(scope="module")
def def_sif(podman, base_image, apptainer) -> Path:
    """The README's offline build line, `apptainer build` of apptainer.def with the base from a file, run as
    written in a checkout but for its paths: python.tar is the test's base image saved by Podman. No
    container registry is asked; %post installs the pinned packages from PyPI, as the Podman build does."""
    (line,) = [line for line in readme_apptainer_lines("build") if "--build-arg" in line]
    folder = podman.workspace / "sif-def"
    folder.mkdir()
    podman.give(folder)
    podman("save", "--format", "docker-archive", "-o", str(folder / "python.tar"), base_image)
    words = [re.sub(r"=python\.tar$", f"={folder / 'python.tar'}", word) for word in shlex.split(line)]
    words[words.index("classify.sif")] = str(folder / "classify.sif")
    started = time.monotonic()
    built = apptainer(*words[1:], cwd=build_context(podman), env=apptainer.build_env(), timeout=3000)
    print(f"apptainer build from apptainer.def: {time.monotonic() - started:.0f} s")
    assert "Running post scriptlet" in built.stderr and "docker.io" not in built.stdout + built.stderr
    (folder / "python.tar").unlink()
    return folder / "classify.sif"


def test_readme_apptainer_lines_work_as_written(apptainer, sif, podman, photos):
    """Each exec and run line of the README runs unchanged but for its paths: /data and /scratch become
    folders of the test's, classify.sif the SIF made above."""
    lines = readme_apptainer_lines()
    assert any(line.startswith("apptainer exec --nv --cleanenv --bind") for line in lines)
    assert any(line.startswith("apptainer run ") for line in lines)
    for line in lines:
        folder = data_folder(podman, photos)
        (folder / "data").mkdir()
        (folder / "images").rename(folder / "data" / "images")
        (folder / "scratch").mkdir()
        podman.give(folder)
        words = [re.sub(r"(^|[,:])/(data|scratch)\b", rf"\1{folder}/\2", word) for word in shlex.split(line)]
        words[words.index("classify.sif")] = str(sif)
        result = apptainer(*words[1:])
        if "classify" in words and "-o" in words:
            rows = read_rows(Path(words[words.index("-o") + 1]))
            assert len(rows) == 4, line
        else:
            assert "Usage: batch classify" in result.stdout, f"{line}\n{result.stdout}\n{result.stderr}"


def test_the_runscript_is_batch(apptainer, sif):
    """`apptainer run` reaches batch's commands, as a SIF built from apptainer.def does (`batch "$@"`)."""
    assert apptainer("run", str(sif), "--version").stdout.strip() == f"batch, version {batch.__version__}"
    assert "Usage: batch [OPTIONS] COMMAND" in apptainer("run", str(sif)).stdout
    assert "Usage: batch pending" in apptainer("run", str(sif), "pending", "--help").stdout


def test_runs_read_only_as_another_user_contained_without_network(apptainer, sif, podman, photos):
    """As a cluster runs it: nobody's uid, a clean environment, private /tmp and HOME, no network,
    inputs read-only, the image read-only (no --writable-tmpfs)."""
    folder = data_folder(podman, photos)
    os.chmod(folder / "out", 0o777)
    options = ["--cleanenv", "--containall", "--net", "--network", "none",
               "--bind", f"{folder / 'images'}:/data:ro,{folder / 'out'}:/out"]  # fmt: skip
    result = apptainer("exec", *options, str(sif), "batch", "classify", "/data", "-o", "/out/preds", user="nobody")
    assert "classified 4 images, 1 failed" in result.stderr
    rows = {Path(row["path"]).name: row for row in read_rows(folder / "out" / "preds")}
    assert rows["coffee.jpg"]["label"] == "espresso" and rows["broken.jpg"]["error"].startswith("not an image")
    assert {part.stat().st_uid for part in (folder / "out" / "preds").iterdir()} == {65534}
    doctor = apptainer("exec", *options, str(sif), "batch", "doctor", user="nobody").stdout  # fails on unwritable caches
    assert re.search(r"^XDG_CACHE_HOME: \S+ writable$", doctor, re.MULTILINE), doctor
    written = apptainer("exec", *options, str(sif), "touch", "/opt/batch/new", user="nobody", check=False)
    assert written.returncode != 0 and "Read-only file system" in written.stderr


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_a_model_folder_bound_read_only_classifies_as_it_does_outside(apptainer, sif, podman, photos, tmp_path, family):
    folder = model_folder(podman, photos, tmp_path, family)
    os.chmod(folder / "out", 0o777)
    binds = f"{folder / 'images'}:/data:ro,{folder / 'model'}:/model:ro,{folder / 'out'}:/out"
    apptainer("exec", "--cleanenv", "--containall", "--net", "--network", "none", "--bind", binds, str(sif),
              "batch", "classify", "/data", "-o", "/out/preds", "--model", "/model", user="nobody")  # fmt: skip
    same_rows(folder / "out" / "preds", tmp_path / "host")


def test_a_sif_built_from_the_def_holds_and_does_what_the_converted_one_does(apptainer, sif, def_sif, podman, photos):
    """The two routes to a SIF: the same batch, the same packages, the same runscript, the same predictions."""
    for arguments in [["--version"], [], ["pending", "--help"], ["classify", "--help"]]:
        assert apptainer("run", str(def_sif), *arguments).stdout == apptainer("run", str(sif), *arguments).stdout
    freeze = {image: apptainer("exec", str(image), "pip", "freeze").stdout for image in (sif, def_sif)}
    assert freeze[sif] == freeze[def_sif] and "torch==2.14.1" in freeze[sif]
    folder = data_folder(podman, photos)
    predictions = {}
    for name, image in [("converted", sif), ("def", def_sif)]:
        apptainer("exec", "--bind", str(folder), str(image), "batch", "classify", str(folder / "images"),
                  "-o", str(folder / "out" / name))  # fmt: skip
        rows = read_rows(folder / "out" / name)
        predictions[name] = {Path(row["path"]).name: (row["label"], row["score"], row["error"]) for row in rows}
    assert predictions["converted"] == predictions["def"] and len(predictions["def"]) == 4
    assert predictions["def"]["coffee.jpg"][0] == "espresso"


def test_labels_are_readable_with_apptainer_inspect(apptainer, sif):
    labels = json.loads(apptainer("inspect", "--json", "--labels", str(sif)).stdout)["data"]["attributes"]["labels"]
    assert labels["org.opencontainers.image.version"] == batch.__version__
    assert labels["org.opencontainers.image.title"] == "batch"


def test_apptainer_is_the_default_runtime_of_the_slurm_script(cluster, apptainer, sif, podman):
    """An array job with no BATCH_RUNTIME: each task runs `apptainer exec --nv --cleanenv` on the SIF."""
    env = apptainer.env()
    env.pop("BATCH_RUNTIME", None)
    logs = run_container_array(cluster, podman, podman.workspace / "slurm-apptainer", {**env, "BATCH_SIF": str(sif)})
    assert "apptainer exec --nv --cleanenv" in logs


def test_submit_and_a_requeue_with_the_default_runtime(cluster, apptainer, sif, podman):
    """slurm/submit.sh end to end in the SIF (index, pending, the array, the summary job), and a task warned
    with USR1 that passes it through apptainer to batch, requeues itself and resumes."""
    folder = podman.workspace / "slurm-submit"
    inputs = small_images(folder / "in", 300)
    (folder / "out").mkdir()
    podman.give(folder)
    env = {**apptainer.env(), "SLURM_CONF": cluster.env["SLURM_CONF"], "BATCH_SIF": str(sif),
           "IMAGES_PER_TASK": "150", "SBATCH_OPTIONS": " ".join(SMALL_TASKS), **CPU_JOBS}  # fmt: skip
    slow = ["--batch-size", "2", "--commit-every", "0", "--workers", "1"]
    said = cluster(SUBMIT, str(folder / "in"), str(folder / "out"), *ON_THE_CPU, *slow, cwd=folder, env=env).stdout
    array, summary = (re.search(rf"{kind} job:\s+(\d+)", said)[1] for kind in ("array", "summary"))
    wait_for_part(folder / "out", Shard(0, 2))
    cluster("scancel", "--signal=USR1", "--batch", f"{array}_0")
    cluster.start_when_requeued(f"{array}_0")
    states = cluster.wait_until_done([f"{array}_0", f"{array}_1", summary])
    warned = (folder / f"classify-{array}_0.out").read_text()
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{warned}"
    assert "requeueing" in warned and len(re.findall(r"already done", warned)) == 2, warned
    assert_every_input_once(folder / "out", inputs)
    assert "every input is present" in (folder / f"classify-summary-{summary}.out").read_text()
