"""The Slurm scripts, submitted unchanged with sbatch to a real one-node cluster that advertises GPUs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, REPOSITORY, read_rows
from tests.images import small_images

CLASSIFY = str(REPOSITORY / "slurm" / "classify.sh")
SUBMIT = str(REPOSITORY / "slurm" / "submit.sh")
SMALL_TASKS = ["--cpus-per-task=1", "--mem=1G", "--time=00:20:00"]  # the script asks for 8 CPUs and 32G


def job_env(cluster, **variables: str) -> dict[str, str]:
    """Runtime `none` runs the `batch` of this test environment."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**cluster.env, "PATH": path, "BATCH_RUNTIME": "none", **variables}


def sbatch(cluster, *arguments: str, cwd: Path, env: dict[str, str]) -> str:
    return cluster("sbatch", "--parsable", *arguments, cwd=cwd, env=env).stdout.strip().split(";")[0]


def assert_every_input_once(output: Path, inputs: list[Path]) -> None:
    paths = [row["path"] for row in read_rows(output)]
    assert sorted(paths) == sorted(map(str, inputs)), "an input is missing or doubled"


def wait_for_part(output: Path, shard: int, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if output.is_dir() and list(output.glob(f"part-{shard:05d}-of-*.parquet")):
            return
        time.sleep(0.1)
    raise AssertionError(f"shard {shard} committed nothing within {limit} s")


@pytest.mark.parametrize("script, arguments", [(CLASSIFY, []), (CLASSIFY, ["only-input"]), (CLASSIFY, ["--help", "x"]),
                                                (SUBMIT, []), (SUBMIT, ["in"])])  # fmt: skip
def test_bad_arguments_print_the_usage(script, arguments):
    result = subprocess.run(["bash", script, *arguments], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("usage: ")


def test_a_bad_runtime_is_named(tmp_path):
    env = {**os.environ, "BATCH_RUNTIME": "docker"}
    result = subprocess.run(["bash", CLASSIFY, str(tmp_path), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "BATCH_RUNTIME must be apptainer, podman or none, not 'docker'" in result.stderr


def test_an_array_of_three_tasks_covers_every_input_once(cluster, tmp_path):
    inputs = small_images(tmp_path / "in", 30)
    output = tmp_path / "out"
    array = sbatch(cluster, "--array=0-2", *SMALL_TASKS, CLASSIFY, str(tmp_path / "in"), str(output), *FAST,
                   cwd=tmp_path, env=job_env(cluster))  # fmt: skip
    states = cluster.wait_until_done([f"{array}_{task}" for task in range(3)])
    assert set(states.values()) == {"COMPLETED"}, states
    assert_every_input_once(output, inputs)
    assert {part.name[:19] for part in output.glob("*.parquet")} == {f"part-0000{i}-of-00003" for i in range(3)}
    for task in range(3):
        log = (tmp_path / f"classify-{array}_{task}.out").read_text()
        assert f"shard {task} of 3" in log and "classified 10 images" in log


def test_a_requeued_task_and_a_warned_task_still_end_with_every_input_once(cluster, tmp_path):
    inputs = small_images(tmp_path / "in", 900)
    output = tmp_path / "out"
    slow = ["--batch-size", "2", "--commit-every", "0", "--workers", "1"]
    array = sbatch(cluster, "--array=0-2", *SMALL_TASKS, CLASSIFY, str(tmp_path / "in"), str(output), *FAST, *slow,
                   cwd=tmp_path, env=job_env(cluster))  # fmt: skip
    wait_for_part(output, 0)
    cluster("scontrol", "requeue", f"{array}_0")  # as an administrator or a preemption would
    wait_for_part(output, 1)
    cluster("scancel", "--signal=USR1", "--batch", f"{array}_1")  # what --signal=B:USR1@120 sends
    states = cluster.wait_until_done([f"{array}_{task}" for task in range(3)])
    assert set(states.values()) == {"COMPLETED"}, states
    assert_every_input_once(output, inputs)
    warned = (tmp_path / f"classify-{array}_1.out").read_text()
    assert "received SIGUSR1" in warned and "requeueing" in warned
    for task in (0, 1):
        runs = re.findall(r"shard \d of 3: \d+ of \d+ inputs, (\d+) already done", (tmp_path / f"classify-{array}_{task}.out").read_text())
        assert len(runs) == 2 and runs[0] == "0" and int(runs[1]) > 0, runs  # the second run resumed


def test_submit_indexes_sizes_the_array_and_checks_the_result(cluster, tmp_path):
    inputs = small_images(tmp_path / "in", 25)
    output = tmp_path / "out"
    env = job_env(cluster, IMAGES_PER_TASK="10", SBATCH_OPTIONS=" ".join(SMALL_TASKS))
    result = cluster(SUBMIT, str(tmp_path / "in"), str(output), *FAST, cwd=tmp_path, env=env)
    assert "25 images in 3 array tasks of up to 10" in result.stdout
    array = re.search(r"array job:\s+(\d+)", result.stdout)[1]
    summary = re.search(r"summary job:\s+(\d+)", result.stdout)[1]
    states = cluster.wait_until_done([*(f"{array}_{task}" for task in range(3)), summary])
    assert set(states.values()) == {"COMPLETED"}, states
    assert_every_input_once(output, inputs)
    report = (tmp_path / f"classify-summary-{summary}.out").read_text()
    assert "25 rows in 3 parts from 3 shards" in report and "every input is present" in report


def test_the_podman_runtime_inside_a_slurm_job(cluster, podman, image):
    """Submitted from a folder of the rootless user's, as that user's own job would be: the harness runs
    Podman as that user, who cannot enter root's private test folders."""
    folder = podman.workspace / "slurm-podman"
    inputs = small_images(folder / "in", 12)
    (folder / "out").mkdir()
    podman.give(folder)
    env = {**podman.env, "SLURM_CONF": cluster.env["SLURM_CONF"], "BATCH_RUNTIME": "podman", "BATCH_IMAGE": image,
           "BATCH_PODMAN_DEVICES": ""}  # fmt: skip  # the test node's GPUs are placeholders: no CDI devices
    array = sbatch(cluster, "--array=0-1", *SMALL_TASKS, CLASSIFY, str(folder / "in"), str(folder / "out"), *FAST,
                   cwd=folder, env=env)  # fmt: skip
    states = cluster.wait_until_done([f"{array}_0", f"{array}_1"])
    logs = "".join(path.read_text() for path in folder.glob("classify-*.out"))
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs}"
    assert "podman run --rm --userns=keep-id:uid=1000,gid=1000" in logs
    assert_every_input_once(folder / "out", inputs)
