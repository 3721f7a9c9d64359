"""Writes the test images: real pictures in every awkward form that must classify, and every bad file.

Pictures are crops of the bundled CC0 photos, so a model has something real to look at.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = Path(__file__).parent / "data" / "photos"


def photo(name: str = "chelsea") -> Image.Image:
    return Image.open(PHOTOS / f"{name}.jpg").convert("RGB")


def _exif_rotated(path: Path) -> None:
    """Stored 300x200 landscape, EXIF orientation 6: upright it is 200x300."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo().resize((300, 200)).save(path, exif=exif.tobytes())


def _sixteen_bit(path: Path) -> None:
    grey = np.asarray(photo().convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(path)  # mode I;16


def _palette_with_alpha(path: Path) -> None:
    image = photo().resize((120, 90)).convert("P", palette=Image.Palette.ADAPTIVE)
    image.info["transparency"] = 0
    image.save(path, transparency=0)


def _rgba(path: Path) -> None:
    image = photo().resize((160, 120)).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    image.save(path)


def _animated_gif(path: Path) -> None:
    frames = [photo().resize((100, 80)), photo("coffee").resize((100, 80))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


GOOD = {
    # name: (writer, upright width, upright height)
    "cmyk.jpg": (lambda p: photo().convert("CMYK").save(p), 451, 300),
    "grey.jpg": (lambda p: photo().convert("L").save(p), 451, 300),
    "sixteen bit.png": (_sixteen_bit, 451, 300),
    "palette.png": (lambda p: photo().convert("P", palette=Image.Palette.ADAPTIVE).save(p), 451, 300),
    "palette_alpha.png": (_palette_with_alpha, 120, 90),
    "alpha.png": (_rgba, 160, 120),
    "animated.gif": (_animated_gif, 100, 80),
    "progressive.jpg": (lambda p: photo().save(p, progressive=True, quality=85), 451, 300),
    "rotated.jpg": (_exif_rotated, 200, 300),
    "one_pixel.png": (lambda p: Image.new("RGB", (1, 1), (200, 30, 30)).save(p), 1, 1),
    "camera.jpg": (lambda p: photo().resize((6000, 4000)).save(p, quality=90), 6000, 4000),
    "UPPER CASE.JPEG": (lambda p: photo("coffee").save(p), 600, 400),
    "ünïcödé café.webp": (lambda p: photo("coffee").save(p, quality=80), 600, 400),
    "bitmap.bmp": (lambda p: photo().save(p), 451, 300),
    "scan.tiff": (lambda p: photo().save(p), 451, 300),
}


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    photo().save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _decompression_bomb(path: Path) -> None:
    """A PNG header claiming 50000x50000 pixels, in a few hundred bytes: Pillow must never allocate it."""
    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 50_001 * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b""))


BAD = {
    # name: (writer, the start of the expected error)
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "page.jpg": (lambda p: p.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>"), "not an image: the file is HTML"),
    "notes.png": (lambda p: p.write_text("just some text\n"), "not an image: the file is text"),
    "noise.jpg": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not an image"),
    "dangling.jpg": (lambda p: os.symlink(p.parent / "nowhere.jpg", p), "not found: dangling symlink"),
    "unreadable.jpg": (lambda p: (photo().save(p), p.chmod(0)), "permission denied"),
    "bomb.png": (_decompression_bomb, "too large"),
    "fifo.jpg": (lambda p: os.mkfifo(p), "not a regular file"),
}


def write_all(folder: Path, names: dict) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (writer, *_rest) in names.items():
        writer(folder / name)
        paths.append(folder / name)
    return paths


def small_images(folder: Path, count: int) -> list[Path]:
    """Many tiny random pictures: quick to decode, so runs are long in batches, not in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(count)
    paths = []
    for number in range(count):
        path = folder / f"img-{number:04d}.png"
        Image.fromarray(generator.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
