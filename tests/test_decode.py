"""The decode stage on its own: every awkward picture decodes upright, every bad file names its problem."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from batch.decode import Preprocess, decode
from benchmarks import pictures
from benchmarks.reference import open_rgb, reference_crop
from tests import images

PREPROCESS = Preprocess(resize=256, crop=224)


@pytest.mark.parametrize("name", sorted(images.GOOD))
def test_awkward_images_decode_to_a_crop_with_their_upright_size(awkward_folder, name):
    _writer, width, height = images.GOOD[name]
    result = decode(7, str(awkward_folder / "good" / name), PREPROCESS)
    assert result.error is None
    assert (result.index, result.width, result.height) == (7, width, height)
    assert result.pixels.shape == (224, 224, 3) and result.pixels.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(set(images.BAD) - {"unreadable.jpg"}))
def test_bad_files_get_a_clear_error_and_no_pixels(awkward_folder, name):
    _writer, expected = images.BAD[name]
    result = decode(0, str(awkward_folder / "bad" / name), PREPROCESS)
    assert result.pixels is None and result.width is None
    assert result.error.startswith(expected), result.error


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((300, 300), 32768, np.uint16)).save(tmp_path / "mid.png")
    result = decode(0, str(tmp_path / "mid.png"), PREPROCESS)
    assert 126 <= int(result.pixels.mean()) <= 129  # half of full scale, not white


def test_transparent_pixels_are_composited_on_white(tmp_path):
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert int(decode(0, str(tmp_path / "clear.png"), PREPROCESS).pixels.min()) == 255


def test_exif_rotation_is_applied_before_the_crop(tmp_path):
    """Left half black, right half white, stored rotated by EXIF 6 (90 degrees clockwise upright)."""
    stored = np.zeros((300, 400, 3), np.uint8)
    stored[:, 200:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    pixels = decode(0, str(tmp_path / "r.jpg"), PREPROCESS).pixels
    assert pixels[:100].mean() < 40 and pixels[-100:].mean() > 215  # upright: black on top, white below


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (1000, 999)])
def test_matches_torchvision_resize_then_center_crop(tmp_path, size):
    """Our single boxed resize must equal torchvision's Resize(256) + CenterCrop(224) on the same picture."""
    picture = images.photo().resize(size)
    reference = reference_crop(PREPROCESS)(picture)
    picture.save(tmp_path / "picture.png")
    ours = decode(0, str(tmp_path / "picture.png"), PREPROCESS).pixels.astype(int)
    difference = np.abs(ours - np.asarray(reference, dtype=int))
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 4


def test_reduced_scale_jpeg_decoding_stays_close_to_a_full_decode(tmp_path):
    """Camera-sized JPEGs decode at 1/2 to 1/8 scale; the crop must stay that of a full decode and
    torchvision's transforms, or close calls flip. These pictures average 0.2 levels off; scaling
    down to the resize itself (not twice it) gives 0.4, and a box taken from the reduced size's
    ratio (libjpeg rounds it up) 0.5."""
    paths = pictures.generate(tmp_path, 8, (2000, 4000), sorted(str(path) for path in images.PHOTOS.glob("*.jpg")))
    reference = reference_crop(PREPROCESS)
    differences = []
    for path in paths:
        full = np.asarray(reference(open_rgb(path)), dtype=float)
        differences.append(np.abs(decode(0, path, PREPROCESS).pixels - full).mean())
    assert np.mean(differences) < 0.3 and max(differences) < 0.6, np.round(differences, 2)


def test_preprocess_rejects_a_crop_larger_than_the_resize():
    with pytest.raises(ValueError, match="crop"):
        Preprocess(resize=200, crop=224)


def save_oriented(picture: Image.Image, path, orientation: int) -> None:
    """As cameras and scanners store it: the pixels as taken, and a tag saying how to turn them upright."""
    if path.suffix == ".tif":
        picture.save(path, tiffinfo={0x0112: orientation})
        return
    exif = Image.Exif()
    exif[0x0112] = orientation
    picture.save(path, exif=exif.tobytes())


@pytest.mark.parametrize("suffix", [".jpg", ".tif", ".png", ".webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_width_and_height_are_upright_for_every_orientation_and_format(tmp_path, suffix, orientation):
    path = tmp_path / f"oriented{suffix}"
    save_oriented(images.photo().resize((300, 200)), path, orientation)
    result = decode(0, str(path), PREPROCESS)
    upright = (200, 300) if orientation >= 5 else (300, 200)
    assert (result.width, result.height) == upright == open_rgb(str(path)).size
    expected = np.asarray(reference_crop(PREPROCESS)(open_rgb(str(path))), np.float32)
    assert np.abs(result.pixels.astype(np.float32) - expected).mean() < 2, "the crop must be of the upright picture"
