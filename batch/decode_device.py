"""Decode and preprocess on the model's device (--decode gpu): the main process's half.

On a GPU node the CPU decoders set the pace; GPUs decode JPEGs themselves (nvJPEG). The workers still
open and check every file (decode.py: format, size, mode, that it ends, its EXIF orientation) and hand
over a JPEG the device takes as its bytes; here a batch of them is decoded in one call of torchvision's
`decode_jpeg` on the device, turned upright, resized and cropped there.

The peers fail a whole batch on one bad file. Here a batch the decoder refuses is decoded again file
by file, and a file it still refuses goes to the CPU decoder (`decode.decode_bytes`, the same bytes),
so it gets exactly the row --decode cpu would give it, error included. No file fails a batch.

The price is isolation: this runs in the main process, not in a worker that may die for one file. A
decoder that crashes the process (a native fault, a CUDA error that poisons the context) ends the run
like any crash of the main process: what was committed stays, the chunk in hand is redone by the next
run, and meets the same file; `--decode cpu` classifies that shard. torchvision's `decode_jpeg` on the
CPU takes the same batched call, which is how the tests run this whole path without a GPU.

torchvision deprecates its image decoders since 0.29 (TorchCodec's succeed them) and will drop them:
a torchvision without `decode_jpeg` costs --decode gpu alone, which then says so, not the whole program.
"""

from __future__ import annotations

import io
import logging
from typing import Callable

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional

from batch.decode import Decoded, Preprocess, decode_bytes
from batch.pool import Batch

log = logging.getLogger(__name__)

try:
    from torchvision.io import ImageReadMode, decode_jpeg

    MISSING = ""
except ImportError:
    MISSING = f"torchvision {torchvision.__version__} has no decode_jpeg (deprecated since 0.29), which --decode gpu uses"

CHOICES = ("cpu", "gpu", "auto")
JPEG_BYTES_PER_FILE = 1 << 20  # room per picture of a batch for its JPEG; ImageNet's average 110 kB
PIXELS_PER_CALL = 1 << 28  # decoded at once: 805 MB of RGB, 22 camera pictures of 12 Mpx (256 would be 9 GB)

# EXIF orientation -> what turns a (C, H, W) picture upright, as PIL.ImageOps.exif_transpose does.
UPRIGHT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda image: image,
    2: lambda image: image.flip(-1),  # mirrored left to right
    3: lambda image: image.flip(-1, -2),  # upside down
    4: lambda image: image.flip(-2),  # mirrored top to bottom
    5: lambda image: image.transpose(-1, -2),  # mirrored along the main diagonal
    6: lambda image: image.transpose(-1, -2).flip(-1),  # lying on its left side: a quarter turn clockwise
    7: lambda image: image.transpose(-1, -2).flip(-1, -2),  # mirrored along the other diagonal
    8: lambda image: image.transpose(-1, -2).flip(-2),  # a quarter turn counter-clockwise
}


class DecodeError(ValueError):
    """--decode cannot be what was asked for."""


def choose(asked: str, device: torch.device, preprocess: Preprocess) -> str:
    """'cpu' or 'gpu' for --decode `asked`. The device path needs the plain resize-and-crop: a model
    family whose library preprocesses (model_hf.py) runs its processor in the workers."""
    if asked not in CHOICES:
        raise DecodeError(f"--decode is one of {', '.join(CHOICES)}, not {asked!r}")
    plain = type(preprocess).cut is Preprocess.cut
    if asked == "cpu" or (asked == "auto" and not (plain and device.type == "cuda")):
        if asked == "auto":
            log.info("--decode auto: the workers decode on the CPU (%s)",
                     "no GPU" if plain else "the model's image processor runs there")  # fmt: skip
        return "cpu"
    if not plain:
        raise DecodeError("--decode gpu needs the resize-and-crop preprocessing, and this model's image processor "
                          "runs on the CPU: use --decode cpu, or name --resize, --crop, --mean and --std")  # fmt: skip
    try:
        probe(device)
    except Exception as error:  # noqa: BLE001 - whatever the device's decoder raises, said once
        why = MISSING or f"{device} cannot decode a JPEG ({type(error).__name__}: {error})"
        if asked == "gpu":
            raise DecodeError(f"--decode gpu: {why}; --decode cpu classifies without it") from None
        log.warning("--decode auto: the workers decode on the CPU, since %s", why)
        return "cpu"
    if device.type != "cuda":
        log.warning("--decode gpu on %s: JPEGs are decoded by torchvision in the main process, one core", device)
    else:
        log.info("--decode %s: JPEGs are decoded on %s, the workers check them", asked, device)
    return "gpu"


def probe(device: torch.device) -> None:
    """Decode a small JPEG on `device`, so a missing nvJPEG (or decode_jpeg) is found before any work."""
    if MISSING:
        raise ImportError(MISSING)
    encoded = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(encoded, "JPEG")
    decode_jpeg(torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8), device=device)


class DeviceDecoder:
    """Turns a batch from the pool into the model's uint8 (n, crop, crop, 3) on the device: the workers'
    crops, and the JPEGs they left, decoded here; a file refused here gets its row from the CPU decoder."""

    def __init__(self, preprocess: Preprocess, device: torch.device):
        self.preprocess, self.device = preprocess, device
        self.interpolation = InterpolationMode(preprocess.interpolation)
        self.refused_batches = 0  # calls the device's decoder refused whole, decoded again file by file
        self.on_cpu = 0  # files it refused alone, decoded by the CPU decoder instead

    def crops(self, batch: Batch) -> torch.Tensor | None:
        """The crops of the batch's good items in order; an item the CPU decoder refuses too gets its error."""
        left = [item for item in batch.items if item.jpeg is not None]
        if not left:
            return batch.pixels
        ours: dict[int, torch.Tensor | None] = {}  # crops only: each part's whole pictures go as it is cut
        for part in in_parts(left):
            upright: dict[int, torch.Tensor] = {}
            for item, image in zip(part, self._decode([item.jpeg for item in part])):
                if image is not None:
                    upright[item.index] = UPRIGHT[item.orientation](image)
                else:
                    ours[item.index] = self._on_cpu(item)
                item.jpeg = None  # its bytes lie in a slot the next batch reuses
            ours.update(self._crops_by_size(upright))
        from_workers = iter(batch.pixels.to(self.device, non_blocking=True) if batch.pixels is not None else ())
        crops = [ours[item.index] if item.index in ours else next(from_workers) for item in batch.items
                 if item.error is None]  # fmt: skip
        return torch.stack(crops) if crops else None

    def _decode(self, jpegs: list[np.ndarray]) -> list[torch.Tensor | None]:
        """One call for them all; where it refuses, one call per file, and None for a file refused alone."""
        tensors = [torch.from_numpy(jpeg) for jpeg in jpegs]
        try:
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as error:
            self.refused_batches += 1
            log.debug("the JPEG decoder on %s refused a batch (%s); decoding it file by file", self.device, error)
        images: list[torch.Tensor | None] = []
        for tensor in tensors:
            try:
                images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                images.append(None)
        return images

    def _crops_by_size(self, pictures: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """torchvision's Resize(shorter side, antialiased) and CenterCrop of each upright picture, HWC.
        Pictures of one size are resized in one call, the same arithmetic for each: a camera's or a
        dataset's usual sizes then cost a few kernel launches a batch, not a few for every picture. It
        takes each group out of `pictures` as it stacks it, so that the group's originals can go."""
        by_size: dict[torch.Size, list[int]] = {}
        for index, picture in pictures.items():
            by_size.setdefault(picture.shape, []).append(index)
        crops: dict[int, torch.Tensor] = {}
        for indices in by_size.values():
            alike = stack_as_laid_out([pictures.pop(index) for index in indices])
            resized = functional.resize(alike, [self.preprocess.resize], self.interpolation, antialias=True)
            crops.update(zip(indices, functional.center_crop(resized, [self.preprocess.crop]).permute(0, 2, 3, 1)))
        return crops

    def _on_cpu(self, item: Decoded) -> torch.Tensor | None:
        self.on_cpu += 1
        again = decode_bytes(item.index, item.jpeg.tobytes(), self.preprocess)
        item.error, item.width, item.height = again.error, again.width, again.height
        return torch.from_numpy(again.pixels).to(self.device) if again.pixels is not None else None


def stack_as_laid_out(pictures: list[torch.Tensor]) -> torch.Tensor:
    """(n, 3, H, W) of pictures of one size, copied as they lie in memory: libjpeg-turbo's come
    channels last (a plain stack would transpose every byte, and cost more than the resize), nvJPEG's
    planar."""
    if pictures[0].stride(0) == 1:
        return torch.stack([picture.permute(1, 2, 0) for picture in pictures]).permute(0, 3, 1, 2)
    return torch.stack(pictures)


def in_parts(items: list[Decoded]) -> list[list[Decoded]]:
    """The batch's JPEGs in runs of at most PIXELS_PER_CALL decoded pixels (a picture over it alone)."""
    parts: list[list[Decoded]] = [[]]
    pixels = 0
    for item in items:
        size = (item.width or 0) * (item.height or 0)
        if parts[-1] and pixels + size > PIXELS_PER_CALL:
            parts.append([])
            pixels = 0
        parts[-1].append(item)
        pixels += size
    return parts
