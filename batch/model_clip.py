"""Zero-shot classification with OpenCLIP: class names the user writes, scored by a CLIP model's own towers.

Two forms, both without network:
- a folder with `open_clip_config.json` (`model_cfg`, `preprocess_cfg`) and its weights, as open_clip's
  hub export and its `local-dir:` schema read it;
- `open_clip:ARCH --weights FILE`: a built-in architecture with a weights file; its preprocessing is the
  built-in config's (open_clip's defaults at the architecture's input size), and the log says so.
A bare weights file names no architecture, and would silently get default preprocessing: refused.

The classes are `--labels` (any number) and the prompts `--template` (repeatable, `{}` for the class):
the text side runs once, when the network is built, and becomes a linear head of unit text embeddings
times the model's logit scale. The network that runs is the image tower, its output made unit length
(the `embedding` column), then that head: batches never touch the text tower.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batch.decode import INTERPOLATIONS, Preprocess
from batch.models import ModelError, ModelSpec, PreprocessOverrides, hub_snapshot, read_json, require_extra
from batch.weights import WeightsError, local_file

log = logging.getLogger(__name__)

PREFIX = "open_clip:"
CONFIG = "open_clip_config.json"
DEFAULT_TEMPLATES = ("a photo of a {}.",)
TEXT_BATCH = 256  # prompts encoded at once: thousands of classes in bounded memory


def is_clip_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG))


def is_clip_model(model: str) -> bool:
    """`open_clip:ARCH`, or a folder (or hub cache folder) holding open_clip_config.json."""
    return model.startswith(PREFIX) or (os.path.isdir(model) and is_clip_folder(hub_snapshot(model)))


def resolve(model: str, weights: str, labels: list[str] | None, overrides: PreprocessOverrides,
            templates: tuple[str, ...]) -> ModelSpec:  # fmt: skip
    open_clip = require_extra("clip", "open_clip")
    if labels is None:
        raise ModelError(f"zero-shot {model} scores the classes you name: pass --labels FILE, one class per line")
    templates = templates or DEFAULT_TEMPLATES
    unfilled = [template for template in templates if "{}" not in template]
    if unfilled:
        raise ModelError(f"--template {unfilled[0]!r} has no {{}} where the class name goes")
    if model.startswith(PREFIX):
        architecture = model.removeprefix(PREFIX)
        config = open_clip.get_model_config(architecture) if architecture else None
        if config is None:
            raise ModelError(f"open_clip has no built-in architecture {architecture!r}; "
                             f"`python -c \"import open_clip; print(open_clip.list_models())\"` lists them")  # fmt: skip
        if weights == "DEFAULT" or weights.lower() == "none":
            raise ModelError(f"{model} needs its weights: --weights FILE (open_clip_pytorch_model.bin, .safetensors)")
        weights_file, source, chosen = local_file(weights), os.path.basename(weights), {}
        name, created = model, {"model_name": architecture, "pretrained": os.path.abspath(weights_file)}
    else:
        from open_clip.factory import _find_checkpoint_in_dir  # open_clip's own choice among a folder's files

        stored = read_json(os.path.join(model, CONFIG))  # a hub snapshot already, and --weights refused
        if not isinstance(stored.get("model_cfg"), dict):
            raise ModelError(f"{os.path.join(model, CONFIG)} holds no 'model_cfg': it is not an OpenCLIP config")
        config, chosen = stored["model_cfg"], stored.get("preprocess_cfg") or {}
        found = _find_checkpoint_in_dir(Path(model))
        if found is None:
            raise ModelError(f"the OpenCLIP folder {model} holds no weights (.safetensors, .bin or .pth)")
        weights_file, source = local_file(found), os.path.basename(os.path.abspath(model))
        name = f"{PREFIX}{os.path.basename(os.path.abspath(model))}"
        created = {"model_name": f"local-dir:{os.path.abspath(model)}"}
    preprocess = _preprocessing(config, chosen, model, overrides)
    if name == model:  # a built-in architecture: its preprocessing is open_clip's defaults at its size
        log.info("%s takes the built-in config's preprocessing: %s", model, preprocess.describe())
    return ModelSpec(
        name=name,
        weights=source,  # named, not placed: a copy on node-local scratch resumes the same results
        weights_file=os.path.abspath(weights_file),
        labels=list(labels),
        preprocess=preprocess,
        builder=_build,
        options={"created": created, "templates": templates},
        family_identity={"templates": list(templates)},
    )


def _preprocessing(config: dict[str, Any], chosen: dict[str, Any], model: str,
                   overrides: PreprocessOverrides) -> Preprocess:  # fmt: skip
    """open_clip's own defaults, the folder's preprocess_cfg over them, at the image tower's input size: a
    resize of the shorter side and a centre crop, as open_clip's `shortest` mode does. Its other modes
    (`squash`, `longest` with padding) are refused unless --resize and --crop choose a centre crop."""
    from open_clip.factory import merge_preprocess_dict
    from open_clip.transform import PreprocessCfg

    settings = merge_preprocess_dict(asdict(PreprocessCfg()), chosen)
    size = config.get("vision_cfg", {}).get("image_size", settings["size"])
    side, *others = {size} if isinstance(size, int) else set(size)
    chosen_crop = overrides.resize is not None and overrides.crop is not None
    if (others or settings["resize_mode"] != "shortest") and not chosen_crop:
        raise ModelError(f"{model} preprocesses with resize_mode {settings['resize_mode']!r} at {size}: only a "
                         "square centre crop ('shortest') is supported; pass --resize and --crop to choose one")  # fmt: skip
    if settings["interpolation"] not in INTERPOLATIONS and overrides.interpolation is None:
        raise ModelError(f"{model} resizes with {settings['interpolation']!r} interpolation: pass --interpolation")
    return overrides.apply({"resize": side, "crop": side, "interpolation": settings["interpolation"],
                            "mean": tuple(settings["mean"]), "std": tuple(settings["std"])})  # fmt: skip


class ZeroShot(nn.Module):
    """The image tower, its embedding made unit length, then a linear head of the classes' text embeddings."""

    def __init__(self, visual: nn.Module, classes: torch.Tensor, scale: float, bias: float | None):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(classes.shape[1], classes.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.head.weight.copy_(classes * scale)
            if bias is not None:
                self.head.bias.fill_(bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.visual(pixels)
        return self.head(nn.functional.normalize(features.float(), dim=-1))


def _build(spec: ModelSpec, device: torch.device) -> nn.Module:
    import open_clip

    created = spec.options["created"]
    try:
        model = open_clip.create_model(**created, require_pretrained=True, pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(created["model_name"])
    except Exception as error:  # noqa: BLE001 - open_clip asserts, torch raises many kinds for a foreign file
        raise WeightsError(f"cannot load {spec.name} from {spec.weights_file}: {type(error).__name__}: {error}") from None
    model = model.eval().to(device)  # the text side runs once, where the images will
    classes = class_embeddings(model, tokenizer, spec.labels, spec.options["templates"], device)
    bias = getattr(model, "logit_bias", None)
    return ZeroShot(model.visual.cpu(), classes, float(model.logit_scale.exp()),
                    float(bias) if bias is not None else None).eval()  # fmt: skip


@torch.inference_mode()
def class_embeddings(model: nn.Module, tokenizer: Any, labels: list[str], templates: tuple[str, ...],
                     device: torch.device) -> torch.Tensor:  # fmt: skip
    """Each class's prompts encoded, made unit length and averaged (CLIP's prompt ensembling), unit length again."""
    prompts = [template.format(label) for label in labels for template in templates]
    encoded = torch.cat([
        model.encode_text(tokenizer(prompts[start:start + TEXT_BATCH]).to(device), normalize=True).float()
        for start in range(0, len(prompts), TEXT_BATCH)
    ])  # fmt: skip
    averaged = encoded.view(len(labels), len(templates), -1).mean(dim=1)
    return nn.functional.normalize(averaged, dim=-1).cpu()

