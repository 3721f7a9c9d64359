"""The benchmark scripts in benchmarks/ on tiny inputs: the reference preprocessing is the weights' own,
the pictures are crops of the photos, the peers answer for every file, and the side-by-side runner
times each contender and checks agreement.
"""

from __future__ import annotations

import os
import re
import base64
import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.models import MobileNet_V3_Small_Weights
from torchvision.transforms import InterpolationMode

from batch import models
from benchmarks import carry_wheels, compare, jpeg_decoders, peers, pictures
from benchmarks.reference import open_rgb, reference_transform
from tests.conftest import FAST, REPOSITORY


@pytest.mark.parametrize("model", [models.DEFAULT_MODEL, "mobilenet_v3_small"])
def test_the_reference_preprocessing_is_the_transforms_torchvision_gives_the_weights(photos, model):
    """The same tensor, to the bit, as the class behind `weights.transforms()` set to the model's preprocessing."""
    preprocess = models.resolve(model, "none").preprocess
    preset = MobileNet_V3_Small_Weights.DEFAULT.transforms()
    if model != "mobilenet_v3_small":
        preset = type(preset)(
            crop_size=preprocess.crop, resize_size=preprocess.resize, mean=[value / 255 for value in preprocess.mean],
            std=[value / 255 for value in preprocess.std], interpolation=InterpolationMode(preprocess.interpolation),
        )  # fmt: skip
    ours = reference_transform(preprocess)
    for photo in sorted(photos.glob("*.jpg")):
        picture = open_rgb(str(photo))
        assert torch.equal(ours(picture), preset(picture)), photo.name


def test_pictures_are_crops_of_the_photos(tmp_path):
    Image.new("RGB", (400, 300), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (300, 400), (30, 30, 200)).save(tmp_path / "blue.png")
    paths = pictures.generate(tmp_path / "out", 4, (80, 120), [str(tmp_path / "red.png"), str(tmp_path / "blue.png")])
    for number, path in enumerate(paths):
        colour = np.asarray(Image.open(path)).reshape(-1, 3).mean(axis=0)
        expected = (200, 30, 30) if number % 2 == 0 else (30, 30, 200)  # picture N crops photo N modulo 2
        assert np.abs(colour - expected).max() < 8, (number, colour)


@pytest.mark.parametrize("peer", sorted(peers.PEERS))
def test_a_peer_writes_the_top_five_of_every_file(photos, tmp_path, peer):
    files = tmp_path / "files.txt"
    files.write_text("".join(f"{path}\n" for path in sorted(photos.glob("*.jpg"))))
    peers.main([peer, str(files), "-o", str(tmp_path / "peer.parquet"), *FAST])
    rows = pq.read_table(tmp_path / "peer.parquet").to_pylist()
    assert [row["path"] for row in rows] == sorted(str(path) for path in photos.glob("*.jpg"))
    labels = models.imagenet_categories()
    for row in rows:
        assert len(row["topk_ids"]) == 5 and [labels[i] for i in row["topk_ids"]] == row["topk_labels"]
        assert row["label"] == row["topk_labels"][0]


def test_agreement_compares_class_ids_of_the_files_batch_classified(tmp_path):
    """`crane` is two ImageNet classes, so ids are compared, not labels; error rows are not counted."""
    ours = pa.table({"path": ["a", "b", "c"], "topk_ids": [[134, 1], [517, 2], None], "error": [None, None, "truncated"]})
    reference = pa.table({"path": ["a", "b", "c"], "topk_ids": [[134, 9], [134, 2], [5, 6]]})
    pq.write_table(ours, tmp_path / "ours.parquet")
    pq.write_table(reference, tmp_path / "reference.parquet")
    assert compare.top1_agreement(tmp_path / "ours.parquet", tmp_path / "reference.parquet") == (1, 2)


def test_compare_refuses_agreement_without_trained_weights(photos, capsys):
    with pytest.raises(SystemExit) as exit_status:
        compare.main([str(photos), *FAST, "--agreement"])
    assert exit_status.value.code == 2 and "--agreement needs trained weights" in capsys.readouterr().err


def test_compare_times_the_peers_and_batch_and_checks_agreement(photos, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", str(photos), "--agreement", "--workers", "1", "--device", "cpu",
         "--decode", "cpu", "gpu"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert report.startswith(f"compare: 3 images from {photos}; efficientnet_lite0 (") and ") on cpu, fp32, " in report
    after = r"(then [0-9.]+ images/s|too few files to time the rest)"  # three files: usually too few
    for contender in ("naive (peer)", "dataloader (peer)", "batch classify", "batch classify --decode gpu"):
        line = rf"^  {re.escape(contender)} +[0-9.]+ s +[0-9.]+ images/s  start-up [0-9.]+ s, {after}$"
        assert re.search(line, report, re.MULTILINE), report
    for ours in ("batch classify", "batch classify --decode gpu"):
        assert re.search(rf"^  {ours} is [0-9.]+x the better peer \((naive|dataloader) \(peer\)\)$", report, re.MULTILINE)
    assert report.rstrip().endswith("top-1 agreement with the reference preprocessing: 3 of 3 (100.00%)\n"
                                    "top-1 agreement of --decode gpu with the reference preprocessing: 3 of 3 (100.00%)")
    assert list(tmp_path.iterdir()) == [], "the outputs must be deleted"


def test_tar_vs_files_times_the_same_pictures_as_files_tars_and_parquet(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.tar_vs_files", "5", "--width", "120", "--per-container", "2", "--repeat", "1",
         "--workers", "1"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr  # it checks that each run wrote a row for every picture
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tar_vs_files: 5 JPEGs 120 px wide")
    assert [re.match(r"^  (\w+) +[0-9.]+ s +[0-9.]+ images/s$", line)[1] for line in lines[1:]] == ["files", "tars", "parquet"]
    assert list(tmp_path.iterdir()) == [], "the pictures and outputs must be deleted"


def test_report_members_times_the_report_of_members_of_tars_and_parquet_files(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.report_members", "--containers", "3", "--members", "40"],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TMPDIR": str(tmp_path)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "120 rows, in 3 containers of 40 samples each:"
    timed = [re.match(r"^  batch report, (.+?) +[0-9.]+ s +[0-9]+ MB peak$", line)[1] for line in lines[1::2]]
    runs = dict(zip(timed, lines[2::2]))
    assert list(runs) == ["no such files", "tars", "parquets"]
    assert re.match(r"^    0 thumbnails and \d+ placeholders, from 0 containers", runs["no such files"])
    for kind in ("tars", "parquets"):
        assert re.match(r"^    \d+ thumbnails and 0 placeholders, from 3 containers", runs[kind]), runs[kind]
    assert list(tmp_path.iterdir()) == [], "the containers and outputs must be deleted"


def test_the_jpeg_decoders_are_timed_compared_with_libjpeg_turbo_and_given_a_bad_batch(tmp_path, photos):
    """On the CPU torchvision's and TorchCodec's decoders are libjpeg-turbo itself, so their pixels are the
    reference's to the level; TorchCodec turns a file upright by its EXIF orientation, which decode_device.py
    does after torchvision's; both refuse a batch holding a cut-off file whole, which decode_device.py then
    redoes file by file."""
    pictures.generate(tmp_path, 6, (300, 300), sorted(str(path) for path in photos.glob("*.jpg")))
    lines = list(jpeg_decoders.run([str(tmp_path)], torch.device("cpu"), batch_size=4, passes=1))
    assert re.match(rf"^jpeg decoders: 6 files from {tmp_path} \(\d+ kB on average\), batches of 4, 1 passes, on cpu$", lines[0])
    for first, name, upright in ((1, "torchvision", "leaves a file with an EXIF orientation as stored"),
                                 (6, "TorchCodec", "turns a file with an EXIF orientation upright itself")):  # fmt: skip
        assert lines[first] == f"  {name} decode_jpeg:"
        assert re.match(r"^    rate: [0-9,]+ images/s, [0-9,]+ Mpx/s$", lines[first + 1]), lines[first + 1]
        assert lines[first + 2] == "    pixels: 0.00 levels on average from libjpeg-turbo's pixels, 0 at most"
        assert lines[first + 3] == f"    orientation: {upright}"
        assert re.match(r"^    bad batch: refuses the whole batch \(RuntimeError: Image is incomplete or truncated\.?\)$", lines[first + 4])
    assert lines[11] in ("  nvImageCodec: not installed (pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg)",
                         "  nvImageCodec: decodes on a GPU, not on cpu")  # fmt: skip
    assert len(lines) == 12


def test_nvimagecodecs_wheel_travels_slimmed_to_python_3_12_and_jpeg_and_still_installs(tmp_path):
    """A wheel laid out as nvImageCodec's: what is left installs with pip, and its RECORD names just that."""
    package = "nvidia/nvimgcodec/"
    kept = [f"{package}__init__.py", f"{package}nvimgcodec_impl.cpython-312-x86_64-linux-gnu.so", f"{package}libnvimgcodec.so.0",
            f"{package}extensions/libnvjpeg_ext.so.0.9.0", f"{package}extensions/libjpeg_turbo_ext.so.0.9.0"]  # fmt: skip
    left = ["nvidia/__init__.py", f"{package}nvimgcodec_impl.cpython-311-x86_64-linux-gnu.so",
            f"{package}nvimgcodec_impl.cpython-313t-x86_64-linux-gnu.so", f"{package}extensions/libnvjpeg2k_ext.so.0.9.0",
            f"{package}extensions/libopencv_ext.so.0.9.0", f"{package}include/nvimgcodec.h", f"{package}tools/x"]  # fmt: skip
    info = "nvidia_nvimgcodec_cu13-0.9.0.20.dist-info/"
    files = {name: name.encode() for name in kept + left}
    files[f"{info}METADATA"] = b"Metadata-Version: 2.1\nName: nvidia-nvimgcodec-cu13\nVersion: 0.9.0.20\n"
    files[f"{info}WHEEL"] = b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    digest = {name: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode() for name, data in files.items()}
    record = [f"{name},sha256={digest[name]},{len(data)}" for name, data in files.items()] + [f"{info}RECORD,,"]
    files[f"{info}RECORD"] = "".join(f"{line}\n" for line in record).encode()
    wheel = tmp_path / "nvidia_nvimgcodec_cu13-0.9.0.20-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    carry_wheels.slim(wheel)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        recorded = [line.split(",")[0] for line in archive.read(f"{info}RECORD").decode().splitlines()]
    assert sorted(names) == sorted(recorded) == sorted(kept + [f"{info}METADATA", f"{info}WHEEL", f"{info}RECORD"])
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                   check=True)  # fmt: skip
    assert sorted(str(path.relative_to(site)) for path in (site / "nvidia").rglob("*") if path.is_file()) == sorted(kept)
    assert list(tmp_path.glob("*.slim")) == []


def test_torchcodec_decodes_jpegs_without_the_libraries_its_wheel_travels_without(tmp_path, photos):
    """The installed TorchCodec, less the files carry_wheels leaves out of its wheel, still decodes a JPEG
    to libjpeg-turbo's pixels."""
    site, left = tmp_path / "site", []
    for file in importlib.metadata.files("torchcodec"):
        if file.parts[0].startswith("torchcodec") and "__pycache__" not in file.parts:
            if carry_wheels.NOT_CARRIED.search(file.as_posix()):
                left.append(file.name)
            else:
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file.locate(), site / file)
    assert len(left) == 12 and all(re.match(r"^libtorchcodec_(core|custom_ops)\d+\.so$", name) for name in left), left
    check = ("import sys, torch, torchcodec; from torchcodec.decoders import decode_jpeg; from torchvision.io import decode_jpeg as tv; "
             "jpeg = torch.frombuffer(bytearray(open(sys.argv[1], 'rb').read()), dtype=torch.uint8); "
             "print(torchcodec.__file__, torchcodec.ffmpeg_major_version, torch.equal(decode_jpeg(jpeg), tv(jpeg)))")  # fmt: skip
    printed = subprocess.run([sys.executable, "-W", "ignore", "-c", check, str(photos / "chelsea.jpg")], check=True, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(site)}).stdout  # fmt: skip
    assert printed == f"{site / 'torchcodec' / '__init__.py'} None True\n"


def test_the_gpu_check_runs_every_step_on_the_cpu_on_a_few_files(tmp_path):
    """It runs once, on a lent GPU, in a few minutes: here it runs whole, on the CPU, so that it cannot rot."""
    script = REPOSITORY / "benchmarks" / "gpu-check.sh"
    usage = subprocess.run([str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: benchmarks/gpu-check.sh OUT")
    result = subprocess.run([str(script), str(tmp_path / "check"), "--device", "cpu", "--tiny"], capture_output=True, text=True,
                            timeout=1200, env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)})  # fmt: skip
    report = (tmp_path / "check" / "report.md").read_text()
    assert result.returncode == 0, report + result.stderr
    steps = re.findall(r"^## (.*)$", report, re.MULTILINE)
    assert steps == ["doctor", "pictures: small", "ResNet-50 stages and suggested CPUs",
                     "ResNet-50 end to end, ImageNet-sized, against the peers", "pictures: agreement",
                     "agreement with the CPU's fp32 reference", "JPEG decoders alone, ImageNet-sized", "default model stages",
                     "default model end to end, ImageNet-sized, against the peers",
                     "model families: timm, Hugging Face, OpenCLIP, end to end", "pictures: camera",
                     "ResNet-50 end to end, camera-sized, against the peers",
                     "agreement of GPU decoding, camera-sized", "JPEG decoders alone, camera-sized"]  # fmt: skip
    assert len(re.findall(r"^ok in \d+ s$", report, re.MULTILINE)) == len(steps)
    assert re.search(r"^  fp32: top-1 6 of 6 \(100.00%; goal 99%: met\)", report, re.MULTILINE)
    assert re.search(r"^  fp32, --decode gpu: top-1 6 of 6 \(100.00%; goal 99%: met\)", report, re.MULTILINE)
    assert re.search(r"^  fp32, --decode gpu: top-1 4 of 4 \(100.00%; goal 99%: met\)", report, re.MULTILINE)
    assert re.search(r"^  batch classify --decode gpu +[0-9.]+ s +[0-9.]+ images/s", report, re.MULTILINE)
    assert re.search(r"^  model +[0-9.]+ images/s  cpu, fp32, batch 8", report, re.MULTILINE)
    for family, model in (("timm", "timm:test_resnet"), ("hf", "convnext"), ("clip", "clip")):
        assert re.search(rf"^  {family} +{model} +[0-9.]+ images/s after start-up, .*  24 rows, 0 failed$", report, re.MULTILINE), report
    assert report.count("  torchvision decode_jpeg:\n") == 2 and "FAILED" not in report
    assert (tmp_path / "check" / "steps.log").stat().st_size > 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["check"], "the pictures must be deleted"
