"""Hugging Face transformers image classifiers, as `save_pretrained` (or the hub cache) left them.

A folder with `config.json` (`architectures`, `id2label`), `preprocessor_config.json` and
`model.safetensors` or `pytorch_model.bin`. The labels are the config's `id2label`; the preprocessing is
the model's own `AutoImageProcessor`, run by the decoding workers with its resize and crop only: its
rescale and normalisation are the same arithmetic as ours, done on the device from its own
`rescale_factor`, `image_mean` and `image_std`. Its fields differ from model to model (size as
`shortest_edge` or `height`/`width`, `crop_pct`, `crop_size`...), so they are never read here: the
processor is asked what it makes of pictures of two shapes, and only a fixed square output is taken.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from batch.decode import Preprocess
from batch.models import ModelError, ModelSpec, PreprocessOverrides, labels_of_length, require_extra
from batch.weights import WeightsError, keys_listed, local_file

log = logging.getLogger(__name__)

PROCESSOR_CONFIG = "preprocessor_config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_pretrained writes, preferred first
PLACEHOLDER_LABEL = re.compile(r"LABEL_\d+")  # what transformers names classes nobody named
PROBE_SHAPES = ((640, 480), (480, 640))  # landscape and portrait: a fixed output must not depend on them
RESAMPLE_NAMES = {Image.Resampling.NEAREST: "nearest", Image.Resampling.BILINEAR: "bilinear",
                  Image.Resampling.BICUBIC: "bicubic"}  # fmt: skip


@dataclass(frozen=True)
class ProcessorPreprocess(Preprocess):
    """The model's own image processor, resizing and cropping in the decoding workers; `mean` and `std`
    (0-255 scale) are its rescale and normalisation, applied on the device as for every model."""

    processor: Any = field(default=None, compare=False, repr=False)  # inherited by each forked worker
    settings: str = ""  # the processor's own configuration, as JSON: part of the results' identity

    def cut(self, image: Image.Image, full_size: tuple[int, int], reduction: float) -> np.ndarray:
        """Whatever the processor makes of the picture (decoded at reduced scale where it is large: the
        processor resizes from what it is given), back to uint8 HWC."""
        return _resized(self.processor, image)

    def describe(self) -> dict:
        return {
            "image_processor": json.loads(self.settings),
            "output_side": self.crop,
            "mean_0_255": list(self.mean),
            "std_0_255": list(self.std),
        }


def resolve(folder: str, labels: list[str] | None, overrides: PreprocessOverrides) -> ModelSpec:
    transformers = require_extra("hf", "transformers")
    config = _load(folder, "its config", lambda: transformers.AutoConfig.from_pretrained(folder, local_files_only=True))
    weights_file = _weights_file(folder)
    classes = config.num_labels
    if labels is not None:
        labels = labels_of_length(labels, classes, folder)
    else:
        labels = [str(config.id2label[index]) for index in range(classes)]
        if all(PLACEHOLDER_LABEL.fullmatch(label) for label in labels):
            log.warning("%s names its classes only %s...: its config.json has no id2label; pass --labels FILE "
                        "for real names", folder, ", ".join(labels[:3]))  # fmt: skip
    processor = _load(folder, PROCESSOR_CONFIG, lambda: transformers.AutoImageProcessor.from_pretrained(
        folder, local_files_only=True))  # fmt: skip
    architecture = (config.architectures or [type(config).__name__])[0]
    return ModelSpec(
        name=f"hf:{architecture}",
        weights=os.path.basename(os.path.abspath(folder)),  # named, not placed: a copy on scratch resumes
        weights_file=os.path.abspath(weights_file),
        labels=labels,
        preprocess=_preprocessing(processor, folder, overrides),
        builder=_build,
        options={"folder": os.path.abspath(folder)},
    )


def _preprocessing(processor: Any, folder: str, overrides: PreprocessOverrides) -> Preprocess:
    """The processor's resize and crop, and its rescale and normalisation on the 0-255 scale. --resize
    and --crop together replace its resize and crop with ours; --mean and --std replace its values."""
    interpolation = RESAMPLE_NAMES.get(getattr(processor, "resample", None), "bilinear")
    if None not in (overrides.resize, overrides.crop, overrides.mean, overrides.std):  # nothing of it is used
        return overrides.apply({"interpolation": interpolation})
    try:
        mean, std = _arithmetic(processor, folder)
    except ModelError:
        raise
    except (TypeError, ValueError, RuntimeError) as error:  # e.g. one that normalises even when told not to
        raise ModelError(f"{folder}'s {type(processor).__name__} cannot resize and crop without its rescale and "
                         f"normalisation, as batch's decoding workers need: {error}") from None  # fmt: skip
    base = {"mean": tuple(value / 255 for value in mean), "std": tuple(value / 255 for value in std),  # 0-1 scale
            "interpolation": interpolation}  # fmt: skip
    if overrides.resize is not None and overrides.crop is not None:
        return overrides.apply(base)
    if overrides.resize is not None or overrides.crop is not None or overrides.interpolation is not None:
        raise ModelError(f"{folder} is preprocessed by its own {type(processor).__name__}: pass --resize and "
                         "--crop together to replace its resize and crop with a centre crop")  # fmt: skip
    sides = {_resized(processor, Image.new("RGB", shape, (128, 128, 128))).shape[:2] for shape in PROBE_SHAPES}
    (height, width), *others = sides
    if others or height != width:
        made = " and ".join(f"{w}x{h}" for h, w in sorted(sides))
        raise ModelError(f"{folder}'s {type(processor).__name__} makes {made} inputs from pictures of other "
                         "shapes: only one square size is supported; pass --resize and --crop to choose a "
                         "centre crop")  # fmt: skip
    plain = overrides.apply({**base, "resize": height, "crop": height})  # --mean and --std, if given
    settings = json.dumps({"class": type(processor).__name__, **json.loads(processor.to_json_string())}, sort_keys=True)
    return ProcessorPreprocess(resize=height, crop=height, interpolation=plain.interpolation, mean=plain.mean,
                               std=plain.std, processor=processor, settings=settings)  # fmt: skip


def _arithmetic(processor: Any, folder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The processor's rescale and normalisation as per-channel (pixel - mean) / std on the 0-255 scale,
    measured on plain black and white pictures rather than read from its fields (which differ from model
    to model: rescale_offset, include_top...), then checked on a patterned picture: a processor that does
    more than resize, crop and this arithmetic is refused, not approximated."""

    def full(image: Image.Image) -> np.ndarray:
        return processor(images=image, return_tensors="np")["pixel_values"][0].astype(np.float64)

    plain = [full(Image.new("RGB", PROBE_SHAPES[0], (level,) * 3)) for level in (0, 255)]
    black, white = (made[:, made.shape[1] // 2, made.shape[2] // 2] for made in plain)  # the centre: never padding
    gain = (white - black) / 255
    rows, columns = np.indices(PROBE_SHAPES[0][::-1])
    pattern = np.stack([columns % 256, rows % 256, (rows + columns) % 256], axis=-1).astype(np.uint8)
    expected = full(Image.fromarray(pattern))
    ours = _resized(processor, Image.fromarray(pattern)).transpose(2, 0, 1) * gain[:, None, None] + black[:, None, None]
    # a processor that resizes in floating point loses up to half a level to our uint8 crops, and no more
    if not np.all(gain > 0) or ours.shape != expected.shape or np.abs(ours - expected).max() > 0.6 * gain.max():
        raise ModelError(f"{folder}'s {type(processor).__name__} does more than resize, crop, rescale and "
                         "normalise: its preprocessing cannot run in batch's decoding workers")  # fmt: skip
    return tuple(map(float, -black / gain)), tuple(map(float, 1 / gain))


def _resized(processor: Any, image: Image.Image) -> np.ndarray:
    """The processor's output for one RGB picture with its rescale and normalisation turned off: pixel
    values on the 0-255 scale (whole numbers from a uint8 resize), as uint8 HWC."""
    pixels = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    return np.ascontiguousarray(np.clip(np.rint(pixels.transpose(1, 2, 0)), 0, 255).astype(np.uint8))


def _weights_file(folder: str) -> str:
    found = [os.path.join(folder, name) for name in WEIGHTS_FILES if os.path.isfile(os.path.join(folder, name))]
    if not found:
        sharded = [name for name in os.listdir(folder) if name.endswith(".index.json")]
        if sharded:
            raise ModelError(f"{folder} holds sharded weights ({sharded[0]}): save the model as one file "
                             "(save_pretrained(..., max_shard_size='100GB'))")  # fmt: skip
        raise ModelError(f"the Hugging Face folder {folder} holds no weights: {' or '.join(WEIGHTS_FILES)}")
    return local_file(found[0])  # readable by this user, or a clear error now


def _load(folder: str, what: str, load: Any) -> Any:
    """transformers' own loader; what it raises for a folder it cannot use, as an error naming the file."""
    try:
        return load()
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"cannot read {what} in {folder}: {error}") from None


class _Logits(torch.nn.Module):
    """A transformers classifier called as every other network: pixels in, logits out."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(pixel_values=pixels).logits


def _build(spec: ModelSpec, _device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per load is noise in a job's log
    folder = spec.options["folder"]
    network, found = _load(folder, "its weights", lambda: AutoModelForImageClassification.from_pretrained(
        folder, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True))  # fmt: skip
    # mismatched shapes are let through the loader to be listed here with the rest, never kept re-initialised
    listed = keys_listed({what: [_named(key) for key in found.get(key) or []] for what, key in (
        ("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("other shapes", "mismatched_keys"))})
    if listed:
        raise WeightsError(f"the weights in {folder} do not fit {spec.name}: {listed}")
    return _Logits(network.float()).eval()


def _named(key: Any) -> str:
    """A key of the loader's report; a mismatched one is (name, the weights' shape, the config's shape)."""
    if isinstance(key, tuple) and len(key) == 3:
        name, stored, made = key
        return f"{name} {tuple(stored)}, the config makes {tuple(made)}"
    return str(key)

