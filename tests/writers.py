"""Inputs written by the real img2dataset and webdataset, so the tests check our reader against what they write.

img2dataset downloads from a loopback http.server that `serve` starts; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import webdataset as wds


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """The base url (no trailing slash) of a threaded HTTP server on 127.0.0.1 serving `folder`.

    A missing file answers 404 "File not found". The server is shut down on exit.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# Run as `python -c` with the keyword arguments of img2dataset.download as JSON: its spawned worker and
# logger processes, fire and tqdm stay out of the test process.
_DOWNLOAD = "import json, sys; from img2dataset import download; download(**json.loads(sys.argv[1]))"


def img2dataset_output(tmp: Path, pictures: dict[str, bytes], missing: list[str], output_format: str) -> Path:
    """Run the real img2dataset on the urls of `pictures` (served from tmp/served) then of `missing` (404s);
    return its output folder, tmp/img2dataset-<output_format>.

    The url list is a txt file, one url-quoted name a line, pictures first in dict order. A sample's key is
    its 9-digit line number there ("000000000", ...); rows and tar members follow that order (one thread).
    JPEG pictures keep their exact bytes (resize_mode "no", skip_reencode); others are re-encoded to JPEG.
    Both formats write 00000_stats.json ({count, successes, failed_to_download, failed_to_resize, duration,
    start_time, end_time, status_dict}, status_dict counting "success" and each error message) and

    - "parquet": 00000.parquet, a row per url, failures included, with columns url, key, status,
      error_message, width, height, original_width, original_height, exif, sha256, jpg: strings but the
      int32 sizes and the binary jpg. A picture: status "success", error_message null, exif a JSON string
      ("{}" without EXIF), sha256 the hex digest of its bytes. A 404: status "failed_to_download",
      error_message "HTTP Error 404: File not found", every other column null, jpg included.
    - "webdataset": 00000.tar, and 00000.parquet with the same rows less the jpg column. The tar holds the
      successes alone, as <key>.jpg then <key>.json (mode 0444, owner "bigdata"); the json is the sample's
      parquet row, indented by 4.
    """
    served = tmp / "served"
    served.mkdir(parents=True)
    for name, data in pictures.items():
        (served / name).write_bytes(data)
    output = tmp / f"img2dataset-{output_format}"
    with serve(served) as base:
        urls = tmp / "urls.txt"
        urls.write_text("".join(f"{base}/{quote(name)}\n" for name in [*pictures, *missing]))
        arguments = {
            "url_list": str(urls),
            "input_format": "txt",
            "output_folder": str(output),
            "output_format": output_format,
            "processes_count": 1,
            "thread_count": 1,  # rows and tar members in url order
            "resize_mode": "no",
            "encode_format": "jpg",
            "skip_reencode": True,
            "timeout": 5,
            "retries": 0,
            "enable_wandb": False,
        }
        # No proxy for the loopback urls, and no update check by albumentations or wandb.
        quiet = {"no_proxy": "*", "NO_PROXY": "*", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
        run = subprocess.run(
            [sys.executable, "-c", _DOWNLOAD, json.dumps(arguments)],
            env={**os.environ, **quiet}, capture_output=True, text=True, timeout=300,
        )
    # img2dataset reports a failed shard on stdout and still exits 0: its stats file says it finished.
    if run.returncode != 0 or not (output / "00000_stats.json").is_file():
        raise RuntimeError(f"img2dataset failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    return output


def webdataset_shards(folder: Path, samples: list[dict[str, Any]], per_shard: int = 1000) -> list[Path]:
    """Write `samples` with webdataset's own ShardWriter into folder/shard-000000.tar, ...; return the tars.

    Each sample holds "__key__" and an entry per extension: bytes are stored as they are, a dict under "json"
    is JSON-encoded. A sample's members are named <key>.<extension> in sorted extension order (jpg before
    json); a key with dots is kept whole ("sample.0001" -> sample.0001.jpg).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
    return sorted(folder.glob("shard-*.tar"))


def webdataset_read(tar: Path) -> list[dict[str, Any]]:
    """The samples webdataset's own reader yields from `tar`: "__key__" and extension -> bytes.

    It splits a member's name with ^((?:.*/|)[^.]+)[.]([^/]*)$ and lower-cases the extension: sample.0001.jpg
    is key "sample", extension "0001.jpg"; a.b/c.jpg is key "a.b/c". A name matching nothing is skipped: one
    with no dot in its basename, or a top-level one starting with a dot (._x.jpg, .DS_Store); but dir/._x.jpg
    is key "dir/", extension "_x.jpg". __*__ names are skipped. Members are grouped while the key repeats: a
    key that comes back after another starts a new sample; an extension repeated within one (a.jpg, a.JPG)
    raises ValueError "<name>: duplicate file name in tar file <extension> ...".
    """
    dataset = wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)
    return [{k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")} for sample in dataset]

