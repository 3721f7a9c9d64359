"""The plan of a classify run: every argument checked, cheapest first, before any work.

`plan` creates nothing but the output directory (and that only after every other argument is known to
be usable, and never left behind when it cannot be written); last, it reads what earlier runs of this
shard finished there, refusing results of another configuration. `pipeline.execute` then runs the plan.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, replace
from typing import Any

import torch
import torchvision

import batch
from batch import commit, decode_device, models, sources, transient
from batch.decode_device import JPEG_BYTES_PER_FILE
from batch.devices import choose_device, choose_precision, device_name, probe
from batch.environment import JobEnvironment, Shard
from batch.paths import BUCKETS
from batch.pool import SLOTS
from batch.retry_failed import RetryFailed
from batch.weights import DEFAULT_WEIGHTS

log = logging.getLogger(__name__)

SHARED_MEMORY_SHARE = 4  # the decoded batches waiting in shared memory may take a quarter of the task's


@dataclass(frozen=True)
class ClassifyOptions:
    sources: tuple[str, ...]
    output: str
    model: str = models.DEFAULT_MODEL
    weights: str = DEFAULT_WEIGHTS
    labels_file: str | None = None
    overrides: models.PreprocessOverrides = models.PreprocessOverrides()
    activation: str = "softmax"
    templates: tuple[str, ...] = ()  # a zero-shot CLIP model's prompts
    topk: int = 5
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    decode: str = "cpu"  # where JPEGs are decoded: cpu (the workers), gpu (the model's device) or auto
    shard: Shard | None = None
    embeddings: bool = False
    overwrite: bool = False
    strict: bool = False
    max_error_rate: float | None = None
    commit_every: float = 60.0
    decode_timeout: float = 300.0
    io_retries: int = transient.DEFAULT_RETRIES
    retry_failed: RetryFailed | None = None


@dataclass
class Plan:
    options: ClassifyOptions
    spec: models.ModelSpec
    device: torch.device
    precision: str
    decode: str  # cpu or gpu, as decode_device.choose made of --decode
    shard: Shard
    workers: int
    batch_size: int
    env: JobEnvironment
    output: commit.OutputDir

    def provenance(self) -> dict[str, Any]:
        return {
            "batch_version": batch.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "weights_file": self.spec.weights_file,
            "untrained": self.spec.untrained,
            "labels": self.spec.labels,
            "device": str(self.device),
            "device_name": device_name(self.device),
            "precision": self.precision,
            "decode": self.decode,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "host": self.env.host,
            "slurm_job_id": self.env.job_id,
            "slurm_array_job_id": self.env.array_job_id,
            "slurm_array_task_id": self.env.array_task_id,
            "image_version": self.env.image_version,
            "shard": {"index": self.shard.index, "count": self.shard.count,
                      "buckets": [self.shard.buckets.start, self.shard.buckets.stop]},  # fmt: skip
        }


def plan(options: ClassifyOptions, env: JobEnvironment) -> Plan:
    """Validate the arguments before any work; raises a ValueError subclass naming what is wrong."""
    if options.topk < 1:
        raise ValueError(f"--topk must be at least 1, not {options.topk}")
    if options.retry_failed and options.overwrite:
        raise ValueError("--retry-failed redoes the failed rows, --overwrite every row: choose one")
    if options.max_error_rate is not None and not 0 <= options.max_error_rate <= 1:
        raise ValueError(f"--max-error-rate is a fraction between 0 and 1, not {options.max_error_rate}")
    if options.activation not in models.ACTIVATIONS:
        raise ValueError(f"--activation is one of {', '.join(models.ACTIVATIONS)}, not {options.activation!r}")
    sources.check_sources(options.sources)
    spec = replace(models.resolve(options.model, options.weights, options.labels_file, options.overrides, options.templates),
                   activation=options.activation)  # fmt: skip
    if options.embeddings and not spec.supports_embeddings:
        raise ValueError(f"--embeddings is not available for {spec.name}: a model file hides its layers")
    shard = options.shard or env.shard() or Shard(0, 1)
    device = choose_device(options.device, env)
    precision = choose_precision(options.precision, device)
    workers = default_workers(env, device) if options.workers is None else options.workers
    if workers < 0:
        raise ValueError(f"--workers must be 0 (decode in the main process) or more, not {workers}")
    if options.batch_size is not None and options.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {options.batch_size}")
    probe(device, precision)
    decode = decode_device.choose(options.decode, device, spec.preprocess)
    batch_size = fit_batch_size(options.batch_size, device, workers, spec.preprocess.crop, env, decode)
    commit.check_writable(options.output)
    wanted = identity(spec, options.topk, options.embeddings, precision, decode)
    output = commit.OutputDir(options.output, shard.buckets, wanted, env.job_id)
    output.prepare(options.overwrite)
    return Plan(options, spec, device, precision, decode, shard, workers, batch_size, env, output)


def identity(spec: models.ModelSpec, topk: int, embeddings: bool, precision: str, decode: str = "cpu") -> dict[str, Any]:
    """What every part of one output must share: the model's answers, their shape and numerics, and the
    bucket layout. Precision is one of them: bf16 scores differ from fp32's in the third digit and
    reorder near-ties, so a requeue that lands on a node of another kind is refused, not mixed in. So is
    decoding on the device, which decodes whole pictures where the CPU decodes JPEGs at reduced scale;
    named only then, so outputs written before --decode existed stay this configuration's."""
    decoded = {"decode": decode} if decode != "cpu" else {}
    return {**spec.identity(), "topk": topk, "embeddings": embeddings, "precision": precision, **decoded,
            "buckets": BUCKETS}  # fmt: skip


def default_batch_size(device: torch.device) -> int:
    """256 on a GPU. 32 on CPU: a float batch of 64 (38 MB) is past glibc's largest mmap threshold, so
    every batch was mapped and faulted in afresh (1.5 s of system time on 1500 images, two cores)."""
    return 256 if device.type == "cuda" else 32


def default_workers(env: JobEnvironment, device: torch.device) -> int:
    """A decoding process per CPU; on a GPU one CPU is left to the process that feeds it."""
    return max(1, env.cpus() - 1) if device.type == "cuda" else env.cpus()


def fit_batch_size(requested: int | None, device: torch.device, workers: int, crop: int, env: JobEnvironment,
                   decode: str = "cpu") -> int:  # fmt: skip
    """The batch size, the default made small enough that the workers' slots of decoded batches (and of
    JPEGs, decoding on the device) fit in a share of the task's memory: 16 workers' slots of 256 crops of
    600 px would take 8.9 GB. Fewer but larger pictures keep a GPU as busy."""
    size = requested or default_batch_size(device)
    memory, holders = env.memory(), max(workers, 1)
    per_picture = holders * SLOTS * (crop * crop * 3 + (JPEG_BYTES_PER_FILE if decode == "gpu" else 0))
    fits = max(1, memory // SHARED_MEMORY_SHARE // per_picture)
    if size <= fits:
        return size
    held = (f"{holders} workers x {SLOTS} batches of {size} crops of {crop} px{' and JPEGs' if decode == 'gpu' else ''} take "
            f"{size * per_picture / 2**20:,.0f} MiB, over 1/{SHARED_MEMORY_SHARE} of this task's "
            f"{memory / 2**20:,.0f} MiB of memory")  # fmt: skip
    if requested:
        log.warning("%s: --batch-size %d may run out of memory", held, size)
        return size
    log.info("%s: batches of %d instead", held, fits)
    return fits
