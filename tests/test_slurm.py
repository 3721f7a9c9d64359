"""The Slurm scripts, submitted unchanged with sbatch to a real one-node cluster that advertises GPUs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch.environment import Shard
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


def wait_for_part(output: Path, shard: Shard, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if output.is_dir() and list(output.glob(f"part-{shard.buckets.start:05d}-*.parquet")):
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
    assert {part.name[:16] for part in output.glob("*.parquet")} == {"part-00000-21845", "part-21845-43690", "part-43690-65536"}
    logs = [(tmp_path / f"classify-{array}_{task}.out").read_text() for task in range(3)]
    assert all(f"shard {task} of 3" in log for task, log in enumerate(logs))
    assert sum(int(re.search(r"classified (\d+) images", log)[1]) for log in logs) == 30


def test_a_requeued_task_and_a_warned_task_still_end_with_every_input_once(cluster, tmp_path):
    inputs = small_images(tmp_path / "in", 900)
    output = tmp_path / "out"
    slow = ["--batch-size", "2", "--commit-every", "0", "--workers", "1"]
    array = sbatch(cluster, "--array=0-2", *SMALL_TASKS, CLASSIFY, str(tmp_path / "in"), str(output), *FAST, *slow,
                   cwd=tmp_path, env=job_env(cluster))  # fmt: skip
    wait_for_part(output, Shard(0, 3))
    cluster("scontrol", "requeue", f"{array}_0")  # as an administrator or a preemption would
    wait_for_part(output, Shard(1, 3))
    cluster("scancel", "--signal=USR1", "--batch", f"{array}_1")  # what --signal=B:USR1@120 sends
    states = cluster.wait_until_done([f"{array}_{task}" for task in range(3)])
    assert set(states.values()) == {"COMPLETED"}, states
    assert_every_input_once(output, inputs)
    warned = (tmp_path / f"classify-{array}_1.out").read_text()
    assert "received SIGUSR1" in warned and "requeueing" in warned
    for task in (0, 1):
        runs = re.findall(r"shard \d of 3 \(buckets [0-9-]+\): \d+ inputs, (\d+) already done",
                          (tmp_path / f"classify-{array}_{task}.out").read_text())  # fmt: skip
        assert len(runs) == 2 and runs[0] == "0" and int(runs[1]) > 0, runs  # the second run resumed


def submit(cluster, tmp_path: Path, *options: str, per_task: int = 5) -> tuple[str, str, str]:
    """slurm/submit.sh as a user runs it; its output, and the array and summary job ids ("" if none)."""
    env = job_env(cluster, IMAGES_PER_TASK=str(per_task), SBATCH_OPTIONS=" ".join(SMALL_TASKS))
    said = cluster(SUBMIT, str(tmp_path / "in"), str(tmp_path / "out"), *FAST, *options, cwd=tmp_path, env=env)
    jobs = [re.search(rf"{kind} job:\s+(\d+)", said.stdout) for kind in ("array", "summary")]
    return said.stdout + said.stderr, *(job[1] if job else "" for job in jobs)


def test_submit_sizes_the_array_within_max_array_size_and_reruns_only_what_is_new(cluster, tmp_path):
    inputs = small_images(tmp_path / "in" / "old", 25)
    said, array, summary = submit(cluster, tmp_path)  # 5 tasks of 5, but the test cluster's MaxArraySize is 4
    assert "5 tasks of 5 would pass MaxArraySize=4: using 4 larger tasks" in said
    assert "25 images to classify in 4 array tasks of about 7" in said
    states = cluster.wait_until_done([*(f"{array}_{task}" for task in range(4)), summary])
    assert set(states.values()) == {"COMPLETED"}, states
    report = (tmp_path / f"classify-summary-{summary}.out").read_text()
    assert "25 rows in 4 parts from 4 shards" in report and "every input is present" in report

    inputs += small_images(tmp_path / "in" / "new", 3)
    said, array, summary = submit(cluster, tmp_path)
    assert "3 images to classify in 1 array tasks of about 3" in said
    states = cluster.wait_until_done([f"{array}_0", summary])
    assert set(states.values()) == {"COMPLETED"}, states
    assert_every_input_once(tmp_path / "out", inputs)
    assert "classified 3 images" in (tmp_path / f"classify-{array}_0.out").read_text()

    said, array, summary = submit(cluster, tmp_path)
    assert "nothing to classify: every image in" in said and not array and not summary


def test_the_summary_job_runs_after_failed_tasks_and_names_them(cluster, tmp_path):
    small_images(tmp_path / "in", 8)
    said, array, summary = submit(cluster, tmp_path, "--topk", "0")  # refused by every task: exit 2
    states = cluster.wait_until_done([f"{array}_0", f"{array}_1", summary])
    assert states == {f"{array}_0": "FAILED", f"{array}_1": "FAILED", summary: "FAILED"}, states
    report = (tmp_path / f"classify-summary-{summary}.out").read_text()
    assert "FAILED: array tasks that did not complete:" in report
    assert f" {array}_0 (FAILED)" in report and f" {array}_1 (FAILED)" in report


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
