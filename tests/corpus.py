"""The public corpus: Pillow's own test images, fetched by .ci/run, and what Pillow itself makes of each.

Pillow's tests hold every format it reads, in odd modes, plus the fuzzers' crash files: pictures no one
here made, so they catch what our own writers never thought to write. Some of those files crash or hang
Pillow natively, so each verdict comes from a separate worker process that may die or stall on its file.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from queue import Empty, SimpleQueue

from batch.sources import is_image_name

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "corpus"  # .ci/run unpacks pillow-<version>/ here

LOADS, FAILS, CRASHES, HANGS = "loads", "fails", "crashes", "hangs"

# Run as `python -c`: open and fully load each path read from stdin, answer its verdict and the path.
# Answers go to the original stdout alone: whatever a plugin or a C library prints goes to stderr.
# Pillow is handed the open file, as batch.decode does: given a name, it would first try the plugin of the
# name's extension and keep it registered, so that after one .tga an icon would be taken for a TGA.
_WORKER = f"""
import os, sys, warnings
from PIL import Image
answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
warnings.simplefilter("ignore")
for line in sys.stdin:
    path = line.rstrip("\\n")
    try:
        with open(path, "rb") as handle, Image.open(handle) as image:
            image.load()
        verdict = {LOADS!r}
    except Exception:
        verdict = {FAILS!r}
    print(verdict, path, file=answers, flush=True)
"""


def images_folder() -> Path | None:
    """Pillow's Tests/images as .ci/run unpacked it, or None when it has not been fetched."""
    found = sorted(CACHE.glob("pillow-*/Tests/images"))
    return found[-1] if found else None


def files_of(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def flat_name(relative: Path) -> str:
    """A unique name in one folder that `batch` walks: the path's parts joined, and an image extension
    added where the file has none (Pillow reads by content; a misnamed file is a fault of its own)."""
    name = "__".join(relative.parts)
    return name if is_image_name(name) else f"{name}.img.png"


def verdicts(paths: Iterable[Path], workers: int = 2, timeout: float = 20.0) -> dict[Path, str]:
    """What plain Pillow does with each file: LOADS, FAILS (a Python exception), CRASHES or HANGS."""
    queue: SimpleQueue[Path] = SimpleQueue()
    for path in paths:
        queue.put(path)
    results: dict[Path, str] = {}
    threads = [threading.Thread(target=_serve, args=(queue, results, timeout)) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _serve(queue: SimpleQueue[Path], results: dict[Path, str], timeout: float) -> None:
    """One worker process at a time, replaced whenever a file kills or stalls it."""
    worker: subprocess.Popen | None = None
    try:
        for path in _drain(queue):
            if worker is None:
                worker = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
            worker.stdin.write(f"{path}\n")
            worker.stdin.flush()
            ready, _, _ = select.select([worker.stdout], [], [], timeout)
            verdict, _, answered = (worker.stdout.readline() if ready else "").rstrip("\n").partition(" ")
            if verdict in (LOADS, FAILS) and answered == str(path):
                results[path] = verdict
                continue
            results[path] = CRASHES if ready else HANGS
            _stop(worker)
            worker = None
    finally:
        if worker is not None:
            _stop(worker)


def _drain(queue: SimpleQueue[Path]) -> Iterator[Path]:
    while True:
        try:
            yield queue.get_nowait()
        except Empty:
            return


def _stop(worker: subprocess.Popen) -> None:
    worker.kill()
    worker.wait()
    for stream in (worker.stdin, worker.stdout):
        if not stream.closed:
            try:
                stream.close()
            except OSError:  # a dead worker's stdin may fail to flush
                pass


if __name__ == "__main__":  # a survey: how many files of each verdict, and which crash or hang Pillow
    folder = images_folder()
    if folder is None:
        sys.exit(f"no corpus under {CACHE}: run .ci/run")
    found = verdicts(files_of(folder), workers=os.cpu_count() or 2)
    for verdict in (LOADS, FAILS, CRASHES, HANGS):
        print(verdict, sum(1 for value in found.values() if value == verdict))
    for path, verdict in sorted(found.items()):
        if verdict in (CRASHES, HANGS):
            print(verdict, path.relative_to(folder))
