"""Bookkeeping at 10^7 and 10^8 inputs: what a task, `batch summary`, `pending` and `index` cost as trees grow.

Usage: python -m benchmarks.scale [--rows 10000000] [--per-task 10000] [--tree 1000000] [--list 10000000]
                                  [--tars 0] [--folder DIR]

The manifests are made-up paths (nothing is read from them: each input gets a `not found` row in a
fraction of a millisecond), so what is timed is the bookkeeping alone. Every command is the real CLI
in its own process, timed from start to exit, with its peak resident memory (ru_maxrss):
- shard 0 of a ROWS-row manifest against shard 0 of a PER-TASK-row manifest, PER-TASK images a task;
- the same task again over an output that already holds a row for every input (the rerun that does
  nothing), and once more with the rows of its share missing;
- `batch summary --manifest`, `batch pending` and `batch report` over ROWS rows against the ROWS-row
  manifest, each within its default memory budget (1.5 GiB: batch.spill);
- `batch index` of a real tree of TREE empty files in 1000 folders, with 1 and with 32 threads;
- `batch index @LIST` of a list of LIST made-up names, as a site makes one with `lfs find`;
- `batch index` of a folder of TARS WebDataset shards of MEMBERS images each (and their `.json`), listed by
  one process and by one per CPU.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Collection, Iterable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from batch import manifest, models
from batch.decode import Decoded
from batch.environment import Shard
from batch.inference import Predictions
from batch.plan import identity
from batch.writer import ChunkWriter, RowBuilder

MODEL = ("--model", "mobilenet_v3_small", "--weights", "none", "--workers", "1", "--device", "cpu")
WRITE_ROWS = 10_000
TOPK = 5  # classify's default, so a rerun finds the same configuration
FAILURE = "io error: [Errno 5] Input/output error (failed 4 times)"


def made_up_paths(count: int, first: int = 0) -> list[str]:
    """Paths shaped like a camera archive: 1000 folders, numbered files."""
    return [f"/archive/site-{number % 1000:03d}/{number:010d}.jpg" for number in range(first, first + count)]


def every_path(count: int) -> Iterator[str]:
    """made_up_paths(count), WRITE_ROWS at a time: 10^8 names held at once would take 10 GB."""
    for first in range(0, count, WRITE_ROWS):
        yield from made_up_paths(min(WRITE_ROWS, count - first), first)


def write_manifest(paths: Iterable[str], target: Path) -> Path:
    manifest.write((manifest.Found(path, 150_000, 0) for path in paths), str(target))
    return target


def write_results(output: Path, paths: Sequence[str], buckets: range, first_chunk: int = 0,
                  failed: Collection[int] = ()) -> None:  # fmt: skip
    """Committed parts holding a row for each path, as a task of `buckets` running MODEL writes them,
    without classifying anything; the rows of the FAILED positions say `io error`."""
    output.mkdir(parents=True, exist_ok=True)
    spec = models.resolve(*MODEL[1:4:2])
    rows = RowBuilder(spec.labels, TOPK, embeddings=False)
    record = {"identity": identity(spec, TOPK, embeddings=False, precision="fp32")}  # MODEL's, on the CPU
    for chunk, start in enumerate(range(0, len(paths), WRITE_ROWS), first_chunk):
        some = paths[start : start + WRITE_ROWS]
        decoded = [Decoded(index, error=FAILURE) if start + index in failed else Decoded(index, width=640, height=480)
                   for index in range(len(some))]  # fmt: skip
        good = sum(item.error is None for item in decoded)
        ids = np.tile(np.arange(TOPK, dtype=np.int32), (good, 1))
        answers = Predictions(ids, np.full((good, TOPK), 0.2, np.float32), None)
        name = f"part-{buckets.start:05d}-{buckets.stop:05d}-c{chunk:06d}.parquet"
        writer = ChunkWriter(str(output / name), rows.schema, record)
        writer.add(rows.build(some, decoded, answers))
        writer.close()


PEAK = """import resource, subprocess, sys
status = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=open(sys.argv[1], "w")).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(status)"""  # a small parent, so the peak is the command's own and not a copy of ours


def measure(name: str, command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Seconds and peak MB (the largest process of its tree) of one whole command; summary may exit 1."""
    with tempfile.NamedTemporaryFile("r") as log:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", PEAK, log.name, *command], capture_output=True, text=True,
                                env={**os.environ, **(env or {})})  # fmt: skip
        seconds = time.perf_counter() - started
        if result.returncode not in (0, 1):
            raise SystemExit(f"{name} failed:\n{log.read()[-3000:]}")
    peak = int(result.stdout) / 1024
    print(f"  {name:<52} {seconds:7.2f} s  {peak:7.0f} MB peak", flush=True)
    return seconds, peak


def batch(*arguments: str | Path | int) -> list[str]:
    return [sys.executable, "-m", "batch", *map(str, arguments)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--per-task", type=int, default=10_000)
    parser.add_argument("--tree", type=int, default=1_000_000, help="files in the tree to index (0: skip)")
    parser.add_argument("--list", type=int, default=10_000_000, help="names in the list to index (0: skip)")
    parser.add_argument("--tars", type=int, default=0, help="tars of MEMBERS images to index (0: skip)")
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--folder", help="scratch folder (default: a temporary one, deleted afterwards)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batch-scale-", dir=options.folder) as scratch:
        if options.rows:
            run(Path(scratch), options.rows, options.per_task)
        if options.tree:
            index_tree(Path(scratch) / "tree", options.tree)
        if options.list:
            index_list(Path(scratch), options.list)
        if options.tars:
            index_tars(Path(scratch) / "tars", options.tars, options.members)


def index_tree(tree: Path, files: int) -> None:
    """Empty files are enough: indexing lists and stats, it never reads."""
    started = time.perf_counter()
    for folder in range(1000):
        (tree / f"{folder // 100:02d}" / f"{folder:04d}").mkdir(parents=True)
    for number in range(files):
        os.close(os.open(tree / f"{number % 1000 // 100:02d}" / f"{number % 1000:04d}" / f"{number:08d}.jpg", os.O_CREAT))
    print(f"indexing a tree of {files} files in 1000 folders (made in {time.perf_counter() - started:.0f} s), page cache warm:")
    for threads in (1, 32):
        measure(f"batch index --threads {threads}", batch("index", tree, "-o", tree.parent / "tree.parquet", "--threads", threads))


def index_list(folder: Path, lines: int) -> None:
    """Nothing is there, so each name's stat fails at once: what is timed is the index's own work."""
    listing = folder / "names.txt"
    with open(listing, "w", encoding="utf-8") as handle:
        handle.writelines(f"{path}\n" for path in every_path(lines))
    print(f"indexing a list of {lines} made-up names:")
    measure("batch index @list", batch("index", f"@{listing}", "-o", folder / "listed.parquet"))


def index_tars(folder: Path, tars: int, members: int) -> None:
    """Shards as WebDataset writes them: a small image and its `.json` a sample, 2 KB of tar in all."""
    started = time.perf_counter()
    folder.mkdir()
    for shard in range(tars):
        with tarfile.open(folder / f"shard-{shard:06d}.tar", "w") as tar:
            for number in range(shard * members, (shard + 1) * members):
                for name, data in ((f"{number:010d}.jpg", b"\xff\xd8\xff"), (f"{number:010d}.json", b'{"url": null}')):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
    print(f"indexing {tars} tars of {members} images (made in {time.perf_counter() - started:.0f} s), page cache warm:")
    for cpus in sorted({1, os.cpu_count() or 1}):
        measure(f"batch index, listed by {cpus} processes", batch("index", folder, "-o", folder.parent / "tars.parquet"),
                env={"SLURM_CPUS_PER_TASK": str(cpus)})  # fmt: skip


def run(folder: Path, rows: int, per_task: int) -> None:
    tasks = max(1, rows // per_task)
    print(f"{rows} inputs, {per_task} a task: an array of {tasks}; {os.cpu_count()} CPUs")
    started = time.perf_counter()
    big = write_manifest(every_path(rows), folder / "big.parquet")
    small = write_manifest(every_path(per_task), folder / "small.parquet")
    print(f"  made the manifests in {time.perf_counter() - started:.0f} s ({big.stat().st_size / 1e6:.0f} MB)")

    print("one array task, start to exit (fresh output):")
    measure("batch --version (the interpreter alone)", batch("--version"))
    measure(f"shard 0 of 1 over {per_task} rows", batch("classify", small, "-o", folder / "out-small", *MODEL))
    shard = ["--num-shards", str(tasks), "--shard-index", "0"]
    measure(f"shard 0 of {tasks} over {rows} rows", batch("classify", big, "-o", folder / "out-big", *MODEL, *shard))

    started = time.perf_counter()
    full = folder / "full"
    write_every_row(big, full, tasks)
    print(f"  wrote {rows} result rows in {time.perf_counter() - started:.0f} s")
    print(f"the same task over an output of {rows} rows:")
    measure("rerun: nothing to do", batch("classify", big, "-o", full, *MODEL, *shard))
    mine = Shard(0, tasks).buckets
    for part in full.glob(f"part-{mine.start:05d}-{mine.stop:05d}-*.parquet"):
        part.unlink()
    measure("its share missing: classifies it", batch("classify", big, "-o", full, *MODEL, *shard))
    print(f"the whole output against the {rows}-row manifest:")
    measure("batch summary --manifest", batch("summary", full, "--manifest", big))
    measure("batch pending", batch("pending", big, full, "-o", folder / "todo.parquet"))
    measure("batch report", batch("report", full, "-o", folder / "report.html"))


def write_every_row(big: Path, output: Path, tasks: int) -> None:
    """A row for every input of the manifest BIG, as each task of an array of TASKS would have written
    them, one task's share at a time (the manifest is sorted by bucket, so the tasks come in order)."""
    starts = np.array([Shard(index, tasks).buckets.start for index in range(tasks)])
    task, held = 0, []
    for rows in pq.ParquetFile(big).iter_batches(batch_size=WRITE_ROWS, columns=["path", "bucket"]):
        paths, owners = rows.column("path").to_pylist(), np.searchsorted(starts, rows.column("bucket").to_numpy(), "right") - 1
        for path, owner in zip(paths, owners.tolist()):
            if owner != task:
                write_results(output, held, Shard(task, tasks).buckets)
                task, held = owner, []
            held.append(path)
    write_results(output, held, Shard(task, tasks).buckets)


if __name__ == "__main__":
    main()
