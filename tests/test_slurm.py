"""The Slurm scripts, submitted unchanged with sbatch to a real one-node cluster that advertises GPUs."""

from __future__ import annotations

import os
import re
import signal
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
# The test node's GPUs are placeholders: under --device auto batch refuses to crawl on the CPU in a job
# that was promised a GPU (test_a_job_promised_a_gpu_it_cannot_use_fails_at_once_and_says_why).
ON_THE_CPU = (*FAST, "--device", "cpu")


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
    array = sbatch(cluster, "--array=0-2", *SMALL_TASKS, CLASSIFY, str(tmp_path / "in"), str(output), *ON_THE_CPU,
                   cwd=tmp_path, env=job_env(cluster))  # fmt: skip
    states = cluster.wait_until_done([f"{array}_{task}" for task in range(3)])
    assert set(states.values()) == {"COMPLETED"}, states
    assert_every_input_once(output, inputs)
    assert {part.name[:16] for part in output.glob("*.parquet")} == {"part-00000-21845", "part-21845-43690", "part-43690-65536"}
    logs = [(tmp_path / f"classify-{array}_{task}.out").read_text() for task in range(3)]
    assert all(f"shard {task} of 3" in log for task, log in enumerate(logs))
    assert sum(int(re.search(r"classified (\d+) images", log)[1]) for log in logs) == 30


def test_a_job_promised_a_gpu_it_cannot_use_fails_at_once_and_says_why(cluster, tmp_path):
    """The script asks for a GPU (--gres=gpu:1), and the test node's are placeholders CUDA cannot use:
    batch exits 2 before any work instead of running on the CPU, 30 to 100 times slower, for hours."""
    small_images(tmp_path / "in", 3)
    job = sbatch(cluster, "--output=log.out", *SMALL_TASKS, CLASSIFY, str(tmp_path / "in"), str(tmp_path / "out"), *FAST,
                 cwd=tmp_path, env=job_env(cluster))  # fmt: skip
    assert cluster.wait_until_done([job]) == {job: "FAILED"}
    said = " ".join((tmp_path / "log.out").read_text().split())
    assert re.search(r"--device auto: a GPU was promised \(SLURM_\w+=\S+\) but CUDA cannot be used: ", said), said
    assert "pass --device cpu to run on the CPU on purpose" in said
    assert not list((tmp_path / "out").iterdir()), "nothing written"


def test_a_requeued_task_and_a_warned_task_still_end_with_every_input_once(cluster, tmp_path):
    inputs = small_images(tmp_path / "in", 900)
    output = tmp_path / "out"
    slow = ["--batch-size", "2", "--commit-every", "0", "--workers", "1"]
    array = sbatch(cluster, "--array=0-2", *SMALL_TASKS, CLASSIFY, str(tmp_path / "in"), str(output), *ON_THE_CPU, *slow,
                   cwd=tmp_path, env=job_env(cluster))  # fmt: skip
    wait_for_part(output, Shard(0, 3))
    cluster("scontrol", "requeue", f"{array}_0")  # as an administrator or a preemption would
    wait_for_part(output, Shard(1, 3))
    cluster("scancel", "--signal=USR1", "--batch", f"{array}_1")  # what --signal=B:USR1@120 sends
    for task in (0, 1):
        cluster.start_when_requeued(f"{array}_{task}")
    states = cluster.wait_until_done([f"{array}_{task}" for task in range(3)])
    assert set(states.values()) == {"COMPLETED"}, states
    assert_every_input_once(output, inputs)
    warned = (tmp_path / f"classify-{array}_1.out").read_text()
    assert "received SIGUSR1" in warned and "requeueing" in warned
    for task in (0, 1):
        runs = re.findall(r"shard \d of 3 \(buckets [0-9-]+\): \d+ inputs, (\d+) already done",
                          (tmp_path / f"classify-{array}_{task}.out").read_text())  # fmt: skip
        assert len(runs) == 2 and runs[0] == "0" and int(runs[1]) > 0, runs  # the second run resumed


# The index and summary jobs of submit.sh, sized for the test cluster's one node of this machine's CPUs.
CPU_JOBS = {"INDEX_CPUS": "2", "CPU_SBATCH_OPTIONS": "--partition=debug --time-min=00:10:00"}


def submit(cluster, tmp_path: Path, *options: str, per_task: int = 5) -> tuple[str, str, str]:
    """slurm/submit.sh as a user runs it; its output, and the array and summary job ids ("" if none)."""
    env = job_env(cluster, IMAGES_PER_TASK=str(per_task), SBATCH_OPTIONS=" ".join(SMALL_TASKS), **CPU_JOBS)
    said = cluster(SUBMIT, str(tmp_path / "in"), str(tmp_path / "out"), *ON_THE_CPU, *options, cwd=tmp_path, env=env)
    jobs = [re.search(rf"{kind} job:\s+(\d+)", said.stdout) for kind in ("array", "summary")]
    return said.stdout + said.stderr, *(job[1] if job else "" for job in jobs)


def test_submit_sizes_the_array_within_max_array_size_and_reruns_only_what_is_new(cluster, tmp_path):
    inputs = small_images(tmp_path / "in" / "old", 25)
    said, array, summary = submit(cluster, tmp_path)  # 5 tasks of 5, but the test cluster's MaxArraySize is 4
    assert "indexing " in said and "in a job of 2 CPUs, 2G and 04:00:00 at most" in said
    assert "indexed 25 images into" in said
    [index_log] = tmp_path.glob("classify-index-*.out")  # the index ran as a job of its own, with its allocation
    assert "batch index: at most 2.0 GiB of memory (the Slurm allocation)" in index_log.read_text()
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


def test_submit_stops_when_the_index_job_fails_and_names_its_log(cluster, tmp_path):
    env = job_env(cluster, INDEX_CPUS="1")
    said = cluster(SUBMIT, f"@{tmp_path / 'missing.txt'}", str(tmp_path / "out"), *ON_THE_CPU, cwd=tmp_path, env=env,
                   check=False)  # fmt: skip
    job = re.search(r"the index job (\d+) failed: see (\S+)", said.stderr)
    assert said.returncode == 1 and job, said.stderr
    assert "list file does not exist" in Path(job[2]).read_text()
    assert not list(tmp_path.glob("out*")), "nothing submitted, nothing written"


def test_submit_refuses_an_index_job_no_node_can_hold_instead_of_waiting_for_ever(cluster, tmp_path):
    small_images(tmp_path / "in", 2)
    env = job_env(cluster, INDEX_CPUS=str(os.cpu_count() + 1))
    said = cluster(SUBMIT, str(tmp_path / "in"), str(tmp_path / "out"), cwd=tmp_path, env=env, check=False, timeout=60)
    assert said.returncode == 2, said.stderr
    assert f"the index job ({os.cpu_count() + 1} CPUs, 2G, 04:00:00) cannot run on this cluster" in said.stderr
    assert "Requested node configuration is not available" in said.stderr and "set INDEX_CPUS" in said.stderr
    assert not cluster("squeue", "--noheader").stdout.strip(), "no job left pending"


def test_submit_with_retry_failed_redoes_the_failed_images_in_place(cluster, tmp_path):
    inputs = small_images(tmp_path / "in", 10)
    good = {path: path.read_bytes() for path in inputs[:2]}
    for path in good:
        path.write_bytes(b"<html>a saved error page</html>")
    said, array, summary = submit(cluster, tmp_path)
    cluster.wait_until_done([f"{array}_0", f"{array}_1", summary])
    for path, data in good.items():
        path.write_bytes(data)  # the cause is fixed
    assert "nothing to classify" in submit(cluster, tmp_path)[0]

    said, array, summary = submit(cluster, tmp_path, "--retry-failed")

    assert "2 images to classify in 1 array tasks" in said
    states = cluster.wait_until_done([f"{array}_0", summary])
    assert set(states.values()) == {"COMPLETED"}, states
    assert_every_input_once(tmp_path / "out", inputs)
    report = (tmp_path / f"classify-summary-{summary}.out").read_text()
    assert "errors: none" in report and "every input is present" in report


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
    env = {**podman.env, "BATCH_RUNTIME": "podman", "BATCH_IMAGE": image,
           "BATCH_PODMAN_DEVICES": ""}  # fmt: skip  # the test node's GPUs are placeholders: no CDI devices
    logs = run_container_array(cluster, podman, podman.workspace / "slurm-podman", env)
    assert "podman run --rm --userns=keep-id:uid=1000,gid=1000" in logs


def run_container_array(cluster, podman, folder: Path, env: dict[str, str]) -> str:
    """A two-task array job of slurm/classify.sh over 12 images in a folder of the rootless user's, with a
    container runtime; every input gets one row, each task its own shard. Returns the tasks' logs."""
    inputs = small_images(folder / "in", 12)
    (folder / "out").mkdir()
    podman.give(folder)
    array = sbatch(cluster, "--array=0-1", *SMALL_TASKS, CLASSIFY, str(folder / "in"), str(folder / "out"), *ON_THE_CPU,
                   cwd=folder, env={**env, "SLURM_CONF": cluster.env["SLURM_CONF"]})  # fmt: skip
    states = cluster.wait_until_done([f"{array}_0", f"{array}_1"])
    logs = "".join(path.read_text() for path in folder.glob("classify-*.out"))
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs}"
    assert_every_input_once(folder / "out", inputs)
    first_buckets = {part.name.split("-")[1] for part in (folder / "out").glob("part-*.parquet")}
    assert len(first_buckets) == 2, "each array task wrote its own shard"
    return logs


# A stand-in for podman and apptainer: it logs its arguments, and holds its GPU until the other task of
# the test has logged too, so that both run at once and Slurm cannot hand them the same GPU.
FAKE_RUNTIME = """echo "$*" >>"$FAKE_LOG"
for _ in $(seq 600); do (($(wc -l <"$FAKE_LOG") >= 2)) && exit 0; sleep 0.1; done
exit 1
"""


def gpu_options(line: str) -> tuple[list[str], list[str]]:
    """The --device arguments and the CUDA_VISIBLE_DEVICES a runtime was given."""
    return re.findall(r"--device (\S+)", line), re.findall(r"--env CUDA_VISIBLE_DEVICES=(\S+)", line)


@pytest.mark.parametrize("runtime", ["podman", "apptainer"])
def test_two_tasks_on_one_node_get_their_own_gpu_in_the_container(cluster, tmp_path, runtime):
    """The test node has two GPUs and no device cgroups: Slurm numbers them by node index, as CDI does."""
    fake_bin, log = fakes(tmp_path / "bin", podman=FAKE_RUNTIME, apptainer=FAKE_RUNTIME)
    env = job_env(cluster, PATH=f"{fake_bin}:{os.environ['PATH']}", FAKE_LOG=str(log), BATCH_RUNTIME=runtime,
                  BATCH_SIF="classify.sif")  # fmt: skip
    array = sbatch(cluster, "--array=0-1", *SMALL_TASKS, CLASSIFY, str(tmp_path), str(tmp_path / "out"), cwd=tmp_path, env=env)
    states = cluster.wait_until_done([f"{array}_0", f"{array}_1"])
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{log.read_text()}"
    given = sorted(gpu_options(line) for line in log.read_text().splitlines())
    if runtime == "podman":  # each its own device, seen in the container as CUDA device 0
        assert given == [(["nvidia.com/gpu=0"], ["0"]), (["nvidia.com/gpu=1"], ["0"])], log.read_text()
    else:  # --nv binds every device; CUDA_VISIBLE_DEVICES picks the task's own
        assert given == [([], ["0"]), ([], ["1"])], log.read_text()


@pytest.mark.parametrize("variables, devices, visible", [
    ({"SLURM_JOB_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0,1"}, ["nvidia.com/gpu=2", "nvidia.com/gpu=3"], ["0,1"]),
    ({"SLURM_JOB_GPUS": "2", "SLURM_STEP_GPUS": "3", "CUDA_VISIBLE_DEVICES": "0"}, ["nvidia.com/gpu=3"], ["0"]),
    ({"SLURM_JOB_GPUS": "2", "BATCH_PODMAN_DEVICES": "nvidia.com/gpu=5", "CUDA_VISIBLE_DEVICES": "1"}, ["nvidia.com/gpu=5"], ["1"]),
    ({"SLURM_JOB_GPUS": "2", "BATCH_PODMAN_DEVICES": ""}, [], []),
    ({}, [], []),  # a job without GPUs
    ({"SLURM_JOB_ID": ""}, ["nvidia.com/gpu=all"], []),  # outside Slurm
])  # fmt: skip
def test_podman_gets_the_gpus_slurm_allotted_by_their_node_index(tmp_path, variables, devices, visible):
    """Where Slurm constrains devices, CUDA_VISIBLE_DEVICES counts from 0 and SLURM_*_GPUS keep node indices."""
    fake_bin, log = fakes(tmp_path / "bin", podman='echo "$*" >>"$FAKE_LOG"\n')
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE_LOG": str(log), "BATCH_RUNTIME": "podman",
           "SLURM_JOB_ID": "7", **variables}  # fmt: skip
    subprocess.run(["bash", CLASSIFY, str(tmp_path), str(tmp_path / "out")], env=env, check=True, capture_output=True)
    assert gpu_options(log.read_text()) == (devices, visible)


@pytest.mark.parametrize("runtime", ["podman", "apptainer"])
def test_the_index_spills_into_the_hosts_tmpdir_inside_the_container(tmp_path, runtime):
    """Not into the container's own /tmp (Podman's layer may sit in a home folder's quota)."""
    fake_bin, log = fakes(tmp_path / "bin", **{runtime: 'echo "$*" >>"$FAKE_LOG"\n'})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE_LOG": str(log), "BATCH_RUNTIME": runtime,
           "BATCH_SIF": "classify.sif", "BATCH_STEP": "index", "TMPDIR": str(scratch)}  # fmt: skip
    subprocess.run(["bash", CLASSIFY, str(tmp_path), str(tmp_path / "m.parquet")], env=env, check=True, capture_output=True)
    bind = "--volume" if runtime == "podman" else "--bind"
    assert f"{bind} {scratch}:{scratch} " in log.read_text() and f"--env TMPDIR={scratch} " in log.read_text()
    env["BATCH_STEP"] = "classify"  # a task does not spill: its container is as before
    log.unlink()
    subprocess.run(["bash", CLASSIFY, str(tmp_path), str(tmp_path / "out")], env=env, check=True, capture_output=True)
    assert "TMPDIR" not in log.read_text() and str(scratch) not in log.read_text()


# A stand-in for batch, for the signal tests: it logs its start and each signal, and exits 75 on one,
# as batch does (FAKE_CATCH=no: the signal kills it, as before batch installs its handlers); else
# FAKE_STATUS after FAKE_SECONDS. Its exit ignores signals, so its status is known, and can send the
# script FAKE_PARTING FAKE_DELAY seconds later: a signal as the child ends.
FAKE_BATCH = """echo "started ${SLURM_PROCID:-0}" >>"$FAKE_LOG"
got=""
if [[ ${FAKE_CATCH:-yes} == yes ]]; then
    # Once each: a task's signal comes twice (srun signals the task's process group, and the script
    # passes it on too), apart or as one, as it happens.
    trap '[[ -n $got ]] || echo "got USR1" >>"$FAKE_LOG"; got=USR1' USR1
    trap '[[ -n $got ]] || echo "got TERM" >>"$FAKE_LOG"; got=TERM' TERM
fi
end=$((SECONDS + ${FAKE_SECONDS:-0}))
while [[ -z $got ]] && ((SECONDS < end)); do sleep 0.05; done
[[ -z $got ]] || exit 75
trap '' USR1 TERM
[[ -z ${FAKE_PARTING:-} ]] || (sleep "$FAKE_DELAY"; kill -s "$FAKE_PARTING" "$PPID" 2>/dev/null) &
exit "${FAKE_STATUS:-0}"
"""
FAKE_SCONTROL = 'echo "scontrol $*" >>"$FAKE_LOG"\n'
FAKE_HOSTNAME = 'kill -s USR1 "$PPID"; echo node\n'  # the script asks for it just before starting batch


def fakes(folder: Path, **scripts: str) -> tuple[Path, Path]:
    """Executables named by the keywords, in a folder to put first on PATH; and the log they write."""
    folder.mkdir()
    for name, text in scripts.items():
        (folder / name).write_text(f"#!/usr/bin/env bash\n{text}")
        (folder / name).chmod(0o755)
    return folder, folder / "log"


def wait_for_line(log: Path, line: str, count: int = 1, limit: float = 120) -> None:
    """Until the fakes have logged `line` `count` times."""
    deadline = time.monotonic() + limit
    while (log.read_text() if log.exists() else "").splitlines().count(line) < count:
        assert time.monotonic() < deadline, f"no {line!r} in {log.read_text() if log.exists() else 'no log'}"
        time.sleep(0.02)


class Direct:
    """classify.sh run with bash as Slurm would run a batch step (SLURM_* set), over fakes on PATH."""

    def __init__(self, tmp_path: Path, **scripts: str) -> None:
        folder, self.log = fakes(tmp_path / "bin", batch=FAKE_BATCH, scontrol=FAKE_SCONTROL, **scripts)
        self.log.touch()
        self.arguments = ["bash", CLASSIFY, str(tmp_path), str(tmp_path / "out")]
        self.env = {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "BATCH_RUNTIME": "none",
                    "FAKE_LOG": str(self.log), "SLURM_JOB_ID": "4242"}  # fmt: skip

    def start(self, **variables: str) -> subprocess.Popen:
        return subprocess.Popen(self.arguments, env={**self.env, **variables}, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


@pytest.mark.parametrize("name, requeued", [("USR1", True), ("TERM", False)])
def test_a_signal_while_batch_runs_reaches_it_and_only_usr1_requeues(tmp_path, name, requeued):
    direct = Direct(tmp_path)
    script = direct.start(FAKE_SECONDS="60")
    wait_for_line(direct.log, "started 0")
    script.send_signal(getattr(signal, f"SIG{name}"))
    status, said = finish(script)
    assert status == 75 and f"got {name}" in direct.log.read_text().splitlines()
    assert ("scontrol requeue 4242" in direct.log.read_text()) == requeued, said
    assert ("requeueing 4242 to resume" in said) == requeued and ("not requeueing" in said) != requeued


def test_a_signal_before_batch_starts_stops_without_starting_it(tmp_path):
    direct = Direct(tmp_path, hostname=FAKE_HOSTNAME)
    status, said = finish(direct.start(FAKE_SECONDS="60"))
    assert status == 75 and "stopped by SIGUSR1 before batch started" in said
    assert direct.log.read_text() == "scontrol requeue 4242\n"


def test_batch_killed_by_the_signal_before_it_catches_it_stopped_before_the_end(tmp_path):
    direct = Direct(tmp_path)
    script = direct.start(FAKE_SECONDS="60", FAKE_CATCH="no")
    wait_for_line(direct.log, "started 0")
    script.send_signal(signal.SIGUSR1)
    status, said = finish(script)
    assert status == 75 and "scontrol requeue 4242" in direct.log.read_text(), said


@pytest.mark.parametrize("name", ["USR1", "TERM"])
@pytest.mark.parametrize("exit_status", [0, 3])
def test_a_signal_as_batch_ends_never_changes_its_status(tmp_path, name, exit_status):
    """From just before its exit to after the script reaped it; bash ends a `wait` early on a trapped signal."""
    direct = Direct(tmp_path)
    delays = [0, 0.001, 0.003, 0.01, 0.1, 0.5, 0.95, 1.0, 1.05, 1.2] * 3  # the script polls each second
    scripts = [direct.start(FAKE_STATUS=str(exit_status), FAKE_PARTING=name, FAKE_DELAY=str(delay)) for delay in delays]
    statuses = [finish(script)[0] for script in scripts]
    assert statuses == [exit_status] * len(delays)
    assert "scontrol" not in direct.log.read_text()


@pytest.mark.parametrize("restarts, limit, requeued", [("10", None, False), ("2", "3", True), ("3", "3", False)])
def test_a_task_requeues_itself_at_most_batch_max_requeues_times(tmp_path, restarts, limit, requeued):
    direct = Direct(tmp_path)
    script = direct.start(FAKE_SECONDS="60", SLURM_RESTART_COUNT=restarts, **({"BATCH_MAX_REQUEUES": limit} if limit else {}))
    wait_for_line(direct.log, "started 0")
    script.send_signal(signal.SIGUSR1)
    status, said = finish(script)
    assert status == 75 and ("scontrol requeue 4242" in direct.log.read_text()) == requeued, said
    refusal = f"requeued {restarts} times already (BATCH_MAX_REQUEUES={limit or 10}): not requeueing; resubmit to go on"
    assert (refusal in said) != requeued


def test_a_bad_requeue_limit_is_named(tmp_path):
    env = {**os.environ, "BATCH_RUNTIME": "none", "BATCH_MAX_REQUEUES": "many"}
    result = subprocess.run(["bash", CLASSIFY, str(tmp_path), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "BATCH_MAX_REQUEUES must be a whole number, not 'many'" in result.stderr


def test_two_tasks_of_one_job_cover_every_input_once(cluster, tmp_path):
    inputs = small_images(tmp_path / "in", 20)
    output = tmp_path / "out"
    job = sbatch(cluster, "--ntasks=2", "--output=log.out", *SMALL_TASKS, CLASSIFY, str(tmp_path / "in"), str(output), *ON_THE_CPU,
                 cwd=tmp_path, env=job_env(cluster))  # fmt: skip
    assert cluster.wait_until_done([job]) == {job: "COMPLETED"}, (tmp_path / "log.out").read_text()
    assert_every_input_once(output, inputs)
    log = (tmp_path / "log.out").read_text()
    assert "2 tasks: each runs this script through srun" in log and "shard 0 of 2" in log and "shard 1 of 2" in log


def test_two_tasks_of_a_job_with_two_gpus_get_one_each(cluster, tmp_path):
    """srun --gpus-per-task=1 where the node has a GPU for each task; with fewer, they share (test above)."""
    fake_bin, log = fakes(tmp_path / "bin", batch='echo "task $SLURM_PROCID: $SLURM_STEP_GPUS $CUDA_VISIBLE_DEVICES" >>"$FAKE_LOG"\n')
    env = job_env(cluster, PATH=f"{fake_bin}:{os.environ['PATH']}", FAKE_LOG=str(log))
    job = sbatch(cluster, "--ntasks=2", "--gres=gpu:2", "--output=log.out", *SMALL_TASKS, CLASSIFY, str(tmp_path),
                 str(tmp_path / "out"), cwd=tmp_path, env=env)  # fmt: skip
    assert cluster.wait_until_done([job]) == {job: "COMPLETED"}, (tmp_path / "log.out").read_text()
    assert sorted(log.read_text().splitlines()) == ["task 0: 0 0", "task 1: 1 1"]
    assert "2 tasks: each runs this script through srun with a GPU of its own" in (tmp_path / "log.out").read_text()


def test_two_tasks_get_usr1_through_srun_and_requeue_up_to_the_limit(cluster, tmp_path):
    """The second warning finds the task requeued once already (SLURM_RESTART_COUNT=1): it fails instead."""
    fake_bin, log = fakes(tmp_path / "bin", batch=FAKE_BATCH)
    env = job_env(cluster, PATH=f"{fake_bin}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_SECONDS="300", BATCH_MAX_REQUEUES="1")
    job = sbatch(cluster, "--ntasks=2", "--output=log.out", *SMALL_TASKS, CLASSIFY, str(tmp_path), str(tmp_path / "out"),
                 cwd=tmp_path, env=env)  # fmt: skip
    for run in (1, 2):
        for task in (0, 1):
            wait_for_line(log, f"started {task}", count=run)
        cluster("scancel", "--signal=USR1", "--batch", job)
        if run == 1:
            cluster.start_when_requeued(job)
    assert cluster.wait_until_done([job]) == {job: "FAILED"}
    said = (tmp_path / "log.out").read_text()
    assert log.read_text().splitlines().count("got USR1") == 4, log.read_text() + said
    assert said.count(f"requeueing {job} to resume") == 1, said
    assert "requeued 1 times already (BATCH_MAX_REQUEUES=1): not requeueing" in said


def test_scancel_stops_the_task_through_batch_and_does_not_requeue_it(cluster, tmp_path):
    fake_bin, log = fakes(tmp_path / "bin", batch=FAKE_BATCH)
    env = job_env(cluster, PATH=f"{fake_bin}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_SECONDS="300")
    job = sbatch(cluster, "--output=log.out", *SMALL_TASKS, CLASSIFY, str(tmp_path), str(tmp_path / "out"), cwd=tmp_path, env=env)
    wait_for_line(log, "started 0")
    cluster("scancel", job)
    assert cluster.wait_until_done([job]) == {job: "CANCELLED"}
    said = (tmp_path / "log.out").read_text()
    assert "got TERM" in log.read_text() and "not requeueing" in said and "to resume" not in said
