"""The reference preprocessing: what a model's own transforms do to a fully decoded picture.

Built from torchvision's public transforms with the model's `Preprocess`, so it is the same tensor as
torchvision's `weights.transforms()` (tests/test_benchmarks.py shows it). The peers use it, and the fast
path's answers are checked against it.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from batch.decode import Preprocess

Transform = Callable[[Image.Image], torch.Tensor]


def open_rgb(path: str) -> Image.Image:
    """A full decode, upright."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def reference_crop(preprocess: Preprocess) -> Callable[[Image.Image], Image.Image]:
    """Resize the shorter side (antialiased), then centre-crop: the picture the model sees, still uint8."""
    interpolation = InterpolationMode(preprocess.interpolation)
    return transforms.Compose(
        [transforms.Resize(preprocess.resize, interpolation, antialias=True), transforms.CenterCrop(preprocess.crop)]
    )


def reference_transform(preprocess: Preprocess) -> Transform:
    """The crop as a float tensor (C, H, W), normalised."""
    return transforms.Compose([
        reference_crop(preprocess),
        transforms.PILToTensor(),
        transforms.ConvertImageDtype(torch.float32),
        transforms.Normalize([value / 255 for value in preprocess.mean], [value / 255 for value in preprocess.std]),
    ])  # fmt: skip
