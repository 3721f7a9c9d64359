"""The same pictures as files, packed in WebDataset tars and in img2dataset Parquet files: `batch classify`'s
images/s from each, as whole processes.

Packing exists for parallel file systems, where each small file costs a metadata round trip; on a local
disk the three should be close, and this measures what reading members costs on top of reading files:
listing tar headers, one `pread` per member, decoding Parquet row groups.

Run from the repository root, as `python -m benchmarks.tar_vs_files [COUNT] [--width W] [--per-container N]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow.parquet as pq

from benchmarks import pictures
from benchmarks.compare import seconds_of
from benchmarks.packing import Sample, write_parquet, write_tar

UNTRAINED = ("--model", "mobilenet_v3_small", "--weights", "none")


def pack(paths: Sequence[str], folder: Path, per_container: int) -> dict[str, Path]:
    """The pictures as files (the folder they are in), as tars and as Parquet files of `per_container` each."""
    samples = [Sample(f"{number:09d}", Path(path).read_bytes(), f"https://example.org/{number}.jpg")
               for number, path in enumerate(paths)]  # fmt: skip
    for first in range(0, len(samples), per_container):
        some = samples[first : first + per_container]
        write_tar(folder / "tars" / f"{first // per_container:05d}.tar", some)
        write_parquet(folder / "parquet" / f"{first // per_container:05d}.parquet", some, row_group_rows=256)
    parquets = folder / "parquet.txt"
    parquets.write_text("".join(f"{path}\n" for path in sorted((folder / "parquet").iterdir())))
    return {"files": Path(paths[0]).parent, "tars": folder / "tars", "parquet": Path(f"@{parquets}")}


def run(count: int, width: int, per_container: int, workers: int, repeat: int) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="benchmarks-tar-") as scratch:
        folder = Path(scratch)
        paths = pictures.generate(folder / "files", count, (width, width), [str(path) for path in Path("tests/data/photos").glob("*.jpg")])
        sources = pack(paths, folder, per_container)
        megabytes = sum(os.path.getsize(path) for path in paths) / 1e6
        yield (f"tar_vs_files: {count} JPEGs {width} px wide ({megabytes:.0f} MB), {per_container} per tar or Parquet "
               f"file; batch classify {' '.join(UNTRAINED)} --workers {workers}, best of {repeat}, whole processes")  # fmt: skip
        for name, source in sources.items():
            best = min(_classify(source, folder / f"out-{name}-{attempt}", workers, count) for attempt in range(repeat))
            yield f"  {name:<8} {best:>7.2f} s {count / best:>8.1f} images/s"


def _classify(source: Path, output: Path, workers: int, count: int) -> float:
    """Seconds of one whole `batch classify`, which must have written a row for every picture."""
    seconds = seconds_of([sys.executable, "-m", "batch", "classify", str(source), "-o", str(output), *UNTRAINED,
                          "--workers", str(workers)])  # fmt: skip
    rows = sum(pq.read_metadata(part).num_rows for part in output.glob("*.parquet"))
    if rows != count:
        raise RuntimeError(f"batch classify {source} wrote {rows} rows, not {count}")
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    described = argparse.ArgumentParser(prog="python -m benchmarks.tar_vs_files", description=__doc__.splitlines()[0])
    described.add_argument("count", nargs="?", type=int, default=2000, help="pictures (default 2000)")
    described.add_argument("--width", type=int, default=500, help="ImageNet-sized by default: 500x375")
    described.add_argument("--per-container", type=int, default=1000, help="pictures per tar and per Parquet file")
    described.add_argument("--workers", type=int, default=2, help="decoding processes for batch classify")
    described.add_argument("--repeat", type=int, default=2, help="runs of each, the best kept")
    arguments = described.parse_args(argv)
    for line in run(arguments.count, arguments.width, arguments.per_container, arguments.workers, arguments.repeat):
        print(line, flush=True)


if __name__ == "__main__":
    main()
