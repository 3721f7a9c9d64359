"""Which device runs the model, in which precision, and whether it works: decided before any work.

A job that was promised a GPU and cannot use one must not crawl on the CPU for hours: `auto` then
refuses, with CUDA's own reason and what hands a container its GPUs. A GPU that fails at first use
(busy in exclusive mode, ECC errors, no kernel image for its architecture, its memory full) fails
the probe here, in `plan`, not after the workers are forked. `batch doctor` asks the same questions.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from batch.environment import JobEnvironment

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16 = (8, 0)  # Ampere and newer; older GPUs emulate bf16, slower than fp32 (V100, T4)

# What hands a container its GPUs, by runtime: the fix named when a GPU was promised and none works.
GPU_REMEDIES = {
    "apptainer": "Apptainer shows the GPUs only with --nv: run apptainer exec --nv IMAGE ..., "
                 "or apptainer test --nv IMAGE",
    "podman": "Podman shows the GPUs only when given them: podman run --device nvidia.com/gpu=N "
              "(CDI: nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml), or nvidia.com/gpu=all",
    None: "Check the driver (nvidia-smi; this torch's CUDA needs the 580 driver series or newer) and that "
          "this torch build has CUDA",
}  # fmt: skip


class DeviceError(ValueError):
    """The requested device or precision cannot be used here; the message says why and what to do."""


def runtime(env: JobEnvironment) -> str | None:
    """The container runtime this process runs under, by the marks each leaves: "apptainer", "podman" or None."""
    if env.env.get("APPTAINER_CONTAINER") or env.env.get("SINGULARITY_CONTAINER"):
        return "apptainer"
    if env.env.get("container") == "podman" or os.path.exists("/run/.containerenv"):
        return "podman"
    return None


def cuda_unusable() -> str | None:
    """Why CUDA cannot be used in this process, in CUDA's own words ("driver too old", "no NVIDIA
    driver"...), or None when it can. torch only warns of these, once, or says nothing at all."""
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return None
    try:
        torch.cuda.init()  # raises with the reason that is_available() keeps to itself
    except Exception as error:  # noqa: BLE001 - RuntimeError, AssertionError or torch's own kinds
        return _first_sentence(str(error))
    return _first_sentence(str(said[0].message)) if said else "no CUDA device is visible"


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    return text.split(". ")[0].rstrip(".")


def promised_but_unusable(env: JobEnvironment, promise: str, problem: str) -> str:
    return f"a GPU was promised ({promise}) but CUDA cannot be used: {problem}. {GPU_REMEDIES[runtime(env)]}"


def choose_device(requested: str, env: JobEnvironment) -> torch.device:
    """'auto' is a GPU when CUDA works, the CPU when none was promised; an unusable GPU fails now, not later."""
    if requested == "auto":
        problem = cuda_unusable()
        if problem is None:
            return _gpu_of_this_task(env)
        promise = env.gpus_promised()
        if promise:
            raise DeviceError(
                f"--device auto: {promised_but_unusable(env, promise, problem)}. Without a GPU this job would run "
                "30 to 100 times slower; pass --device cpu to run on the CPU on purpose"
            )
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"unsupported device {requested!r}; use auto, cpu, cuda or cuda:N")
    problem = cuda_unusable()
    if problem is not None:
        raise DeviceError(f"--device {requested}: CUDA cannot be used here: {problem}. {GPU_REMEDIES[runtime(env)]}")
    if device.index is None:
        return _gpu_of_this_task(env)
    if device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def _gpu_of_this_task(env: JobEnvironment) -> torch.device:
    """Several tasks on one node that all see every GPU take one each, by their rank on the node."""
    count = torch.cuda.device_count()
    local = env.local_task()
    index = local % count if local is not None else 0
    if count > 1:
        log.info("%d GPUs are visible; this task (%s) uses cuda:%d", count,
                 f"rank {local} on this node" if local is not None else "alone", index)  # fmt: skip
    return torch.device("cuda", index)


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware on this very GPU: torch's own check counts emulation, and asks GPU 0 alone."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= NATIVE_BF16


def choose_precision(requested: str, device: torch.device) -> str:
    """'auto' is bf16 on a GPU that has it in hardware, else fp32."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested not in PRECISIONS:
        raise DeviceError(f"unknown precision {requested!r}; use auto, fp32, bf16 or fp16")
    if requested == "bf16" and device.type == "cuda" and not native_bf16(device):
        log.warning("%s (compute %d.%d) emulates bf16, slower than fp32: fp16 or fp32 is faster there",
                    device_name(device), *torch.cuda.get_device_capability(device))  # fmt: skip
    return requested


def probe(device: torch.device, precision: str) -> None:
    """An allocation, one small kernel in the run's precision and a synchronise: a GPU that cannot
    work fails here, naming why, before any worker is forked or any output is touched."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.set_device(device)
        square = torch.ones(64, 64, device=device, dtype=PRECISIONS[precision])
        total = float((square @ square).sum())
        torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - torch.AcceleratorError, RuntimeError, the driver's kinds
        raise DeviceError(f"{device} ({_name_or_unknown(device)}) failed its first use: {_first_sentence(str(error))}") from None
    if total != 64**3:
        raise DeviceError(f"{device} ({_name_or_unknown(device)}) computed a wrong answer ({total:g}, not {64**3}): a faulty GPU?")


def _name_or_unknown(device: torch.device) -> str:
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001 - a GPU that failed may not even say its name
        return "name unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
