"""The programs `batch bench` measures itself against, written as their authors would write them.

- `naive`: the tutorial loop. PIL opens each file, the model's reference transforms run in the main
  process, and the model takes batches of 64 in fp32.
- `dataloader`: what a competent PyTorch user writes (the shape of timm's inference.py). A Dataset
  over the file list runs the same transforms in DataLoader worker processes, one per usable CPU.
  The model takes batches of 64 in channels_last.

Both write the top-5 classes to one Parquet file, so that all three are timed from process start to
the same kind of result. The reference transforms (a full decode, then torchvision's Resize,
CenterCrop and Normalize) also decide the answers that `batch bench --agreement` compares against.

Run one as `python -m batch.peers naive|dataloader --model M --weights W -o OUT.parquet FILE_LIST`.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from batch import models
from batch.decode import Preprocess
from batch.weights import DEFAULT_WEIGHTS

PEER_BATCH_SIZE = 64
PEER_TOPK = 5
Transform = Callable[[Image.Image], torch.Tensor]


def reference_transform(preprocess: Preprocess) -> Transform:
    """The class behind torchvision's `weights.transforms()`, set to this model's preprocessing."""
    return ImageClassification(
        crop_size=preprocess.crop,
        resize_size=preprocess.resize,
        mean=[value / 255 for value in preprocess.mean],
        std=[value / 255 for value in preprocess.std],
        interpolation=InterpolationMode(preprocess.interpolation),
    )


def open_rgb(path: str) -> Image.Image:
    """A full decode, upright: the reference the fast paths are checked against."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def naive(paths: Sequence[str], network: torch.nn.Module, transform: Transform) -> torch.Tensor:
    """Top-k class ids, (n, k)."""
    answers = []
    for start in range(0, len(paths), PEER_BATCH_SIZE):
        batch = torch.stack([transform(open_rgb(path)) for path in paths[start : start + PEER_BATCH_SIZE]])
        with torch.no_grad():
            answers.append(network(batch).softmax(dim=1).topk(PEER_TOPK, dim=1).indices)
    return torch.cat(answers)


class _Files(Dataset):
    def __init__(self, paths: Sequence[str], transform: Transform):
        self.paths = paths
        self.transform = transform

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
    spec = models.resolve(model, weights, None, models.PreprocessOverrides())
    ids = PEERS[peer](paths, spec.load(), reference_transform(spec.preprocess))
    labels = [[spec.labels[i] for i in row] for row in ids.tolist()]
    pq.write_table(pa.table({"path": list(paths), "label": [row[0] for row in labels], "topk_labels": labels}), output)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m batch.peers", description=__doc__.splitlines()[0])
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
