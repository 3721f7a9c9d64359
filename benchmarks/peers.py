"""The programs `batch classify` is measured against, written as their authors would write them.

- `naive`: the tutorial loop. PIL opens each file, the model's reference transforms run in the main
  process, and the model takes batches of 64 in fp32.
- `dataloader`: what a competent PyTorch user writes (the shape of timm's inference.py). A Dataset
  over the file list runs the same transforms in DataLoader worker processes, one per usable CPU.
  The model takes batches of 64 in channels_last.

Both write the top-5 classes to one Parquet file, so that all three are timed from process start to
the same kind of result. The naive loop's answers are the reference that `benchmarks.compare
--agreement` checks batch's against: a full decode, the reference transforms, fp32, the network as built.

Run one as `python -m benchmarks.peers naive|dataloader --model M --weights W -o OUT.parquet FILE_LIST`.
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
from batch.weights import DEFAULT_WEIGHTS
from benchmarks.reference import Transform, open_rgb, reference_transform

PEER_BATCH_SIZE = 64
PEER_TOPK = 5


def naive(paths: Sequence[str], network: torch.nn.Module, transform: Transform) -> torch.Tensor:
    """Top-k class ids, (n, k)."""
    answers = []
    for start in range(0, len(paths), PEER_BATCH_SIZE):
        batch = torch.stack([transform(open_rgb(path)) for path in paths[start : start + PEER_BATCH_SIZE]])
        with torch.no_grad():
            answers.append(network(batch).softmax(dim=1).topk(PEER_TOPK, dim=1).indices)
    return torch.cat(answers)


@dataclass
class _Files(Dataset):
    paths: Sequence[str]
    transform: Transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[index]))


def dataloader(paths: Sequence[str], network: torch.nn.Module, transform: Transform) -> torch.Tensor:
    workers = len(os.sched_getaffinity(0))
    loader = DataLoader(_Files(paths, transform), batch_size=PEER_BATCH_SIZE, num_workers=workers)
    network = network.to(memory_format=torch.channels_last)
    answers = []
    with torch.inference_mode():
        for batch in loader:
            logits = network(batch.contiguous(memory_format=torch.channels_last))
            answers.append(logits.softmax(dim=1).topk(PEER_TOPK, dim=1).indices)
    return torch.cat(answers)


PEERS = {"naive": naive, "dataloader": dataloader}


def run(peer: str, paths: Sequence[str], model: str, weights: str, output: str) -> None:
    spec = models.resolve(model, weights)
    ids = PEERS[peer](paths, spec.load(), reference_transform(spec.preprocess)).tolist()
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
    arguments = parser.parse_args(argv)
    with open(arguments.file_list, encoding="utf-8", errors="surrogateescape") as handle:
        paths = [line.rstrip("\n") for line in handle if line.strip()]
    run(arguments.peer, paths, arguments.model, arguments.weights, arguments.output)


if __name__ == "__main__":
    main()
