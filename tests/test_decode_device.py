"""--decode gpu without a GPU: torchvision's batched `decode_jpeg` takes the same call on the CPU, so the
whole path runs here (bytes in the workers' shared slots, a batch refused whole, the file-by-file retry,
the CPU decoder for a file refused alone, orientation, crop, the order of rows); only nvJPEG waits for a
GPU (benchmarks/gpu-check.sh)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms.v2 import functional

from batch.decode import Decoded, Preprocess, decode
from batch.decode_device import DecodeError, DeviceDecoder, choose, in_parts
from batch.pool import DecodePool
from benchmarks.reference import open_rgb, reference_crop
from tests import images
from tests.conftest import FAST, assert_same_rows, read_rows, run_batch
from tests.test_decode import save_oriented

PREPROCESS = Preprocess(resize=256, crop=224)
CPU = torch.device("cpu")


def bogus_huffman_table(path: Path) -> None:
    """A JPEG whose header Pillow reads and which ends as a JPEG ends, but whose Huffman table no decoder
    accepts: the workers hand it over, the device's decoder refuses it, and so does the CPU's."""
    encoded = io.BytesIO()
    images.photo().save(encoded, "JPEG")
    data = bytearray(encoded.getvalue())
    table = data.find(b"\xff\xc4")
    data[table + 5 : table + 21] = b"\xff" * 16  # more codes of each length than there can be
    path.write_bytes(bytes(data))


def batches(paths: list[Path], jpeg_bytes: int = 1 << 24, workers: int = 2, batch_size: int = 4):
    """What the pipeline does with each batch: the pool's items, and the crops the decoder makes of them."""
    decoder = DeviceDecoder(PREPROCESS, CPU)
    pool = DecodePool([str(path) for path in paths], PREPROCESS, batch_size, workers, pin=False, jpeg_bytes=jpeg_bytes)
    try:
        for batch in pool:
            left = {item.index for item in batch.items if item.jpeg is not None}
            yield batch.items, decoder.crops(batch), left, decoder
    finally:
        pool.close()


def difference(crop: torch.Tensor, path: Path) -> float:
    expected = np.asarray(reference_crop(PREPROCESS)(open_rgb(str(path))), np.float32)
    return float(np.abs(crop.numpy().astype(np.float32) - expected).mean())


@pytest.mark.parametrize("workers", [0, 2])
def test_jpegs_are_decoded_by_the_device_upright_and_cropped_as_the_reference_does(tmp_path, workers):
    paths = []
    for orientation in range(1, 9):
        paths.append(tmp_path / f"oriented-{orientation}.jpg")
        save_oriented(images.photo().resize((300, 200)), paths[-1], orientation)
    for name in ("grey.jpg", "progressive.jpg", "camera.jpg", "cmyk.jpg", "scan.tiff"):
        paths += images.write_all(tmp_path, {name: images.GOOD[name]})
    seen, left = [], set()
    for items, crops, on_device, _decoder in batches(paths, workers=workers):
        assert len(crops) == len(items) and all(item.error is None for item in items)
        left |= on_device
        for item, crop in zip(items, crops):
            path = paths[item.index]
            assert (item.width, item.height) == open_rgb(str(path)).size, path.name
            # The device decodes whole pictures and resizes as the reference does: all but exact.
            assert difference(crop, path) < (0.5 if item.index in on_device else 2), path.name
            seen.append(item.index)
    assert seen == list(range(len(paths)))
    assert left == set(range(len(paths) - 2)), "every JPEG but CMYK went to the device, and no TIFF"


def test_a_batch_the_decoder_refuses_is_redone_file_by_file_and_its_bad_file_gets_the_cpu_row(tmp_path):
    paths = images.write_all(tmp_path, {name: images.GOOD[name] for name in ("grey.jpg", "progressive.jpg", "scan.tiff")})
    bogus_huffman_table(tmp_path / "bogus.jpg")
    paths.insert(1, tmp_path / "bogus.jpg")
    [(items, crops, left, decoder)] = list(batches(paths))
    assert left == {0, 1, 2} and decoder.refused_batches == 1 and decoder.on_cpu == 1
    assert [item.index for item in items] == [0, 1, 2, 3]
    cpu_row = decode(1, str(paths[1]), PREPROCESS)
    assert items[1].error == cpu_row.error and cpu_row.error.startswith("truncated")
    assert len(crops) == 3
    for crop, index in zip(crops, (0, 2, 3)):
        assert difference(crop, paths[index]) < 0.5


def test_a_jpeg_that_does_not_fit_the_slot_is_decoded_by_its_worker(tmp_path):
    paths = images.write_all(tmp_path, {name: images.GOOD[name] for name in ("grey.jpg", "camera.jpg")})
    small = paths[0].stat().st_size
    [(items, crops, left, _decoder)] = list(batches(paths, jpeg_bytes=small + 10))
    assert left == {0} and len(crops) == 2
    assert difference(crops[1], paths[1]) < 2  # the worker's crop, decoded at reduced scale


def test_classify_on_the_device_gives_every_row_that_cpu_decoding_gives(tmp_path, awkward_folder, photos):
    bogus_huffman_table(tmp_path / "bogus.jpg")
    sources = [awkward_folder, photos, tmp_path / "bogus.jpg"]
    for where in ("cpu", "gpu"):
        result = run_batch("classify", *sources, "-o", tmp_path / where, "--decode", where, "--batch-size", "4",
                           "--workers", "2")  # fmt: skip
    assert "JPEGs are decoded by torchvision in the main process" in result.stderr
    assert "refused 1 batches whole and 1 files alone" in result.stderr
    assert_same_rows(tmp_path / "cpu", tmp_path / "gpu")
    assert sum(row["error"] is None for row in read_rows(tmp_path / "cpu")) >= 18


def test_decoding_on_the_device_is_part_of_an_outputs_identity(tmp_path, photos):
    run_batch("classify", photos, "-o", tmp_path / "out", *FAST, "--decode", "gpu")
    refused = run_batch("classify", photos, "-o", tmp_path / "out", *FAST, "--decode", "cpu", check=False)
    assert refused.returncode != 0 and "decode" in refused.stderr
    again = run_batch("classify", photos, "-o", tmp_path / "out", *FAST, "--decode", "gpu")
    assert "nothing to classify" in again.stderr
    auto = run_batch("classify", photos, "-o", tmp_path / "auto", *FAST, "--decode", "auto")
    assert "--decode auto: the workers decode on the CPU (no GPU)" in auto.stderr


# batch in a torchvision that has dropped its image decoders, as it says it will (deprecated since 0.29);
# its transforms, which import them today, loaded first.
WITHOUT_DECODE_JPEG = ("import torchvision.transforms.v2, torchvision.io as io; del io.decode_jpeg, io.ImageReadMode; "
                       "from batch.cli import main; main()")  # fmt: skip


def test_a_torchvision_without_decode_jpeg_costs_decode_gpu_alone(tmp_path, photos):
    def batch(*args: object) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", WITHOUT_DECODE_JPEG, *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    done = batch("classify", photos, "-o", tmp_path / "out", *FAST)
    assert done.returncode == 0 and len(read_rows(tmp_path / "out")) == 3, done.stderr
    missing = f"torchvision {torchvision.__version__} has no decode_jpeg (deprecated since 0.29), which --decode gpu uses"
    refused = batch("classify", photos, "-o", tmp_path / "gpu", *FAST, "--decode", "gpu")
    assert refused.returncode == 2 and f"--decode gpu: {missing}; --decode cpu classifies without it" in refused.stderr
    bench = batch("bench", photos, *FAST, "--workers", "1")
    assert bench.returncode == 0 and f"left to the device\n  decode+preprocess on device    not measured: {missing}\n" in bench.stdout, bench.stderr
    assert "end to end, --decode gpu" not in bench.stdout


def test_a_batch_of_camera_pictures_is_decoded_in_parts_that_fit_the_device():
    camera = [Decoded(index, width=4000, height=3000, jpeg=np.zeros(1, np.uint8)) for index in range(50)]
    parts = in_parts([Decoded(50, width=30_000, height=10_000), *camera])
    assert [len(part) for part in parts] == [1, 22, 22, 6]  # 300 Mpx alone, then 22 x 12 Mpx to a call
    assert [item.index for part in parts for item in part] == [50, *range(50)]


@pytest.mark.parametrize("layout", ["channels last, as libjpeg-turbo decodes", "planar, as nvJPEG decodes"])
def test_pictures_of_one_size_are_cropped_together_to_the_bit_of_one_at_a_time(layout):
    """Same-sized pictures share one resize call; each crop is exactly what resizing it alone gives."""
    generator = torch.Generator().manual_seed(0)
    sizes = [(300, 200), (200, 300), (300, 200), (257, 256), (300, 200), (200, 300)]
    pictures = [torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator).permute(2, 0, 1)
                for width, height in sizes]  # fmt: skip
    if layout.startswith("planar"):
        pictures = [picture.contiguous() for picture in pictures]
    decoder = DeviceDecoder(PREPROCESS, CPU)
    crops = decoder._crops_by_size(dict(enumerate(pictures)))
    assert sorted(crops) == list(range(len(sizes)))
    for index, picture in enumerate(pictures):
        alone = functional.resize(picture, [PREPROCESS.resize], decoder.interpolation, antialias=True)
        assert torch.equal(crops[index], functional.center_crop(alone, [PREPROCESS.crop]).permute(1, 2, 0)), index


class OwnCut(Preprocess):
    """As model_hf.ProcessorPreprocess: a library's own preprocessing, run by the workers."""

    def cut(self, image, full_size, reduction):
        return super().cut(image, full_size, reduction)


def test_a_model_that_preprocesses_itself_keeps_decoding_on_the_cpu():
    own = OwnCut(resize=256, crop=224)
    assert choose("auto", CPU, own) == "cpu" and choose("cpu", CPU, own) == "cpu"
    with pytest.raises(DecodeError, match="--decode gpu needs the resize-and-crop preprocessing"):
        choose("gpu", CPU, own)
    assert choose("gpu", CPU, PREPROCESS) == "gpu"


@pytest.mark.parametrize("where", ["cpu", "gpu"])
def test_no_workers_decode_in_the_main_process(tmp_path, photos, where):
    run_batch("classify", photos, "-o", tmp_path / "out", *FAST, "--workers", "0", "--decode", where)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 3 and all(row["error"] is None for row in rows)
