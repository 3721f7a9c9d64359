"""What `batch classify --retry-failed` costs: the parts holding failed rows are rewritten whole.

Usage: python -m benchmarks.retry_cost [--rows 1000000] [--failed 500] [--folder DIR]

One task's output of ROWS made-up inputs in parts of 10,000 rows, FAILED of its rows `io error`, spread
evenly (the worst case: every part holds some). The redone inputs do not exist, so each gets its
`not found` row at once, and what is timed is the bookkeeping and the rewriting. Against it: the same
task's rerun with nothing to do, and the bytes of the parts rewritten against the output's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from batch.paths import BUCKETS
from benchmarks.scale import MODEL, batch, made_up_paths, measure, write_manifest, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--failed", type=int, default=500)
    parser.add_argument("--folder", help="scratch folder (default: a temporary one, deleted afterwards)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batch-retry-", dir=options.folder) as scratch:
        run(Path(scratch), options.rows, options.failed)


def run(folder: Path, rows: int, failed: int) -> None:
    started = time.perf_counter()
    paths = made_up_paths(rows)
    manifest = write_manifest(paths, folder / "all.parquet")
    output = folder / "out"
    write_results(output, paths, range(BUCKETS), failed=set(range(0, rows, rows // failed)))
    print(f"{rows} rows in parts of 10000, {failed} of them failed (made in {time.perf_counter() - started:.0f} s):")
    measure("rerun, nothing to do", batch("classify", manifest, "-o", output, *MODEL))
    measure(f"--retry-failed, {failed} inputs redone", batch("classify", manifest, "-o", output, *MODEL, "--retry-failed"))
    parts = sorted(output.glob("part-*.parquet"))
    rewritten = [part for part in parts if "retried" in json.loads(pq.read_metadata(part).metadata[b"batch"])]
    size = sum(part.stat().st_size for part in parts) / 1e6
    print(f"  rewritten: {len(rewritten)} of {len(parts)} parts, "
          f"{sum(part.stat().st_size for part in rewritten) / 1e6:.1f} of {size:.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
