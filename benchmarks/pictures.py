"""Pictures to benchmark on: camera-like JPEGs cut from real photos, at any size and count.

Crops of a few photos give the network real subjects to look at, so that close calls between
classes, which a preprocessing shortcut could flip, come up as they do in real data. The files are
`batch bench`'s generated JPEGs (4:3, sensor noise, quality 90) with a photo crop as the scene, the
same for the same seed on any machine.

Run as `python -m benchmarks.pictures COUNT --width W[-W2] --photos FOLDER -o FOLDER`.
"""

from __future__ import annotations

import argparse
import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from batch.bench import collect_inputs, generate_images
from benchmarks.reference import open_rgb


@dataclass(frozen=True)
class PhotoCrops:
    """A `batch.bench.Scene`: picture N is a random crop of photo N modulo their count."""

    photos: tuple[str, ...]

    def __call__(self, number: int, size: tuple[int, int], chooser: random.Random, _noise: np.random.Generator) -> Image.Image:
        return _crop(_photo(self.photos[number % len(self.photos)]), size, chooser)


@functools.cache
def _photo(path: str) -> Image.Image:
    return open_rgb(path)


def _crop(picture: Image.Image, size: tuple[int, int], chooser: random.Random) -> Image.Image:
    """A random crop of the aspect of `size`, at least half the picture's shorter side."""
    aspect = size[0] / size[1]
    most = min(picture.width, picture.height * aspect)
    width = chooser.uniform(0.5, 1.0) * most
    height = width / aspect
    left = chooser.uniform(0, picture.width - width)
    top = chooser.uniform(0, picture.height - height)
    return picture.crop((round(left), round(top), round(left + width), round(top + height)))


def generate(folder: Path, count: int, widths: tuple[int, int], photos: Sequence[str]) -> list[str]:
    return generate_images(folder, count, widths, PhotoCrops(tuple(photos)))


def _widths(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pictures", description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int, help="how many JPEGs to write")
    parser.add_argument("--width", type=_widths, default=(500, 500), help="width, or a range like 2000-4000 (default 500)")
    parser.add_argument("--photos", required=True, help="a folder of photos to crop")
    parser.add_argument("-o", "--output", required=True, type=Path, help="the folder to write them into")
    arguments = parser.parse_args(argv)
    try:
        photos = collect_inputs([arguments.photos])
    except ValueError as error:
        parser.error(f"--photos: {error}")
    paths = generate(arguments.output, arguments.count, arguments.width, photos)
    print(f"{len(paths)} JPEGs in {arguments.output}, crops of {len(photos)} photos")


if __name__ == "__main__":
    main()
