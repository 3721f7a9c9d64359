"""One model of each family, saved as its own library saves it, classified by `batch classify` as whole processes.

timm: `timm:ARCH --weights model.safetensors` (a state dict written by safetensors); Hugging Face: a
`save_pretrained` folder with its image processor; OpenCLIP zero-shot over 1,000 named classes. All are
randomly initialised (nothing can be downloaded), so what this shows is that each family loads,
preprocesses and runs on the device, and how fast, start-up included; agreement with each library's own inference is tests/test_model_*.py's.

Run from the repository root, as
`python -m benchmarks.families PICTURES [--device cuda] [--precision bf16] [--batch-size 256] [--tiny]`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq
import torch

CLASSES = 1000


def save_timm(architecture: str, folder: Path) -> list[str]:
    """A safetensors state dict of a timm architecture; the `--model` and `--weights` that name it."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = folder / f"{architecture}.safetensors"
    save_file(timm.create_model(architecture, num_classes=CLASSES).state_dict(), weights)
    return ["--model", f"timm:{architecture}", "--weights", str(weights)]


def save_hf(tiny: bool, folder: Path) -> list[str]:
    """A ConvNeXt (the tiny test size, or ConvNeXt-T) saved by save_pretrained with its image processor."""
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    torch.manual_seed(0)
    shape = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]} if tiny else {}
    names = {index: f"class_{index}" for index in range(CLASSES)}
    config = ConvNextConfig(num_labels=CLASSES, id2label=names, label2id={name: i for i, name in names.items()}, **shape)
    ConvNextForImageClassification(config).save_pretrained(folder / "convnext")
    ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(folder / "convnext")
    return ["--model", str(folder / "convnext")]


def save_clip(tiny: bool, folder: Path) -> list[str]:
    """Zero-shot OpenCLIP over the 1,000 class names: a tiny open_clip_config.json folder, or ViT-B-32 by
    its built-in name with a weights file."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    labels = folder / "classes.txt"
    labels.write_text("".join(f"class {index}\n" for index in range(CLASSES)))
    if not tiny:
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), folder / "open_clip_pytorch_model.bin")
        return ["--model", "open_clip:ViT-B-32", "--weights", str(folder / "open_clip_pytorch_model.bin"), "--labels", str(labels)]
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}  # fmt: skip
    (folder / "clip").mkdir()
    save_file(open_clip.CLIP(**config).state_dict(), folder / "clip" / "open_clip_model.safetensors")
    (folder / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    return ["--model", str(folder / "clip"), "--labels", str(labels)]


def run(pictures: Path, model: list[str], options: list[str], output: Path) -> str:
    """`batch classify`: its own rate after start-up (its last log line), the whole process's, its rows."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "batch", "classify", str(pictures), "-o", str(output), *model,
                             *options], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    running = re.findall(r"classified \d+ images, \d+ failed, in \S+ \(([0-9.]+) images/s\)", result.stderr)
    table = pq.read_table(output, columns=["error"])
    failed = table.num_rows - table.column("error").null_count
    return (f"{running[-1] if running else '?':>8} images/s after start-up, {table.num_rows / seconds:.1f} whole "
            f"({seconds:.1f} s)  {table.num_rows} rows, {failed} failed")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pictures", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--tiny", action="store_true", help="tiny architectures: for a CPU and a few files")
    args = parser.parse_args(argv)
    options = ["--device", args.device, "--precision", args.precision, "--batch-size", args.batch_size]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        families = {
            "timm": save_timm("test_resnet" if args.tiny else "resnet50", folder),
            "hf": save_hf(args.tiny, folder),
            "clip": save_clip(args.tiny, folder),
        }
        print(f"{args.pictures}: {args.device}, {args.precision}, batch {args.batch_size}")
        for family, model in families.items():
            print(f"  {family:5} {Path(model[1]).name:>16}  {run(args.pictures, model, options, folder / f'out-{family}')}", flush=True)


if __name__ == "__main__":
    main()
