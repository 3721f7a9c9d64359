"""The programs `batch classify` is measured against, written as their authors would write them.

- `naive`: the tutorial loop. PIL opens each file, the model's reference transforms run in the main
  process, and the model takes batches of 64.
- `dataloader`: what a competent PyTorch user writes (the shape of timm's inference.py). A Dataset
  over the file list runs the same transforms in DataLoader worker processes, one per usable CPU,
  into pinned memory on a GPU. The model takes batches of 64 in channels_last.
Both run on `--device` (the CPU by default), under autocast when `--precision` is bf16 or fp16, as
timm's `--amp` does.

Both write the top-5 classes to one Parquet file, so that all three are timed from process start to
the same kind of result. The naive loop's answers on the CPU are the reference that `--agreement`
checks batch's against: a full decode, the reference transforms, fp32, the network as built.

Run one as `python -m benchmarks.peers naive|dataloader --model M --weights W [--device D --precision P]
-o OUT.parquet FILE_LIST`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from batch import models
from batch.devices import PRECISIONS
from batch.weights import DEFAULT_WEIGHTS
from benchmarks.reference import Transform, open_rgb, reference_transform

PEER_BATCH_SIZE = 64
PEER_TOPK = 5


@dataclass(frozen=True)
class Where:
    """The device the network runs on, and the autocast precision (fp32: none)."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    def logits(self, network: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        if self.precision == "fp32":
            return network(batch)
        with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision]):
            return network(batch).float()


def naive(paths: Sequence[str], network: torch.nn.Module, transform: Transform, where: Where) -> torch.Tensor:
    """Top-k class ids, (n, k)."""
    answers = []
    network = network.to(where.device)
    for start in range(0, len(paths), PEER_BATCH_SIZE):
        batch = torch.stack([transform(open_rgb(path)) for path in paths[start : start + PEER_BATCH_SIZE]])
        with torch.no_grad():
            answers.append(where.logits(network, batch).softmax(dim=1).topk(PEER_TOPK, dim=1).indices.cpu())
    return torch.cat(answers)


@dataclass
class _Files(Dataset):
    paths: Sequence[str]
    transform: Transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[index]))


def dataloader(paths: Sequence[str], network: torch.nn.Module, transform: Transform, where: Where) -> torch.Tensor:
    workers = len(os.sched_getaffinity(0))
    loader = DataLoader(_Files(paths, transform), batch_size=PEER_BATCH_SIZE, num_workers=workers,
                        pin_memory=where.device.type == "cuda")  # fmt: skip
    network = network.to(where.device, memory_format=torch.channels_last)
    answers = []
    with torch.inference_mode():
        for batch in loader:
            logits = where.logits(network, batch.contiguous(memory_format=torch.channels_last))
            answers.append(logits.softmax(dim=1).topk(PEER_TOPK, dim=1).indices.cpu())
    return torch.cat(answers)


PEERS = {"naive": naive, "dataloader": dataloader}


def run(peer: str, paths: Sequence[str], model: str, weights: str, output: str, where: Where = Where()) -> None:
    spec = models.resolve(model, weights)
    ids = PEERS[peer](paths, spec.load(), reference_transform(spec.preprocess), where).tolist()
    labels = [[spec.labels[i] for i in row] for row in ids]
    columns = {"path": list(paths), "label": [row[0] for row in labels], "topk_ids": ids, "topk_labels": labels}
    pq.write_table(pa.table(columns), output)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("file_list", help="a text file, one image path per line")
    parser.add_argument("-o", "--output", required=True, help="the Parquet file to write")
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    arguments = parser.parse_args(argv)
    with open(arguments.file_list, encoding="utf-8", errors="surrogateescape") as handle:
        paths = [line.rstrip("\n") for line in handle if line.strip()]
    where = Where(torch.device(arguments.device), arguments.precision)
    run(arguments.peer, paths, arguments.model, arguments.weights, arguments.output, where)


if __name__ == "__main__":
    main()
