"""What only a GPU shows: run by benchmarks/gpu-check.sh on a GPU node. Without a usable CUDA device
these tests are deselected, and the run says so (conftest.py); the rest of the suite passes on a GPU
node too, and the script runs the part of it that a GPU changes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from batch import models
from batch.decode_device import DeviceDecoder
from batch.inference import Classifier
from batch.pool import DecodePool
from batch.writer import read_record
from tests import images
from tests.conftest import FAST, assert_same_rows, read_rows, run_batch
from tests.test_crash_isolation import crashing_file
from tests.test_decode import save_oriented
from tests.test_decode_device import PREPROCESS, bogus_huffman_table, difference

pytestmark = pytest.mark.gpu


def record_of(output: Path) -> dict:
    (part,) = output.glob("part-*.parquet")
    return read_record(str(part))


def test_auto_is_the_gpu_in_bf16_where_it_has_bf16_in_hardware(photos, tmp_path):
    result = run_batch("classify", photos, "-o", tmp_path / "out")
    record = record_of(tmp_path / "out")
    native = torch.cuda.get_device_capability(0) >= (8, 0)
    assert record["provenance"]["device"] == "cuda:0" and record["provenance"]["device_name"] == torch.cuda.get_device_name(0)
    assert record["identity"]["precision"] == ("bf16" if native else "fp32"), result.stderr
    assert [row["label"] for row in sorted(read_rows(tmp_path / "out"), key=lambda row: row["path"])] == [
        "Egyptian cat", "espresso", "missile"]  # fmt: skip


def test_every_input_of_the_suite_gets_the_same_row_on_the_gpu_as_on_the_cpu(awkward_folder, tmp_path):
    """fp32 on both: the same errors for every bad file, the same sizes, and (TF32 aside) the same labels."""
    for device in ("cpu", "cuda"):
        run_batch("classify", awkward_folder, "-o", tmp_path / device, "--device", device, "--precision", "fp32",
                  "--workers", "2")  # fmt: skip
    assert_same_rows(tmp_path / "cpu", tmp_path / "cuda", label_changes=1)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_each_precision_names_the_photos_as_the_cpu_does(photos, tmp_path, precision):
    run_batch("classify", photos, "-o", tmp_path / "out", "--device", "cuda", "--precision", precision)
    assert sorted((Path(row["path"]).name, row["label"]) for row in read_rows(tmp_path / "out")) == [
        ("chelsea.jpg", "Egyptian cat"), ("coffee.jpg", "espresso"), ("rocket.jpg", "missile")]  # fmt: skip
    assert record_of(tmp_path / "out")["identity"]["precision"] == precision


def test_the_head_runs_in_fp32_under_bf16_autocast_on_the_gpu():
    classifier = Classifier(models.resolve(), torch.device("cuda"), "bf16", 5, embeddings=True, batch_size=8)
    head = [module for module in classifier.network.modules() if isinstance(module, nn.Linear)][-1]
    seen = {}
    head.register_forward_hook(lambda _module, inputs, output: seen.update(inputs=inputs[0], logits=output))
    answers = classifier.submit(torch.randint(0, 256, (5, 224, 224, 3), dtype=torch.uint8)).result()
    assert seen["inputs"].dtype == seen["logits"].dtype == torch.float32
    assert seen["logits"].shape[0] == 8, "batches run padded to the batch size"
    assert answers.topk_ids.shape == (5, 5) and answers.embeddings.shape == (5, 1280)


def test_decoded_batches_reach_the_gpu_from_page_locked_slots(photos):
    paths = [str(path) for path in sorted(photos.glob("*.jpg"))] * 3
    pool = DecodePool(paths, models.resolve().preprocess, 4, 2, pin=True)
    try:
        assert pool.page_locked
        batches = list(pool)
    finally:
        pool.close()
    assert sum(len(batch.items) for batch in batches) == 9 and all(batch.pixels.is_pinned() for batch in batches)


def test_cuda_n_takes_that_gpu_and_a_missing_one_is_refused(photos, tmp_path):
    run_batch("classify", photos, "-o", tmp_path / "out", *FAST, "--device", "cuda:0")
    assert record_of(tmp_path / "out")["provenance"]["device"] == "cuda:0"
    count = torch.cuda.device_count()
    missing = run_batch("classify", photos, "-o", tmp_path / "other", *FAST, "--device", f"cuda:{count}", check=False)
    assert missing.returncode == 2 and f"only {count} GPU(s) are visible" in missing.stderr


HOG = """
import sys, torch
free, _total = torch.cuda.mem_get_info()
held = torch.empty(free - 32 * 2**20, dtype=torch.uint8, device="cuda")
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_gpu_that_fails_at_first_use_stops_the_run_before_any_work(photos, tmp_path):
    """Another process holds all but 32 MiB of the GPU's memory, as a job beside ours may."""
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "holding"
        result = run_batch("classify", photos, "-o", tmp_path / "out", *FAST, "--device", "cuda", check=False)
    finally:
        hog.communicate("")
    assert result.returncode == 2 and "failed its first use" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_crashing_decoder_costs_one_row_when_cuda_ran_before_the_fork(crashing_plugin, tmp_path):
    """The probe starts CUDA before the workers are forked, and each replacement is forked later still."""
    folder = tmp_path / "in"
    good = images.small_images(folder, 6)
    crashing_file(folder / "crash.jpg", "SIGSEGV")
    run_batch("classify", folder, "-o", tmp_path / "out", *FAST, "--device", "cuda", "--batch-size", "2", "--workers", "2",
              env=crashing_plugin)  # fmt: skip
    rows = {Path(row["path"]).name: row for row in read_rows(tmp_path / "out")}
    assert rows.pop("crash.jpg")["error"].startswith("decoder crashed: killed by SIGSEGV")
    assert sorted(rows) == sorted(path.name for path in good) and all(row["label"] for row in rows.values())


class WithConstants(nn.Module):
    """Makes tensors in its forward: an export bakes them in on the device it was traced on."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = pixels.mean(dim=(2, 3))
        return pooled @ torch.tensor([[1.0, -1.0], [0.5, 0.5], [-1.0, 1.0]]) + torch.ones(2)


@pytest.mark.parametrize("kind", ["pt2", "ts"])
def test_a_model_file_with_device_constants_runs_on_the_gpu(photos, tmp_path, kind):
    path = tmp_path / f"mine.{kind}"
    example = torch.randn(1, 3, 32, 32)
    description = '{"labels": ["left", "right"], "preprocess": {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}'
    if kind == "pt2":
        torch.export.save(torch.export.export(WithConstants(), (example,)), path, extra_files={"batch.json": description})
    else:
        torch.jit.save(torch.jit.trace(WithConstants(), example), path, _extra_files={"batch.json": description})
    result = run_batch("classify", photos, "-o", tmp_path / "out", "--model", path, "--device", "cuda", check=False)
    assert result.returncode == 0, result.stderr
    assert {row["label"] for row in read_rows(tmp_path / "out")} <= {"left", "right"}


def test_jpegs_decoded_on_the_gpu_give_the_rows_cpu_decoding_gives(awkward_folder, photos, tmp_path):
    """nvJPEG itself: every row as with --decode cpu (errors, sizes, labels), a file nvJPEG refuses
    included; the crops within a level of the reference's."""
    bogus_huffman_table(tmp_path / "bogus.jpg")
    for where in ("cpu", "gpu"):
        result = run_batch("classify", awkward_folder, photos, tmp_path / "bogus.jpg", "-o", tmp_path / where,
                           "--device", "cuda", "--precision", "fp32", "--decode", where, "--workers", "2")  # fmt: skip
    assert "JPEGs are decoded on cuda" in result.stderr and "refused" in result.stderr
    assert_same_rows(tmp_path / "cpu", tmp_path / "gpu", label_changes=1)
    assert record_of(tmp_path / "gpu")["identity"]["decode"] == "gpu"


def test_gpu_crops_are_the_reference_crops(tmp_path):
    paths = []
    for orientation in range(1, 9):
        paths.append(tmp_path / f"oriented-{orientation}.jpg")
        save_oriented(images.photo().resize((300, 200)), paths[-1], orientation)
    paths += images.write_all(tmp_path, {name: images.GOOD[name] for name in ("grey.jpg", "progressive.jpg", "camera.jpg")})
    decoder = DeviceDecoder(PREPROCESS, torch.device("cuda"))
    pool = DecodePool([str(path) for path in paths], PREPROCESS, 4, 2, pin=True, jpeg_bytes=1 << 24)
    try:
        for batch in pool:
            crops = decoder.crops(batch)
            assert crops.is_cuda and len(crops) == len(batch.items)
            for item, crop in zip(batch.items, crops.cpu()):
                assert difference(crop, paths[item.index]) < 1.5, paths[item.index].name  # nvJPEG's IDCT is not libjpeg's
    finally:
        pool.close()
    assert decoder.on_cpu == 0
