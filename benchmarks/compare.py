"""Whole processes side by side: the peers in `peers.py` and `batch classify`, from start to Parquet written.

Each runs on all the files and on the first alone: the difference splits its time into start-up and
the rate after it, which tasks with many more files approach. All run on one device in one precision.
`--agreement` checks that batch's top-1 classes are the naive peer's, whose preprocessing is the
model's reference (`reference.py`), on the CPU in fp32; `benchmarks.agreement` checks other devices.
`--decode cpu gpu` times `batch classify` once for each place it decodes JPEGs.

Run from the repository root, as `python -m benchmarks.compare SOURCE... [--model M --weights W] [--agreement]`
(see `python -m benchmarks.compare --help`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow.parquet as pq

from batch import models
from batch.bench import BenchOptions, collect_inputs, decodable, left_out, write_file_list
from batch.devices import choose_device, choose_precision
from batch.environment import JobEnvironment
from batch.weights import DEFAULT_WEIGHTS
from benchmarks import peers

MIN_SECONDS_PAST_STARTUP = 0.5  # of the start-up time: below that, its variation swamps the rest
CLASSIFY = "batch classify"
PEER = " (peer)"


@dataclass(frozen=True)
class ProcessTime:
    """One command's whole-process time on all the files, and on one file: its start-up."""

    name: str
    items: int
    seconds: float
    startup: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    @property
    def rate_after_startup(self) -> float | None:
        """What a task with many more files approaches: the files after the first over their seconds;
        None when those seconds are too few to tell from the start-up's own variation."""
        rest = self.seconds - self.startup
        return (self.items - 1) / rest if rest >= MIN_SECONDS_PAST_STARTUP * self.startup else None

    def line(self) -> str:
        after = self.rate_after_startup
        then = f"then {after:.1f} images/s" if after else "too few files to time the rest"
        return f"  {self.name:<30} {self.seconds:>7.2f} s {self.rate:>9.1f} images/s  start-up {self.startup:.2f} s, {then}"


Command = Callable[[Path, str], list[str]]  # a file list and a tag for its output -> the command line


def contenders(options: BenchOptions, folder: Path, decodes: Sequence[str] = ("cpu",)) -> dict[str, Command]:
    """The peers, then `batch classify` with the options given for it, once for each of `decodes`; the
    device and precision are the same for all (as `batch classify` resolves them)."""
    model = ["--model", options.model, "--weights", options.weights]
    where = ["--device", options.device, "--precision", options.precision]
    named = {"--batch-size": options.batch_size, "--workers": options.workers}
    passed_on = [*where, *(part for option, value in named.items() if value is not None for part in (option, str(value)))]

    def peer(name: str) -> Command:
        return lambda files, tag: [
            sys.executable, "-m", "benchmarks.peers", name, str(files), "-o", str(peer_output(folder, name, tag)), *model,
            *where,
        ]  # fmt: skip

    def classify(decode: str) -> Command:
        return lambda files, tag: [
            sys.executable, "-m", "batch", "classify", f"@{files}", "-o", str(classify_output(folder, decode, tag)),
            *model, *passed_on, "--decode", decode,
        ]  # fmt: skip

    return {**{f"{name}{PEER}": peer(name) for name in peers.PEERS},
            **{classify_name(decode): classify(decode) for decode in decodes}}  # fmt: skip


def classify_name(decode: str) -> str:
    return CLASSIFY if decode == "cpu" else f"{CLASSIFY} --decode {decode}"


def classify_output(folder: Path, decode: str, tag: str) -> Path:
    return folder / f"classify-{decode}-{tag}"


def peer_output(folder: Path, name: str, tag: str) -> Path:
    return folder / f"{name}-{tag}.parquet"


def time_processes(paths: Sequence[str], options: BenchOptions, folder: Path, peer_files: int | None = None,
                   decodes: Sequence[str] = ("cpu",)) -> list[ProcessTime]:  # fmt: skip
    """Each contender as its own process, timed from start to its Parquet written, on the first file
    alone and then on all of them (the peers on the first `peer_files`, where given: the naive loop
    decodes on one core). They run in this process's environment: the user's."""
    first_file = write_file_list(paths[:1], folder / "first-file.txt")
    list_file = write_file_list(paths, folder / "files.txt")
    peer_list = write_file_list(paths[:peer_files], folder / "peer-files.txt") if peer_files else list_file
    times = []
    for name, command in contenders(options, folder, decodes).items():
        ours = not name.endswith(PEER)
        files, count = (list_file, len(paths)) if ours else (peer_list, len(paths[:peer_files or None]))
        startup = seconds_of(command(first_file, "first"))
        times.append(ProcessTime(name, count, seconds_of(command(files, "all")), startup))
    return times


def seconds_of(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def top1_agreement(ours: Path, reference: Path) -> tuple[int, int]:
    """How many of batch's top-1 classes the reference (the naive peer) also gives; of how many files
    both classified."""
    expected = {row["path"]: row["topk_ids"][0] for row in pq.read_table(reference, columns=["path", "topk_ids"]).to_pylist()}
    rows = [row for row in pq.read_table(ours, columns=["path", "topk_ids", "error"]).to_pylist()
            if row["error"] is None and row["path"] in expected]  # fmt: skip
    return sum(row["topk_ids"][0] == expected[row["path"]] for row in rows), len(rows)


def run(given: Sequence[str], options: BenchOptions, agreement: bool, peer_files: int | None = None,
        decodes: Sequence[str] = ("cpu",)) -> Iterator[str]:  # fmt: skip
    """The report, line by line, as each measurement finishes."""
    spec = models.resolve(options.model, options.weights)
    device = choose_device(options.device, JobEnvironment())
    options = replace(options, device=str(device), precision=choose_precision(options.precision, device))
    if agreement and spec.untrained:
        raise ValueError("--agreement needs trained weights: untrained answers agree by chance only")
    if agreement and (options.device, options.precision) != ("cpu", "fp32"):
        raise ValueError("--agreement is with the naive loop on the CPU in fp32: use python -m benchmarks.agreement")
    paths, failed = decodable(collect_inputs(given), spec.preprocess)  # the peers stop at the first bad file
    yield (f"compare: {len(paths)} images from {', '.join(given)}; {spec.name} ({spec.weights}) on {options.device}, "
           f"{options.precision}, {JobEnvironment().cpus()} CPUs")  # fmt: skip
    if failed:
        yield f"  left out: {left_out(failed, len(paths) + len(failed))}"
    with tempfile.TemporaryDirectory(prefix="benchmarks-compare-") as scratch:
        folder = Path(scratch)
        yield "whole processes, start to Parquet written (start-up: the same command on the first file alone):"
        times = time_processes(paths, options, folder, peer_files, decodes)
        for measure in times:
            yield measure.line()
        others = [measure for measure in times if measure.name.endswith(PEER)]
        best = max(others, key=lambda measure: measure.rate_after_startup or measure.rate)
        for ours in times[len(others) :]:
            if not peer_files:  # else the whole-process rates are of different counts, start-up amortised unlike
                yield f"  {ours.name} is {ours.rate / best.rate:.2f}x the better peer ({best.name})"
            if ours.rate_after_startup and best.rate_after_startup:
                after = ours.rate_after_startup / best.rate_after_startup
                yield f"  after start-up {after:.2f}x: the ratio that tasks with many more files approach"
        for decode in decodes if agreement else ():
            same, total = top1_agreement(classify_output(folder, decode, "all"), peer_output(folder, "naive", "all"))
            yield (f"top-1 agreement{'' if decode == 'cpu' else f' of --decode {decode}'} with the reference "
                   f"preprocessing: {same} of {total} ({100 * same / max(total, 1):.2f}%)")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    described = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    described.add_argument("sources", nargs="+", help="folders, image files, @lists or manifests, as for batch classify")
    described.add_argument("--model", default=models.DEFAULT_MODEL)
    described.add_argument("--weights", default=DEFAULT_WEIGHTS)
    described.add_argument("--device", default="auto", help="for all, as batch classify resolves it")
    described.add_argument("--precision", default="auto", help="for all, as batch classify resolves it")
    described.add_argument("--batch-size", type=int, help="for batch classify; the peers take 64")
    described.add_argument("--workers", type=int, help="for batch classify; the DataLoader peer takes one per CPU")
    described.add_argument("--peer-files", type=int, help="the peers classify only the first N files (rates compare)")
    described.add_argument("--agreement", action="store_true", help="also check batch's top-1 against the naive peer's")
    described.add_argument("--decode", nargs="+", default=["cpu"], choices=["cpu", "gpu"],
                           help="batch classify once for each: where it decodes JPEGs")  # fmt: skip
    arguments = described.parse_args(argv)
    options = BenchOptions(
        model=arguments.model, weights=arguments.weights, device=arguments.device, precision=arguments.precision,
        batch_size=arguments.batch_size, workers=arguments.workers,
    )  # fmt: skip
    try:
        for line in run(arguments.sources, options, arguments.agreement, arguments.peer_files, arguments.decode):
            print(line, flush=True)
    except ValueError as error:
        described.error(str(error))


if __name__ == "__main__":
    main()
