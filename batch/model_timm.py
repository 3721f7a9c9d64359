"""timm models, as timm saved them: the labels, preprocessing and architecture come from timm's own files.

Two forms, both without network:
- `timm:ARCH --weights FILE`: an architecture name (the prefix keeps it from being taken for torchvision's
  model of the same name) with a checkpoint: `.safetensors`, a state dict, or a checkpoint of timm's
  `train.py` (`state_dict`, `state_dict_ema`, its argparse arguments). `FILE#ema` takes the EMA weights.
  Preprocessing: the checkpoint's training arguments over the architecture's default pretrained config.
- a folder holding timm's `config.json` (`architecture`, `pretrained_cfg`, `label_names`): what
  `save_for_hf` writes, and a Hugging Face cache snapshot of a `timm/...` model.
timm's own resolver (`resolve_data_config`) turns the config into size, crop_pct, interpolation, mean and
std; only its centre crop is what our decoders do, so the other crop modes are refused, not approximated.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

import torch

from batch.decode import INTERPOLATIONS
from batch.models import ModelError, ModelSpec, PreprocessOverrides, imagenet_categories, labels_of_length, require_extra
from batch.weights import WeightsError, load_fitting, local_file

log = logging.getLogger(__name__)

PREFIX = "timm:"
EMA_SUFFIX = "#ema"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_for_hf and the hub hold, preferred first


def resolve(model: str, weights: str, labels: list[str] | None, overrides: PreprocessOverrides) -> ModelSpec:
    models = require_extra("timm", "timm.models")
    if model.startswith(PREFIX):
        architecture = model.removeprefix(PREFIX)
        if not models.is_model(architecture):
            raise ModelError(f"timm has no architecture {architecture!r}; `python -c \"import timm; "
                             f"print(timm.list_models('{architecture[:4]}*'))\"` lists similar ones")  # fmt: skip
        path, ema = (weights.removesuffix(EMA_SUFFIX), True) if weights.endswith(EMA_SUFFIX) else (weights, False)
        if path == "DEFAULT" or path.lower() == "none":
            raise ModelError(f"{model} needs its checkpoint: --weights FILE (.safetensors, .pth, a train.py "
                             f"checkpoint; FILE{EMA_SUFFIX} for its EMA weights)")  # fmt: skip
        weights_file = local_file(path)
        state, arguments = read_checkpoint(weights_file, ema)
        config = models.get_pretrained_cfg(architecture).to_dict()
        head = state.get(f"{config.get('classifier')}.weight")  # the checkpoint's own head says how many classes
        classes = len(head) if head is not None else arguments.get("num_classes")
        model_args: dict[str, Any] = {}
        source = f"{os.path.basename(weights_file)}{EMA_SUFFIX if ema else ''}"
    else:
        from timm.models._hub import load_model_config_from_path  # timm's own reading of its config.json

        config, architecture, model_args = load_model_config_from_path(model)
        model_args = {key: value for key, value in model_args.items() if key != "num_classes"}  # the labels say
        arguments, classes = {}, config.get("num_classes")
        weights_file = next((os.path.join(model, name) for name in WEIGHTS_FILES
                             if os.path.isfile(os.path.join(model, name))), None)  # fmt: skip
        if weights_file is None:
            raise ModelError(f"the timm folder {model} holds no weights: {' or '.join(WEIGHTS_FILES)}")
        weights_file = local_file(weights_file)  # readable by this user, or a clear error now
        source = os.path.basename(os.path.abspath(model))
    labels = _labels(labels, config, classes, model)
    # The source is named, not placed: a job that copies the model to node-local scratch resumes the
    # same results, since the weights' hash, labels and preprocessing are what the identity compares.
    return ModelSpec(
        name=f"{PREFIX}{architecture}",
        weights=source,
        weights_file=os.path.abspath(weights_file),
        labels=labels,
        preprocess=overrides.apply(_preprocessing(arguments, config, model, overrides)),
        builder=_build,
        options={"architecture": architecture, "model_args": model_args, "ema": source.endswith(EMA_SUFFIX)},
    )


def _labels(given: list[str] | None, config: dict[str, Any], classes: int | None, model: str) -> list[str]:
    """--labels, else the model's own label names, else ImageNet's for a 1000-class head."""
    if given is not None:
        return labels_of_length(given, classes, model) if classes else given
    names = config.get("label_names")
    if isinstance(names, dict):  # id -> name, where the ids have gaps
        names = [names.get(str(index), names.get(index, f"class_{index}")) for index in range(classes or len(names))]
    if names:  # described where the model says how (ImageNet's synset ids), as timm's inference.py shows them
        descriptions = config.get("label_descriptions") or {}
        return [str(descriptions.get(name, name)) for name in names]
    if classes == 1000:
        return imagenet_categories()
    outputs = f"{classes} outputs" if classes else "its head not found in the weights"
    raise ModelError(f"{model} names no classes ({outputs}): pass --labels FILE, one name per line")


def _preprocessing(arguments: dict[str, Any], config: dict[str, Any], model: str,
                   overrides: PreprocessOverrides) -> dict[str, Any]:  # fmt: skip
    """timm's own data config, as our resize-shorter-side-then-centre-crop; one we cannot do is refused
    unless --resize and --crop choose the centre crop to use instead."""
    from timm.data import resolve_data_config

    data = resolve_data_config(args=arguments, pretrained_cfg=config)
    _, height, width = data["input_size"]
    chosen = overrides.resize is not None and overrides.crop is not None
    if height != width and not chosen:
        raise ModelError(f"{model} takes {width}x{height} inputs: only square ones are supported; "
                         "pass --resize and --crop to choose a square centre crop")  # fmt: skip
    if data["crop_mode"] != "center" and not chosen:
        raise ModelError(f"{model} preprocesses with crop_mode {data['crop_mode']!r}: only 'center' is supported; "
                         "pass --resize and --crop to choose a centre crop instead")  # fmt: skip
    interpolation = data["interpolation"] if data["interpolation"] in INTERPOLATIONS else "bicubic"
    if interpolation != data["interpolation"] and overrides.interpolation is None:
        log.warning("%s resizes with %r interpolation, which batch does not have: bicubic instead "
                    "(--interpolation chooses another)", model, data["interpolation"])  # fmt: skip
    return {
        "resize": math.floor(height / data["crop_pct"]),  # timm's transforms_factory does the same
        "crop": height,
        "interpolation": interpolation,
        "mean": tuple(data["mean"]),
        "std": tuple(data["std"]),
    }


def read_checkpoint(path: str, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights in `path` and the training arguments stored beside them, read as data (no pickled code
    beyond argparse's Namespace). `module.` prefixes of distributed training are removed, as timm does."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            checkpoint: Any = load_file(path)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch and safetensors raise many kinds for a foreign file
        raise WeightsError(f"cannot read the checkpoint {path}: {error}") from None
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a timm checkpoint")
    arguments = checkpoint.get("args")
    arguments = vars(arguments) if isinstance(arguments, argparse.Namespace) else {}
    keys = ("state_dict_ema", "model_ema") if ema else ("state_dict", "model")
    state = next((checkpoint[key] for key in keys if isinstance(checkpoint.get(key), dict)), None)
    if ema and state is None:
        raise WeightsError(f"{path} holds no EMA weights (state_dict_ema): drop {EMA_SUFFIX} from --weights")
    state = checkpoint if state is None else state
    return {key.removeprefix("module."): value for key, value in state.items()}, arguments


def _build(spec: ModelSpec, _device: torch.device) -> torch.nn.Module:
    import timm

    options = spec.options
    network = timm.create_model(options["architecture"], pretrained=False, num_classes=len(spec.labels),
                                **options["model_args"])  # fmt: skip
    assert spec.weights_file is not None
    state, _ = read_checkpoint(spec.weights_file, options["ema"])
    load_fitting(network, state, spec.weights_file, spec.name, len(spec.labels))
    return network.eval()

