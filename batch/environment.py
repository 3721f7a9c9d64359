"""The one place that reads the job's surroundings: Slurm, the container, the CPUs we may use.

Everything else asks a `JobEnvironment`, so tests can hand it a plain dict instead of patching os.environ.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Mapping, MutableMapping

from batch.paths import BUCKETS

IMAGE_VERSION_VARIABLE = "BATCH_IMAGE_VERSION"
CGROUP_MEMORY_LIMIT = "/sys/fs/cgroup/memory.max"  # cgroup v2: "max", or bytes


class ShardingError(ValueError):
    """The Slurm variables do not describe a shard we can compute."""


@dataclass(frozen=True)
class Shard:
    """Task `index` of `count`: it takes a contiguous range of the fixed buckets that inputs hash to."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= BUCKETS:
            raise ShardingError(f"the number of shards must be between 1 and {BUCKETS}, not {self.count}")
        if not 0 <= self.index < self.count:
            raise ShardingError(f"shard index {self.index} is outside 0..{self.count - 1}")

    @property
    def buckets(self) -> range:
        """Balanced to within one bucket; any count covers every bucket exactly once."""
        return range(self.index * BUCKETS // self.count, (self.index + 1) * BUCKETS // self.count)


@dataclass(frozen=True)
class JobEnvironment:
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def _int(self, name: str) -> int | None:
        value = self.env.get(name, "").strip()
        if not value:
            return None
        try:
            return int(value)
        except ValueError:
            raise ShardingError(f"{name}={value!r} is not an integer") from None

    @property
    def in_slurm(self) -> bool:
        return "SLURM_JOB_ID" in self.env

    @property
    def job_id(self) -> str | None:
        return self.env.get("SLURM_JOB_ID")

    @property
    def array_job_id(self) -> str | None:
        return self.env.get("SLURM_ARRAY_JOB_ID")

    @property
    def array_task_id(self) -> str | None:
        return self.env.get("SLURM_ARRAY_TASK_ID")

    @property
    def image_version(self) -> str | None:
        """Set by our container image, so results record which image made them."""
        return self.env.get(IMAGE_VERSION_VARIABLE) or None

    @property
    def host(self) -> str:
        return self.env.get("SLURMD_NODENAME") or socket.gethostname()

    def local_task(self) -> int | None:
        """This task's rank among the tasks of its job on this node (SLURM_LOCALID), or None outside Slurm."""
        return self._int("SLURM_LOCALID")

    def cpus(self) -> int:
        """CPUs this task may use: Slurm's allocation first, then this process's affinity mask."""
        allotted = self._int("SLURM_CPUS_PER_TASK")
        if allotted:
            return allotted
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1

    def allotted_memory(self) -> int | None:
        """Bytes of memory Slurm gave this task (--mem, or --mem-per-cpu times the CPUs), or None."""
        per_node, per_cpu = self._int("SLURM_MEM_PER_NODE"), self._int("SLURM_MEM_PER_CPU")
        if per_node:
            return per_node * 2**20  # Slurm counts in MiB
        if per_cpu:
            return per_cpu * 2**20 * self.cpus()
        return None

    def memory(self) -> int:
        """Bytes of memory this task may use: Slurm's allocation, else the container's or cgroup's limit,
        else the machine's."""
        allotted = self.allotted_memory()
        if allotted:
            return allotted
        try:
            with open(CGROUP_MEMORY_LIMIT, encoding="ascii") as handle:
                limit = handle.read().strip()
            if limit.isdigit():
                return int(limit)
        except OSError:
            pass
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def gpus_promised(self) -> str | None:
        """The variable saying this job was handed GPUs (so a job without a visible one is broken), or None.

        CUDA_VISIBLE_DEVICES counts when it names a device: Slurm sets it with the GPUs it allots, and a
        container runtime passes it on; empty, -1 or Slurm's NoDevFiles hide every GPU on purpose.
        """
        for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_TASK"):
            value = self.env.get(name, "").strip()
            if value and value not in ("0", "none"):
                return f"{name}={value}"
        for name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
            value = self.env.get(name, "").strip()
            if value and value != "NoDevFiles" and not value.startswith("-"):
                return f"{name}={value}"
        return None

    def shard(self) -> Shard | None:
        """The shard a Slurm array task (times the srun task within it) should take, or None outside Slurm.

        Arrays need not start at 0 or step by 1 (--array=1-31:2 gives tasks 1, 3, ..., 31), so the
        index is counted from SLURM_ARRAY_TASK_MIN in steps of SLURM_ARRAY_TASK_STEP.
        """
        array = self._array_shard()
        tasks = self._int("SLURM_NTASKS")
        procid = self._int("SLURM_PROCID")
        step = Shard(procid, tasks) if tasks and tasks > 1 and procid is not None else None
        if array and step:
            return Shard(array.index * step.count + step.index, array.count * step.count)
        return array or step

    def _array_shard(self) -> Shard | None:
        task = self._int("SLURM_ARRAY_TASK_ID")
        if task is None:
            return None
        count = self._int("SLURM_ARRAY_TASK_COUNT")
        first = self._int("SLURM_ARRAY_TASK_MIN")
        if count is None or first is None:
            raise ShardingError(
                "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MIN is not; "
                "pass --num-shards and --shard-index"
            )
        stride = self._int("SLURM_ARRAY_TASK_STEP") or 1
        offset = task - first
        if offset % stride:
            raise ShardingError(
                f"array task {task} is not on the grid {first}+k*{stride}: irregular arrays "
                "(--array=1,4,9) need explicit --num-shards and --shard-index"
            )
        return Shard(offset // stride, count)


def _can_create(path: str) -> bool:
    """Whether `path` exists writable, or could be made in its nearest existing ancestor (creates nothing)."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def redirect_unwritable_caches(env: MutableMapping[str, str]) -> dict[str, str]:
    """Point torch's, Triton's and XDG's write caches at a private temp folder when HOME cannot hold them.

    Apptainer mounts the image read-only and HOME may be the host's, read-only or missing; a uid chosen
    with --user has no passwd entry (so `~` does not even expand). Variables the user set are kept.
    """
    home = os.path.expanduser("~")
    usable_home = home != "~" and os.path.isabs(home)
    fallback = os.path.join(tempfile.gettempdir(), f"batch-cache-{os.getuid()}")
    defaults = {
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        "TRITON_CACHE_DIR": os.path.join(home, ".triton", "cache"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(home, ".cache", "torchinductor"),
    }
    redirected = {}
    for name, default in defaults.items():
        if name not in env and not (usable_home and _can_create(default)):
            redirected[name] = env[name] = os.path.join(fallback, name.lower())
    return redirected


def let_openmp_sleep(env: MutableMapping[str, str]) -> None:
    """Idle OpenMP threads sleep instead of spinning, because the decoding workers need those cores.

    Measured on two cores, 1500 JPEGs: 2.5 of 13 CPU-seconds went to spinning, and the run took 10% longer.
    It must be set before torch loads OpenMP; a value the user set is kept.
    """
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def stay_offline(env: MutableMapping[str, str]) -> None:
    """Hugging Face's libraries never reach for the network: a compute node has none, and a model that
    would fetch a file must fail naming it, not hang on a timeout or take what the hub serves today."""
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
