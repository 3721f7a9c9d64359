"""`batch doctor`: the facts that decide whether a node can run the job, in one report.

Unhealthy (exit 1) when a GPU was expected (Slurm allotted one, or --expect-gpu) and none is visible,
or when a cache directory the job writes to is not writable.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile

from batch.environment import JobEnvironment


def _writable(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return "writable"
    except OSError as error:
        return f"NOT WRITABLE ({error.strerror or error})"


def _driver_version() -> str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi not found"
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi failed: {error}"
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else result.stderr.strip()


def _runtime(env: JobEnvironment) -> str | None:
    """The container runtime this process runs under, by the marks each leaves: "apptainer", "podman" or None."""
    if env.env.get("APPTAINER_CONTAINER") or env.env.get("SINGULARITY_CONTAINER"):
        return "apptainer"
    if env.env.get("container") == "podman" or os.path.exists("/run/.containerenv"):
        return "podman"
    return None


def _container(env: JobEnvironment) -> str:
    found = []
    if env.image_version:
        found.append(f"batch image {env.image_version}")
    runtime = _runtime(env)
    if runtime == "apptainer":
        found.append(f"Apptainer ({env.env.get('APPTAINER_CONTAINER') or env.env.get('SINGULARITY_CONTAINER')})")
    elif runtime == "podman":
        found.append("Podman")
    return ", ".join(found) or "none detected"


# What hands a container its GPUs, by runtime: the fix the report names when none is visible.
GPU_REMEDIES = {
    "apptainer": "Apptainer shows the GPUs only with --nv: run apptainer exec --nv IMAGE ..., "
                 "or apptainer test --nv IMAGE",
    "podman": "Podman shows the GPUs only when given them: podman run --device nvidia.com/gpu=N "
              "(CDI: nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml), or nvidia.com/gpu=all",
    None: "Check the driver (nvidia-smi) and that this torch build has CUDA",
}  # fmt: skip


def diagnose(env: JobEnvironment, expect_gpu: bool | None) -> tuple[str, bool]:
    import torch
    import torchvision

    import batch

    lines = [
        f"batch {batch.__version__}, python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}",
        f"host: {env.host}",
        f"CPUs usable: {env.cpus()}",
        f"CUDA build: {torch.version.cuda or 'none (CPU-only torch)'}; available: {torch.cuda.is_available()}",
        f"CUDA_VISIBLE_DEVICES: {env.env.get('CUDA_VISIBLE_DEVICES', '(unset)')}",
    ]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for number in range(gpus):
        props = torch.cuda.get_device_properties(number)
        lines.append(
            f"GPU {number}: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute {props.major}.{props.minor}, "
            f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
        )
    lines.append(f"driver: {_driver_version()}")
    caches = {
        "torch hub (TORCH_HOME)": torch.hub.get_dir(),
        "XDG_CACHE_HOME": env.env.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
        "TRITON_CACHE_DIR": env.env.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton")),
    }
    statuses = {name: _writable(path) for name, path in caches.items()}
    lines += [f"{name}: {path} {statuses[name]}" for name, path in caches.items()]
    if env.in_slurm:
        lines.append(
            f"Slurm: job {env.job_id}, array task {env.array_task_id or '-'}, "
            f"CPUs per task {env.env.get('SLURM_CPUS_PER_TASK', '-')}, GPUs {env.env.get('SLURM_JOB_GPUS', '-')}"
        )
    else:
        lines.append("Slurm: not in a job")
    lines.append(f"container: {_container(env)}")
    promise = env.gpus_promised() if expect_gpu is None else "--expect-gpu" if expect_gpu else None
    healthy = all(status == "writable" for status in statuses.values())
    if promise and not gpus:
        lines.append(f"PROBLEM: a GPU was expected ({promise}) but none is visible. {GPU_REMEDIES[_runtime(env)]}")
        healthy = False
    lines.append("ok" if healthy else "NOT OK")
    return "\n".join(lines), healthy
