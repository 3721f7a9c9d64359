"""What thumbnails of tar and Parquet members cost `batch report`: listing the containers they lie in.

Usage: python -m benchmarks.report_members [--containers 72] [--members 2000] [--folder DIR]

Every row of the made-up output (`report_scale.write_output`) is a member of one of CONTAINERS tars
of MEMBERS samples each (a small JPEG beside its `.json` and `.txt`, as img2dataset writes them), so
the 72 sampled rows lie in up to 72 tars, each listed once for them, header by header. Then the same
with img2dataset Parquet files (row groups of 1000), where listing reads the `key` column and each
thumbnail a row group's images. Against the same output with paths that do not exist (placeholders,
nothing listed), that is the cost of showing members. `batch report` runs as the real CLI.
"""

from __future__ import annotations

import argparse
import io
import re
import tempfile
from pathlib import Path
from typing import Callable

from PIL import Image

from benchmarks.packing import Sample, write_parquet, write_tar
from benchmarks.report_scale import write_output
from benchmarks.scale import batch, made_up_paths, measure
from tests.images import PHOTOS


def report(scratch: Path, name: str, rows: int, paths: Callable[[int, int], list[str]]) -> None:
    output, page = scratch / f"out-{name}", scratch / f"report-{name}.html"
    write_output(output, rows, paths)
    measure(f"batch report, {name}", batch("report", output, "-o", page))
    markup = page.read_text()
    cards = re.findall(r"<span class=path>([^<]*)</span></figcaption>", markup)
    containers = {path.rsplit("/", 1)[0] for path in cards if re.search(r"\.(tar|parquet)/", path)}
    print(f"    {markup.count('<img ')} thumbnails and {markup.count('class=placeholder>')} placeholders, "
          f"from {len(containers)} containers; page {len(markup) / 1e6:.2f} MB")  # fmt: skip


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=72)
    parser.add_argument("--members", type=int, default=2000, help="samples per container")
    parser.add_argument("--folder", help="scratch folder (default: a temporary one, deleted afterwards)")
    options = parser.parse_args(arguments)
    count, size = options.containers, options.members
    picture = io.BytesIO()
    Image.open(PHOTOS / "chelsea.jpg").resize((64, 48)).save(picture, "JPEG")
    with tempfile.TemporaryDirectory(prefix="batch-report-members-", dir=options.folder) as scratch:
        folder = Path(scratch)
        print(f"{count * size:,} rows, in {count} containers of {size:,} samples each:")
        report(folder, "no such files", count * size, made_up_paths)
        for kind, write in (("tar", write_tar), ("parquet", write_parquet)):
            names = [folder / f"{kind}s" / f"{number:06d}.{kind}" for number in range(count)]
            for number, name in enumerate(names):
                write(name, [Sample(f"{number * size + row:09d}", picture.getvalue(), f"https://example.org/{row}") for row in range(size)])
            report(folder, f"{kind}s", count * size,
                   lambda rows, first: [f"{names[n // size]}/{n:09d}.jpg" for n in range(first, first + rows)])  # fmt: skip


if __name__ == "__main__":
    main()
