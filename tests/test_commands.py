"""The commands around classify: index, summary, weights, doctor, --help and --version."""

from __future__ import annotations

import os
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import batch
from batch.paths import bucket_of
from tests import images
from tests.conftest import FAST, auto_device_name, read_rows, run_batch

def test_index_writes_a_manifest_sorted_by_bucket_that_classify_reads(awkward_folder, photos, tmp_path):
    manifest = tmp_path / "inputs.parquet"
    result = run_batch("index", awkward_folder / "good", photos, photos / "coffee.jpg", "-o", manifest)
    table = pq.read_table(manifest)
    assert f"indexed {table.num_rows} images" in result.stdout
    assert table.schema.names == ["path", "path_bytes", "bucket", "size", "mtime", "member", "offset", "key", "url", "error"]
    assert table.column("member").null_count == table.num_rows, "files are not inside a container"
    assert table.schema.field("mtime").type == pa.timestamp("ns", "UTC")
    paths = table.column("path").to_pylist()
    assert len(paths) == len(images.GOOD) + 3, "a file named twice is one input"
    assert table.column("bucket").to_pylist() == [bucket_of(path) for path in paths]
    assert list(zip(table.column("bucket").to_pylist(), paths)) == sorted(zip(table.column("bucket").to_pylist(), paths))
    assert table.column("size").to_pylist()[paths.index(str(photos / "rocket.jpg"))] == os.path.getsize(photos / "rocket.jpg")
    run_batch("classify", manifest, "-o", tmp_path / "out", *FAST)
    assert sorted(row["path"] for row in read_rows(tmp_path / "out")) == sorted(paths)


def test_summary_reports_and_checks_against_the_manifest(awkward_folder, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(awkward_folder / "good", folder)
    (folder / "broken.jpg").write_bytes(b"")
    manifest = tmp_path / "inputs.parquet"
    run_batch("index", folder, "-o", manifest)
    output = tmp_path / "out"
    run_batch("classify", folder, "-o", output, *FAST, "--num-shards", "2", "--shard-index", "0")
    incomplete = run_batch("summary", output, "--manifest", manifest, check=False)
    assert incomplete.returncode == 1 and "MISSING:" in incomplete.stdout
    run_batch("classify", folder, "-o", output, *FAST, "--num-shards", "2", "--shard-index", "1")
    report = run_batch("summary", output, "--manifest", manifest).stdout
    assert f"{len(images.GOOD) + 1} rows in 2 parts from 2 shards" in report
    assert "errors: 1 (" in report and "empty file" in report
    assert "top labels:" in report and "images/s per task" in report and f"devices: {auto_device_name()} (2 parts)" in report
    assert "every input is present" in report

    part = sorted(output.glob("part-32768-65536-*.parquet"))[0]
    shutil.copy(part, output / "part-32768-65536-c000001.parquet")  # the same rows twice
    doubled = run_batch("summary", output, check=False)
    assert doubled.returncode == 1 and "DOUBLED:" in doubled.stdout


def test_summary_of_an_empty_directory_fails(tmp_path):
    result = run_batch("summary", tmp_path, check=False)
    assert result.returncode == 1 and "no committed results" in result.stdout


def test_weights_list_shows_the_bundled_default_and_the_cache():
    listing = run_batch("weights", "list").stdout
    assert "efficientnet_lite0 DEFAULT: bundled" in listing and "nothing cached in" in listing
    assert "resnet50" in run_batch("weights", "list", "--all").stdout.split()


def test_weights_pull_without_network_says_how_to_stage_by_hand():
    closed_port = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}  # offline everywhere
    result = run_batch("weights", "pull", "resnet18", env=closed_port, check=False, timeout=120)
    assert result.returncode == 1
    assert "cannot download https://download.pytorch.org/models/resnet18-f37072fd.pth" in result.stderr
    assert "copy resnet18-f37072fd.pth from elsewhere into" in result.stderr
    unknown = run_batch("weights", "pull", "resnet5O", check=False)
    assert unknown.returncode == 1 and "not a torchvision model" in unknown.stderr


def test_doctor_is_healthy_here_and_fails_when_slurm_promised_a_gpu_it_cannot_use():
    report = run_batch("doctor").stdout
    assert f"batch {batch.__version__}" in report and "CPUs usable:" in report and report.rstrip().endswith("ok")
    in_job = run_batch("doctor", env={"SLURM_JOB_ID": "12", "SLURM_JOB_GPUS": "0"}, check=False)
    assert "Slurm: job 12" in in_job.stdout
    if torch.cuda.is_available():  # every GPU runs a kernel, in bf16 where it has it in hardware
        assert in_job.returncode == 0 and "CUDA build: " in in_job.stdout and "; usable" in in_job.stdout
        assert re.search(r"^GPU 0: .* compute \d+\.\d+, bf16 (native|emulated.*); a (bf16|fp32) kernel ran$", in_job.stdout, re.M)
    else:  # torch says nothing of why; doctor asks CUDA and prints its reason
        assert in_job.returncode == 1 and "; unusable: Found no NVIDIA driver on your system" in in_job.stdout
        assert "PROBLEM: a GPU was promised (SLURM_JOB_GPUS=0) but CUDA cannot be used: Found no NVIDIA driver" in in_job.stdout


@pytest.mark.parametrize("promise, runtime, remedy", [
    ("SLURM_JOB_GPUS=1", {"APPTAINER_CONTAINER": "/scratch/classify.sif"}, "apptainer test --nv IMAGE"),
    ("SLURM_STEP_GPUS=0,1", {"SINGULARITY_CONTAINER": "/scratch/classify.sif"}, "apptainer exec --nv IMAGE"),
    ("SLURM_GPUS_ON_NODE=1", {"container": "podman"}, "podman run --device nvidia.com/gpu=N"),
    ("SLURM_JOB_GPUS=0", {}, "Check the driver (nvidia-smi;"),
])  # fmt: skip
def test_doctor_names_what_hands_the_gpus_to_the_container_it_runs_in(promise, runtime, remedy):
    """CUDA_VISIBLE_DEVICES empty hides any GPU this machine has, as a container without its GPUs would."""
    name, value = promise.split("=")
    result = run_batch("doctor", env={name: value, "CUDA_VISIBLE_DEVICES": "", **runtime}, check=False)
    assert result.returncode == 1, result.stdout
    problem = next(line for line in result.stdout.splitlines() if line.startswith("PROBLEM: "))
    assert problem.startswith(f"PROBLEM: a GPU was promised ({promise}) but CUDA cannot be used: ") and remedy in problem
    if not os.path.exists("/dev/nvidiactl"):  # no driver at all here: CUDA's own words say so
        assert "cannot be used: Found no NVIDIA driver on your system. " in problem, problem


def test_doctor_takes_a_device_in_cuda_visible_devices_as_a_promise_and_not_an_empty_one():
    named = run_batch("doctor", env={"CUDA_VISIBLE_DEVICES": "0"}, check=False)
    if torch.cuda.is_available():
        assert named.returncode == 0 and "GPU 0:" in named.stdout
    else:
        assert named.returncode == 1 and "a GPU was promised (CUDA_VISIBLE_DEVICES=0)" in named.stdout
    for hidden in ("", "-1", "NoDevFiles"):
        assert run_batch("doctor", env={"CUDA_VISIBLE_DEVICES": hidden}).stdout.rstrip().endswith("ok"), hidden


def test_doctor_names_a_cache_it_cannot_write(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_batch("doctor", env={"TORCH_HOME": str(tmp_path / "file" / "torch")}, check=False)
    assert result.returncode == 1 and "NOT WRITABLE" in result.stdout


@pytest.mark.parametrize("command", [[], ["classify"], ["index"], ["summary"], ["report"], ["weights"], ["weights", "pull"],
                                     ["weights", "list"], ["doctor"]])  # fmt: skip
def test_every_command_has_help(command):
    assert "Usage: " in run_batch(*command, "--help").stdout


def test_version():
    assert run_batch("--version").stdout.strip() == f"batch, version {batch.__version__}"
