"""`batch doctor`: the facts that decide whether a node can run the job, in one report.

Unhealthy (exit 1) when a GPU was expected (Slurm allotted one, or --expect-gpu) and CUDA cannot be
used (with CUDA's own reason: no driver, a driver too old...), when a GPU fails a small kernel, or
when a cache directory the job writes to is not writable.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile

from batch.devices import DeviceError, cuda_unusable, native_bf16, probe, promised_but_unusable, runtime
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


def _container(env: JobEnvironment) -> str:
    found = []
    if env.image_version:
        found.append(f"batch image {env.image_version}")
    where = runtime(env)
    if where == "apptainer":
        found.append(f"Apptainer ({env.env.get('APPTAINER_CONTAINER') or env.env.get('SINGULARITY_CONTAINER')})")
    elif where == "podman":
        found.append("Podman")
    return ", ".join(found) or "none detected"


def _gpu_lines() -> tuple[list[str], bool]:
    """One line per visible GPU, each after a small kernel in its best precision; and whether all worked."""
    import torch

    lines, healthy = [], True
    for number in range(torch.cuda.device_count()):
        device = torch.device("cuda", number)
        props = torch.cuda.get_device_properties(number)
        bf16 = native_bf16(device)
        try:
            probe(device, "bf16" if bf16 else "fp32")
            works = f"a {'bf16' if bf16 else 'fp32'} kernel ran"
        except DeviceError as error:
            works, healthy = f"FAILED: {error}", False
        lines.append(f"GPU {number}: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute {props.major}.{props.minor}, "
                     f"bf16 {'native' if bf16 else 'emulated (slow): fp32 by default'}; {works}")  # fmt: skip
    return lines, healthy


def diagnose(env: JobEnvironment, expect_gpu: bool | None) -> tuple[str, bool]:
    import torch
    import torchvision

    import batch

    problem = cuda_unusable()
    lines = [
        f"batch {batch.__version__}, python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}",
        f"host: {env.host}",
        f"CPUs usable: {env.cpus()}",
        f"CUDA build: {torch.version.cuda or 'none (CPU-only torch)'}; "
        + ("usable" if problem is None else f"unusable: {problem}"),
        f"CUDA_VISIBLE_DEVICES: {env.env.get('CUDA_VISIBLE_DEVICES', '(unset)')}",
    ]
    gpus_work = True
    if problem is None:
        gpu_lines, gpus_work = _gpu_lines()
        lines += gpu_lines
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
    healthy = gpus_work and all(status == "writable" for status in statuses.values())
    if promise and problem is not None:
        lines.append(f"PROBLEM: {promised_but_unusable(env, promise, problem)}")
        healthy = False
    elif not gpus_work:
        lines.append("PROBLEM: a GPU failed its check (above)")
    lines.append("ok" if healthy else "NOT OK")
    return "\n".join(lines), healthy
