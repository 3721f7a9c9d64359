"""What `batch report` costs as outputs grow: seconds, peak memory and the page's size.

Usage: python -m benchmarks.report_scale [--rows 1000000 10000000] [--folder DIR]

Each output is made up, written as an array of tasks would commit it (parts of PART_ROWS rows, each
with the metadata record of a real `classify` plan, a host and a Slurm task of its own): labels drawn
from the model's 1000 with a long tail, scores spread over 0 to 1, and ERROR_SHARE of the rows errors
of four kinds. The paths do not exist, so every thumbnail is a placeholder; what is timed is the
queries and the page, the part that grows with the output (tests/test_report.py bounds the page with
real pictures). `batch report` runs as the real CLI in its own process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from batch.commit import part_name
from batch.decode import Decoded
from batch.environment import JobEnvironment, Shard
from batch.inference import Predictions
from batch.plan import ClassifyOptions, plan
from batch.writer import ChunkWriter, RowBuilder
from benchmarks.scale import MODEL, TOPK, batch, made_up_paths, measure

PART_ROWS = 100_000
HOSTS = 16
ERROR_SHARE = 0.01
ERRORS = ("not found: the file no longer exists", "truncated: image file is truncated (12 bytes not processed)",
          "not an image: the file is text", "decoder crashed: killed by SIGSEGV")  # fmt: skip


def write_output(output: Path, rows: int, paths: Callable[[int, int], Sequence[str]] = made_up_paths, seed: int = 0) -> None:
    """ROWS made-up rows in OUTPUT, as the tasks of an array commit them; `paths(count, first)` names
    `count` rows from row `first` on."""
    output.mkdir(parents=True, exist_ok=True)
    run = plan(ClassifyOptions(sources=(str(output),), output=str(output), model=MODEL[1], weights=MODEL[3],
                               device="cpu", topk=TOPK),
               JobEnvironment({"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4242"}))  # fmt: skip
    builder = RowBuilder(run.spec.labels, TOPK, embeddings=False)
    random = np.random.default_rng(seed)
    tasks = -(-rows // PART_ROWS)
    for task, start in enumerate(range(0, rows, PART_ROWS)):
        stop = min(start + PART_ROWS, rows)
        shard = Shard(task, tasks)
        provenance = {**run.provenance(), "host": f"node{task % HOSTS:02d}", "slurm_array_task_id": str(task),
                      "shard": {"index": task, "count": tasks, "buckets": [shard.buckets.start, shard.buckets.stop]}}  # fmt: skip
        failed = random.random(stop - start) < ERROR_SHARE
        decoded = [Decoded(index, width=640, height=480) if not bad else Decoded(index, error=ERRORS[index % len(ERRORS)])
                   for index, bad in enumerate(failed)]  # fmt: skip
        writer = ChunkWriter(str(output / part_name(shard.buckets, 0)), builder.schema,
                             {"identity": run.output.identity, "provenance": provenance})  # fmt: skip
        writer.add(builder.build(paths(stop - start, start), decoded, _answers(random, int((~failed).sum()), len(builder.labels))))
        writer.close()


def _answers(random: np.random.Generator, count: int, classes: int) -> Predictions:
    """Top-k answers whose first label follows a long tail (Zipf) and whose scores fall from 0-1."""
    first = (random.zipf(1.3, count) - 1) % classes
    ids = (first[:, None] + np.arange(TOPK) * 7) % classes
    scores = np.sort(random.random((count, TOPK)), axis=1)[:, ::-1]
    return Predictions(ids.astype(np.int32), scores.astype(np.float32), None)


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--folder", help="scratch folder (default: a temporary one, deleted afterwards)")
    options = parser.parse_args(arguments)
    with tempfile.TemporaryDirectory(prefix="batch-report-scale-", dir=options.folder) as scratch:
        for rows in options.rows:
            output, page = Path(scratch) / f"out-{rows}", Path(scratch) / f"report-{rows}.html"
            write_output(output, rows)
            print(f"{rows} rows in {-(-rows // PART_ROWS)} parts:")
            measure("batch report", batch("report", output, "-o", page))
            print(f"  page: {page.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
