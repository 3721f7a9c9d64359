"""`batch classify` of a timm model folder against timm's own `inference.py` on the same pictures.

The model is a timm architecture saved by timm's `save_for_hf`, randomly initialised, its head re-centred on
the pictures' own features so that top-1 is spread over the classes and sensitive to preprocessing (a
random head gives every picture the same class, and any two pipelines would agree). timm's script is not
in timm's wheel: pass the `inference.py` of the timm release installed (it needs pandas). Both run on the
CPU in fp32, as whole processes, each at the batch sizes given; the best of each is compared.

Run from the repository root, as
`python -m benchmarks.timm_peer PICTURES --inference path/to/inference.py [--model resnet18] [--batch-sizes 32,64]`.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq
import torch
from PIL import Image


def save_model(architecture: str, pictures: list[Path], folder: Path) -> None:
    """A timm folder whose head tells these pictures apart: class i points along picture i's centred features."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import save_for_hf

    torch.manual_seed(0)
    network = timm.create_model(architecture, num_classes=1000).eval()
    transform = create_transform(**resolve_data_config(model=network))
    sample = pictures[: network.num_classes]
    with torch.no_grad():
        features = torch.cat([
            network.forward_head(network.forward_features(
                torch.stack([transform(Image.open(path).convert("RGB")) for path in sample[start:start + 64]])),
                pre_logits=True)
            for start in range(0, len(sample), 64)
        ])  # fmt: skip
        centred = features - features.mean(0)
        directions = centred / centred.norm(dim=1, keepdim=True)
        head = network.get_classifier()
        head.weight.zero_()[: len(sample)] = directions * 10 / centred.norm(dim=1).mean()
        head.bias.copy_(-head.weight @ features.mean(0))
    save_for_hf(network, folder, model_config={"label_names": [f"class_{i}" for i in range(1000)]},
                safe_serialization=True)  # fmt: skip


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def timm_run(inference: str, pictures: Path, model: Path, batch_size: int, workers: int, results: Path) -> float:
    return timed([sys.executable, inference, str(pictures), "--model", f"local-dir:{model}", "--device", "cpu",
                  "-b", str(batch_size), "-j", str(workers), "--topk", "1", "--label-type", "name",
                  "--results-dir", str(results), "--results-file", "timm", "--no-console-results"])  # fmt: skip


def batch_run(pictures: Path, model: Path, batch_size: int, output: Path) -> float:
    return timed([sys.executable, "-m", "batch", "classify", str(pictures), "-o", str(output), "--model", str(model),
                  "--device", "cpu", "--batch-size", str(batch_size), "--topk", "1", "--overwrite"])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.timm_peer", description=__doc__.splitlines()[0])
    parser.add_argument("pictures", type=Path, help="a folder of JPEGs (benchmarks.pictures writes them)")
    parser.add_argument("--inference", required=True, help="timm's inference.py, of the installed timm's release")
    parser.add_argument("--model", default="resnet18", help="a timm architecture (default resnet18)")
    parser.add_argument("--batch-sizes", default="32,64,128", help="tried for each (default 32,64,128)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="timm's -j (default: CPUs)")
    args = parser.parse_args(argv)
    pictures = sorted(path for path in args.pictures.iterdir() if path.suffix.lower() in (".jpg", ".jpeg"))
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "model"
        save_model(args.model, pictures, model)
        timm_runs = {size: timm_run(args.inference, args.pictures, model, size, args.workers, Path(scratch)) for size in sizes}
        batch_runs = {size: batch_run(args.pictures, model, size, Path(scratch) / "out") for size in sizes}
        with open(Path(scratch) / "timm.csv", newline="") as handle:
            theirs = {row["filename"]: row["label"] for row in csv.DictReader(handle)}
        ours = {os.path.basename(path): label for path, label in
                zip(*pq.read_table(Path(scratch) / "out", columns=["path", "label"]).to_pydict().values())}  # fmt: skip
    agree = sum(ours.get(name) == label for name, label in theirs.items())
    print(f"{len(pictures)} pictures, timm {args.model}, CPU fp32, {len(os.sched_getaffinity(0))} CPUs; whole processes")
    for name, runs in (("timm inference.py", timm_runs), ("batch classify", batch_runs)):
        for size, seconds in runs.items():
            print(f"  {name:18} batch {size:4}: {seconds:7.2f} s, {len(pictures) / seconds:6.1f} images/s")
    best_timm, best_batch = min(timm_runs.values()), min(batch_runs.values())
    print(f"batch classify at its best is {best_timm / best_batch:.2f}x timm's inference.py at its best")
    print(f"top-1 agreement: {agree} of {len(theirs)} ({100 * agree / len(theirs):.1f}%), {len(set(theirs.values()))} classes seen")


if __name__ == "__main__":
    main()
