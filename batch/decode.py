"""Decode and preprocess: one file (or one image packed in a tar or Parquet file) in, either a uint8 crop ready for the model or a clear error.

Runs in the loader's worker processes. It never raises for a bad file: a truncated JPEG, an HTML page
named .jpg or a decompression bomb each come back as an error message, and the run goes on.
Pixels stay uint8 (HWC, which is channels_last for the model); normalisation happens on the device.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import time
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from batch import transient
from batch.containers import MemberError, Reader
from batch.manifest import Found

EXIF_ORIENTATION = 0x0112
JPEG_END = b"\xff\xd9"
MAX_PIXELS = 2 * 89_478_485  # Pillow's own bomb limit: about 179 Mpx, a 16000x11000 picture
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half a picture
warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we reject above the limit ourselves

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, centre-crop `crop`, then (pixel - mean) / std on the 0-255 scale."""

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"the crop ({self.crop}) must be positive and no larger than the resize ({self.resize})")

    def cut(self, image: Image.Image, full_size: tuple[int, int], reduction: float) -> np.ndarray:
        """The crop of an upright RGB picture decoded at 1/`reduction` of its `full_size`. A model family
        whose own library preprocesses (model_hf.py) overrides this, and `describe`."""
        return np.asarray(_resize_and_crop(image, self, full_size, reduction))

    def describe(self) -> dict:
        return {
            "resize_shorter_side": self.resize,
            "center_crop": self.crop,
            "interpolation": self.interpolation,
            "mean_0_255": list(self.mean),
            "std_0_255": list(self.std),
        }


@dataclass
class Decoded:
    """What the worker hands back for one file: pixels, a checked JPEG's bytes to decode on the device
    (--decode gpu), or an error; never two of them. Width and height are the picture's, upright."""

    index: int
    pixels: np.ndarray | None = field(default=None, repr=False)
    width: int | None = None
    height: int | None = None
    error: str | None = None
    jpeg: np.ndarray | None = field(default=None, repr=False)  # uint8, the whole file
    orientation: int = 1  # the JPEG's EXIF orientation, 1 to 8: what turns it upright
    jpeg_span: tuple[int, int] | None = None  # where in its JPEG slot a worker left `jpeg` (pool.py)


_members = Reader()  # this process's open container, kept from one member to the next


def decode(index: int, path: str, preprocess: Preprocess, member: Found | None = None,
           retries: int = transient.DEFAULT_RETRIES, sleep: Callable[[float], None] = time.sleep,
           jpeg_room: int = 0) -> Decoded:  # fmt: skip
    """Decode the file at `path`, or the `member` of a tar or Parquet file that `path` names, from its bytes.
    A read that fails for a reason outside the file (batch.transient) is tried again, opened afresh,
    after a growing wait (through `sleep`: the pool's stops its hang clock); only when every try failed
    does the row say `io error`. A JPEG of at most `jpeg_room` bytes that the device's decoder takes
    (`_device_jpeg`) comes back undecoded, as its bytes."""
    for delay in transient.delays(retries):
        try:
            return _decode_once(index, path, preprocess, member, jpeg_room)
        except _Transient:
            _members.close()
            sleep(delay)
    try:
        return _decode_once(index, path, preprocess, member, jpeg_room)
    except _Transient as problem:
        return Decoded(index, error=transient.describe(problem.__cause__ or problem, retries + 1))


def decode_bytes(index: int, data: bytes, preprocess: Preprocess) -> Decoded:
    """A file already read, decoded here: the row the file would have had from `decode`."""
    return _decode_handle(index, io.BytesIO(data), preprocess, jpeg_room=0)


def _decode_once(index: int, path: str, preprocess: Preprocess, member: Found | None, jpeg_room: int) -> Decoded:
    try:
        handle = _open_regular_file(path) if member is None else _open_member(member)
    except _Unreadable as problem:
        return Decoded(index, error=str(problem))
    with handle:  # kept open past a failed decode, whose first bytes say what the file is instead
        return _decode_handle(index, handle, preprocess, jpeg_room)


def _decode_handle(index: int, handle: BinaryIO, preprocess: Preprocess, jpeg_room: int) -> Decoded:
    try:
        with Image.open(handle) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                return Decoded(index, error=_too_large(width, height))
            if jpeg_room and (jpeg := _device_jpeg(image, handle, jpeg_room)):
                data, orientation = jpeg
                upright = (height, width) if orientation >= 5 else (width, height)  # 5 to 8 swap the sides
                return Decoded(index, width=upright[0], height=upright[1], jpeg=data, orientation=orientation)
            pixels, (width, height) = _preprocess(image, preprocess)
    except Image.DecompressionBombError:
        return Decoded(index, error=f"too large: more than {MAX_PIXELS / 1e6:.0f} Mpx (decompression bomb?)")
    except UnidentifiedImageError:
        handle.seek(0)
        return Decoded(index, error=_not_an_image(handle.read(512)))
    except (OSError, MemberError) as error:
        _raise_if_transient(error)
        return Decoded(index, error=_broken_bytes(error))
    except Exception as error:  # noqa: BLE001 - Pillow's plugins raise anything on hostile bytes
        return Decoded(index, error=f"decode error: {type(error).__name__}: {error}")
    return Decoded(index, pixels, width, height)


def _device_jpeg(image: Image.Image, handle: BinaryIO, room: int) -> tuple[np.ndarray, int] | None:
    """The whole file and its orientation, when the device's decoder should take it: a JPEG of RGB or
    grey pixels (not CMYK) that ends where a JPEG ends, within `room` bytes. Anything else is decoded
    here as with --decode cpu, so its row says what it says there (a truncated file: `truncated`)."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    position = handle.tell()
    handle.seek(0)
    data = handle.read(room + 1)
    handle.seek(position)  # Pillow reads on from the header when the picture is decoded here
    if len(data) > room or not data.rstrip(b"\0").endswith(JPEG_END):
        return None
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return np.frombuffer(bytearray(data), dtype=np.uint8), orientation if orientation in range(1, 9) else 1


class _Unreadable(Exception):
    """A problem named before Pillow sees the file."""


class _Transient(Exception):
    """A read failed for a reason outside the file (its cause); the file is worth another try."""


def _raise_if_transient(error: BaseException) -> None:
    if transient.is_transient(error):
        raise _Transient() from error


def _broken_bytes(error: OSError | MemberError) -> str:
    message = str(error)
    if isinstance(error, MemberError):  # a streamed member whose tar ends before it does
        return message
    if "truncated" in message or "broken data stream" in message:
        return f"truncated: {message}"
    return f"decode error: {message or type(error).__name__}"


def _open_regular_file(path: str) -> BinaryIO:
    """One open per file (metadata operations are what a shared filesystem runs out of).

    O_NONBLOCK lets a FIFO named .jpg be opened and rejected instead of blocking the worker forever.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        if os.path.islink(path):
            raise _Unreadable(f"not found: dangling symlink to {os.readlink(path)}") from None
        raise _Unreadable("not found: the file no longer exists") from None
    except OSError as error:
        _raise_if_transient(error)
        raise _Unreadable(_os_error(error)) from None
    try:
        info = os.fstat(descriptor)
    except OSError as error:
        os.close(descriptor)
        _raise_if_transient(error)
        raise _Unreadable(_os_error(error)) from None
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise _Unreadable("not a regular file: a device, FIFO or socket has no picture to read")
    if info.st_size == 0:
        os.close(descriptor)
        raise _Unreadable("empty file: 0 bytes")
    return os.fdopen(descriptor, "rb")


def _open_member(member: Found) -> BinaryIO:
    try:
        handle = _members.open(member)
        empty = not handle.read(1)
    except MemberError as problem:
        _raise_if_transient(problem)
        raise _Unreadable(str(problem)) from None
    if empty:
        raise _Unreadable("empty file: 0 bytes")
    handle.seek(0)
    return handle


def _os_error(error: OSError) -> str:
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied: the file cannot be read"
    return f"read error: {error.strerror or error}"


def _not_an_image(head: bytes) -> str:
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return "not an image: the file is HTML or XML (a saved error page?)"
    try:
        head.decode("utf-8")
        return "not an image: the file is text"
    except UnicodeDecodeError:
        return "not an image: unrecognised format"


def _too_large(width: int, height: int) -> str:
    return (
        f"too large: {width}x{height} is {width * height / 1e6:.0f} Mpx, over the "
        f"{MAX_PIXELS / 1e6:.0f} Mpx limit (decompression bomb?)"
    )


def _preprocess(image: Image.Image, preprocess: Preprocess) -> tuple[np.ndarray, tuple[int, int]]:
    """The crop, and the picture's full size upright. Upright is whatever `exif_transpose` makes of the
    loaded picture: Pillow already turns some formats upright as it opens them (TIFF), so an orientation
    tag alone does not say whether the sides swap."""
    header_size, reduction = image.size, 1.0
    if image.format == "JPEG":
        # Decode at 1/2, 1/4 or 1/8 scale while the shorter side keeps at least twice the pixels the
        # resize needs. libjpeg scales by averaging 8x8 blocks, which blurs a little more than the
        # antialiased resize alone; at twice the size the resize's own filter dominates: crops of
        # camera pictures are 0.2 levels from a full decode's. Down to the resize itself saves a
        # quarter of the decoding time but flips 3% of close calls (docs/benchmarks.md).
        side, stored_width = 2 * preprocess.resize, image.width
        drafted = image.draft("RGB", (side, side))
        if drafted:  # (mode, (0, 0, width / scale, height / scale)): the extent the decoded pixels cover
            reduction = stored_width / drafted[1][2]
    image.load()
    loaded_size = image.size
    image = ImageOps.exif_transpose(image)
    upright = header_size[::-1] if image.size != loaded_size else header_size  # only a swap changes the size
    rgb = to_rgb(image)
    full_size = upright if reduction != 1.0 else rgb.size  # a format may load other than its header says
    return preprocess.cut(rgb, full_size, reduction), upright


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode: 16-bit scaled, not clipped; transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _resize_and_crop(image: Image.Image, preprocess: Preprocess, full_size: tuple[int, int], reduction: float) -> Image.Image:
    """torchvision's Resize(shorter side) then CenterCrop, done as one resize of just the cropped box.

    The box is worked out on the full-size picture, as torchvision does, then mapped onto pixels decoded
    at 1/`reduction` scale by dividing, not by the sizes' ratio: libjpeg rounds a reduced size up, so
    its last column and row cover less than a whole block."""
    width, height = full_size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(preprocess.resize * long / short)  # torchvision truncates the same way
    new_width, new_height = (preprocess.resize, new_long) if width <= height else (new_long, preprocess.resize)
    crop = preprocess.crop  # never more than either side: Preprocess keeps crop <= resize
    left = int(round((new_width - crop) / 2.0))
    top = int(round((new_height - crop) / 2.0))
    scale_x, scale_y = width / new_width / reduction, height / new_height / reduction
    box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
    return image.resize((crop, crop), INTERPOLATIONS[preprocess.interpolation], box=box)
