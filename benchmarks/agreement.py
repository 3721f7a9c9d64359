"""Top-1 agreement of `batch classify` on a device, in each precision (and with each place it decodes
JPEGs), with the reference: the naive loop of `peers.py` on the CPU in fp32 (a full decode, the
reference transforms, the network as built).

Run from the repository root, as `python -m benchmarks.agreement SOURCE... --device cuda --precision bf16 fp16 fp32
[--decode cpu gpu] [--model M --weights W]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from batch import models
from batch.bench import collect_inputs, decodable, left_out, write_file_list
from batch.devices import PRECISIONS
from batch.weights import DEFAULT_WEIGHTS
from benchmarks.compare import seconds_of, top1_agreement

GOAL = 0.99


def run(given: Sequence[str], model: str, weights: str, device: str, precisions: Sequence[str],
        decodes: Sequence[str] = ("cpu",)) -> Iterator[str]:  # fmt: skip
    """The report, line by line: the reference's time, then each precision's (and decoder's) agreement with it."""
    spec = models.resolve(model, weights)
    if spec.untrained:
        raise ValueError("agreement needs trained weights: untrained answers agree by chance only")
    paths, failed = decodable(collect_inputs(given), spec.preprocess)  # the naive loop stops at the first bad file
    yield f"agreement: {len(paths)} images from {', '.join(given)}; {spec.name} ({spec.weights}) on {device}"
    if failed:
        yield f"  left out: {left_out(failed, len(paths) + len(failed))}"
    with tempfile.TemporaryDirectory(prefix="benchmarks-agreement-") as scratch:
        folder = Path(scratch)
        files = write_file_list(paths, folder / "files.txt")
        reference = folder / "reference.parquet"
        model_options = ["--model", model, "--weights", weights]
        seconds = seconds_of([sys.executable, "-m", "benchmarks.peers", "naive", str(files), "-o", str(reference),
                              *model_options, "--device", "cpu", "--precision", "fp32"])  # fmt: skip
        yield f"  reference (naive loop, cpu, fp32): {seconds:.1f} s"
        for precision in precisions:
            for decode in decodes:
                output = folder / f"{precision}-{decode}"
                seconds = seconds_of([sys.executable, "-m", "batch", "classify", f"@{files}", "-o", str(output),
                                      *model_options, "--device", device, "--precision", precision, "--decode", decode])  # fmt: skip
                same, total = top1_agreement(output, reference)
                share = same / max(total, 1)
                verdict = "met" if share >= GOAL else "NOT MET"
                name = precision if decode == "cpu" else f"{precision}, --decode {decode}"
                yield (f"  {name}: top-1 {same} of {total} ({100 * share:.2f}%; goal {100 * GOAL:.0f}%: {verdict}), "
                       f"batch classify {seconds:.1f} s")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    described = argparse.ArgumentParser(prog="python -m benchmarks.agreement", description=__doc__.splitlines()[0])
    described.add_argument("sources", nargs="+", help="folders, image files, @lists or manifests, as for batch classify")
    described.add_argument("--model", default=models.DEFAULT_MODEL)
    described.add_argument("--weights", default=DEFAULT_WEIGHTS)
    described.add_argument("--device", default="cuda", help="where batch classify runs")
    described.add_argument("--precision", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(PRECISIONS))
    described.add_argument("--decode", nargs="+", default=["cpu"], choices=["cpu", "gpu"],
                           help="batch classify once for each: where it decodes JPEGs")  # fmt: skip
    arguments = described.parse_args(argv)
    try:
        for line in run(arguments.sources, arguments.model, arguments.weights, arguments.device, arguments.precision,
                        arguments.decode):  # fmt: skip
            print(line, flush=True)
    except ValueError as error:
        described.error(str(error))


if __name__ == "__main__":
    main()
