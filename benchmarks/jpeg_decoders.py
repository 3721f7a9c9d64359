"""JPEG decoders alone, side by side on one device: what --decode gpu's choice of decoder rests on.

torchvision's batched `decode_jpeg` (what batch/decode_device.py calls), TorchCodec's (which torchvision
0.29 names as its decoders' successor; on a GPU it sends baseline JPEGs to the hardware JPEG engines of
an A100 or H100 and the rest to nvJPEG on CUDA) and NVIDIA's nvImageCodec (`nvidia-nvimgcodec-cu13`,
over nvJPEG: with its own choice of backend, with CUDA alone, and with the H100's hardware JPEG engines
alone) decode the same files in the same batches. For each it prints the rate, how far its pixels lie
from libjpeg-turbo's (torchvision on the CPU), whether it turns a file upright by its EXIF orientation
itself (decode_device.py turns pictures after torchvision's decoder, which leaves them as stored), and
what it does with a batch that holds a cut-off file and one that is not a JPEG at all: refuse the whole
batch (what decode_device.py then redoes file by file), or answer for each file. A decoder that is not
installed or cannot use the device is reported and passed over.

Run as `python -m benchmarks.jpeg_decoders SOURCE... --device cuda [--batch-size 256] [--passes 3]`.
"""

from __future__ import annotations

import argparse
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from batch.bench import collect_inputs
from batch.decode import EXIF_ORIENTATION

Decode = Callable[[list[Any]], list[torch.Tensor | None]]  # prepared files -> (3, H, W) uint8 each, or None


@dataclass(frozen=True)
class Decoder:
    """One way to decode: `prepare` turns a file's bytes into what it takes (outside the timing),
    `decode` decodes a batch of those on the device, raising where it refuses the batch whole."""

    name: str
    prepare: Callable[[bytes], Any]
    decode: Decode

    def decode_files(self, jpegs: list[bytes]) -> list[torch.Tensor | None]:
        """Prepare and decode them, untimed: for the pixels, not the rate."""
        return self.decode([self.prepare(jpeg) for jpeg in jpegs])


def torchvision_decoder(device: torch.device) -> Decoder:
    def decode(tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)

    return Decoder("torchvision decode_jpeg", as_tensor, decode)


def as_tensor(jpeg: bytes) -> torch.Tensor:
    """A file's bytes as the 1-D uint8 tensor torchvision's and TorchCodec's decoders take."""
    return torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)


def torchcodec_decoder(device: torch.device) -> Decoder | str:
    """TorchCodec's batched `decode_jpeg`, or why there is none. It takes what torchvision's takes."""
    try:
        from torchcodec.decoders import decode_jpeg as decode_with_torchcodec
    except Exception as error:  # noqa: BLE001 - an ImportError, or its libraries refusing this torch
        return f"TorchCodec: not usable ({type(error).__name__}: {error}; pip install torchcodec)"

    def decode(tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return decode_with_torchcodec(tensors, mode="RGB", device=device)

    return Decoder("TorchCodec decode_jpeg", as_tensor, decode)


def nvimgcodec_decoders(device: torch.device) -> Iterator[Decoder | str]:
    """nvImageCodec's decoder with its own choice of backend, then CUDA alone, then the hardware engines
    alone; or why there is none."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        yield "nvImageCodec: not installed (pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg)"
        return
    if device.type != "cuda":
        yield f"nvImageCodec: decodes on a GPU, not on {device}"
        return
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                     sample_format=nvimgcodec.SampleFormat.P_RGB)  # fmt: skip
    kinds = {"its choice": None, "CUDA alone": nvimgcodec.BackendKind.GPU_ONLY,
             "hardware engines alone": nvimgcodec.BackendKind.HW_GPU_ONLY}  # fmt: skip
    for name, kind in kinds.items():
        try:
            backends = None if kind is None else [nvimgcodec.Backend(kind)]
            decoder = nvimgcodec.Decoder(device_id=device.index or 0, backends=backends)
        except Exception as error:  # noqa: BLE001 - whatever it raises, said in the report
            yield f"nvImageCodec, {name}: no decoder ({type(error).__name__}: {error})"
            continue

        def decode(streams: list[Any], decoder: Any = decoder) -> list[torch.Tensor | None]:
            stream = torch.cuda.current_stream(device).cuda_stream
            images = decoder.decode(streams, params=params, cuda_stream=stream)
            return [None if image is None else torch.from_dlpack(image) for image in images]

        yield Decoder(f"nvImageCodec, {name}", nvimgcodec.CodeStream, decode)


def rate(decoder: Decoder, jpegs: list[bytes], batch_size: int, passes: int, device: torch.device) -> str:
    """Images and megapixels a second over `passes` passes through the files, after one batch to warm up."""
    prepared = [decoder.prepare(jpeg) for jpeg in jpegs]
    batches = [prepared[start:start + batch_size] for start in range(0, len(prepared), batch_size)]
    decoder.decode(batches[0])
    synchronize(device)
    pixels, started = 0, time.perf_counter()
    for _ in range(passes):
        for batch in batches:
            pixels += sum(image.shape[1] * image.shape[2] for image in decoder.decode(batch) if image is not None)
    synchronize(device)
    seconds = time.perf_counter() - started
    return f"{passes * len(jpegs) / seconds:,.0f} images/s, {pixels / seconds / 1e6:,.0f} Mpx/s"


def distance(decoder: Decoder, jpegs: list[bytes], reference: list[torch.Tensor]) -> str:
    """How far its pixels lie from the reference's: the mean and the largest difference, in levels of 255."""
    images = decoder.decode_files(jpegs)
    if any(image is None for image in images):
        return f"refused {sum(image is None for image in images)} of {len(images)} good files"
    if any(image.shape != expected.shape for image, expected in zip(images, reference)):
        return "pictures of other sizes than libjpeg-turbo's"
    mean = sum(mean_distance(image, expected) for image, expected in zip(images, reference)) / len(images)
    largest = max(int(far(image, expected).max()) for image, expected in zip(images, reference))
    return f"{mean:.2f} levels on average from libjpeg-turbo's pixels, {largest} at most"


def orientation(decoder: Decoder, jpeg: bytes) -> str:
    """Whether it turns a file lying on its side (EXIF orientation 6) upright, or leaves it as stored."""
    image = Image.open(io.BytesIO(jpeg))
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = 6
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality="keep", exif=exif)
    data = as_tensor(encoded.getvalue())
    [decoded] = decoder.decode_files([encoded.getvalue()])
    if decoded is None:
        return "refused the file"
    stored, upright = (decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=turn) for turn in (False, True))
    if mean_distance(decoded, upright) < mean_distance(decoded, stored):
        return "turns a file with an EXIF orientation upright itself"
    return "leaves a file with an EXIF orientation as stored"


def far(image: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How far each of its pixels lies from the expected picture's, in levels of 255."""
    return (image.cpu().int() - expected.int()).abs()


def mean_distance(image: torch.Tensor, expected: torch.Tensor) -> float:
    """The mean of `far`, or infinity for a picture of another shape."""
    return float(far(image, expected).float().mean()) if image.shape == expected.shape else float("inf")


def bad_batch(decoder: Decoder, jpegs: list[bytes]) -> str:
    """What it does with two good files around a cut-off one and one that is not a JPEG."""
    files = {"good": jpegs[0], "cut off": jpegs[0][: len(jpegs[0]) // 2], "not a JPEG": b"not a JPEG" * 100,
             "good too": jpegs[-1]}  # fmt: skip
    answers: dict[str, str] = {}  # name -> what became of it
    prepared: dict[str, Any] = {}
    for name, data in files.items():
        try:
            prepared[name] = decoder.prepare(data)
        except Exception:  # noqa: BLE001 - nvImageCodec reads each file's header as it takes it
            answers[name] = "refused as taken"
    try:
        images = decoder.decode(list(prepared.values()))
    except Exception as error:  # noqa: BLE001 - a refusal is what this asks about
        said = re.sub(r"^.*\.\w+:\d+, ", "", str(error).splitlines()[0])  # less the source file and line
        return f"refuses the whole batch ({type(error).__name__}: {said[:100]})"
    answers.update((name, "decoded" if image is not None else "refused") for name, image in zip(prepared, images))
    return f"answers file by file: {', '.join(f'{name} {answers[name]}' for name in files)}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(given: Sequence[str], device: torch.device, batch_size: int, passes: int) -> Iterator[str]:
    """The report, line by line: the files, then each decoder's rate, distance and handling of a bad batch."""
    paths = collect_inputs(given)
    jpegs = [Path(path).read_bytes() for path in paths]
    yield (f"jpeg decoders: {len(jpegs)} files from {', '.join(given)} ({sum(map(len, jpegs)) / len(jpegs) / 1e3:.0f} kB "
           f"on average), batches of {batch_size}, {passes} passes, on {device}")  # fmt: skip
    sample = jpegs[:batch_size]
    reference = torchvision_decoder(torch.device("cpu")).decode_files(sample)  # libjpeg-turbo's pixels
    for decoder in (torchvision_decoder(device), torchcodec_decoder(device), *nvimgcodec_decoders(device)):
        if isinstance(decoder, str):
            yield f"  {decoder}"
            continue
        yield f"  {decoder.name}:"
        for what, measure in (("rate", lambda: rate(decoder, jpegs, batch_size, passes, device)),
                              ("pixels", lambda: distance(decoder, sample, reference)),
                              ("orientation", lambda: orientation(decoder, jpegs[0])),
                              ("bad batch", lambda: bad_batch(decoder, jpegs))):  # fmt: skip
            try:
                yield f"    {what}: {measure()}"
            except Exception as error:  # noqa: BLE001 - one decoder's failure is a finding, not the end
                yield f"    {what}: FAILED ({type(error).__name__}: {error})"


def main(argv: Sequence[str] | None = None) -> None:
    described = argparse.ArgumentParser(prog="python -m benchmarks.jpeg_decoders", description=__doc__.splitlines()[0])
    described.add_argument("sources", nargs="+", help="JPEG files, folders of them or @lists")
    described.add_argument("--device", default="cuda", type=torch.device)
    described.add_argument("--batch-size", type=int, default=256, help="files a call decodes (default 256)")
    described.add_argument("--passes", type=int, default=3, help="times through the files while timed (default 3)")
    arguments = described.parse_args(argv)
    try:
        for line in run(arguments.sources, arguments.device, arguments.batch_size, arguments.passes):
            print(line, flush=True)
    except ValueError as error:
        described.error(str(error))


if __name__ == "__main__":
    main()
