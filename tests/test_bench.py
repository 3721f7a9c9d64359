"""`batch bench` on tiny inputs: every stage reports, the peers run, temporary files go away.

The numbers are this machine's and are not asserted; docs/benchmarks.md records them.
"""

from __future__ import annotations

import re
import shutil

import pyarrow.parquet as pq
import torch
import torchvision

from batch import peers
from batch.inference import fold_batch_norm
from tests.conftest import FAST, run_batch

TINY = ("--generate", "6", "--width", "80-120", "--batch-size", "4", "--workers", "1")


def test_bench_reports_every_stage_the_peers_and_a_suggestion(tmp_path):
    result = run_batch("bench", *TINY, *FAST, "--compare", env={"TMPDIR": str(tmp_path)})
    report = result.stdout
    for stage in ("read", "decode+preprocess", "model", "write", "end to end", "naive loop (baseline)",
                  "naive (peer)", "dataloader (peer)", "batch classify"):  # fmt: skip
        assert re.search(rf"^  {re.escape(stage)} +[0-9.]+ ", report, re.MULTILINE), f"no {stage!r} line in:\n{report}"
    assert "6 generated JPEGs 80-120 px wide, smooth random scenes" in report
    assert re.search(r"batch classify is [0-9.]+x the better peer", report)
    for contender in ("naive (peer)", "dataloader (peer)", "batch classify"):  # six files: too few to time past start-up
        assert re.search(rf"^  {re.escape(contender)} .* start-up [0-9.]+ s, too few files", report, re.MULTILINE)
    assert "--cpus-per-task" in report
    assert list(tmp_path.iterdir()) == [], "generated images and outputs must be deleted"


def test_bench_agreement_on_real_photos_with_the_default_model(photos, tmp_path):
    result = run_batch("bench", photos, "--agreement", "--workers", "1", env={"TMPDIR": str(tmp_path)})
    assert "3 images from" in result.stdout
    assert "top-1 agreement with the reference preprocessing: 3 of 3 (100.00%)" in result.stdout


def test_bench_refuses_agreement_without_trained_weights_and_an_empty_folder(tmp_path):
    result = run_batch("bench", *TINY, *FAST, "--agreement", check=False)
    assert result.returncode == 2 and "--agreement needs trained weights" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_batch("bench", tmp_path / "empty", *FAST, check=False)
    assert result.returncode == 2 and "no images found in" in result.stderr
    result = run_batch("bench", "--width", "2000-x", check=False)
    assert result.returncode == 2 and "is not a width" in result.stderr


def test_bench_times_the_files_that_decode_and_names_those_that_do_not(photos, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    (folder / "page.jpg").write_text("<html><body>404</body></html>")
    result = run_batch("bench", folder, *FAST, "--workers", "1")
    assert f"1 of 4 files cannot be decoded, such as {folder / 'page.jpg'}: not an image" in result.stdout
    assert re.search(r"^  naive loop \(baseline\) +[0-9.]+ images/s", result.stdout, re.MULTILINE)
    for photo in folder.glob("*.jpg"):
        photo.write_bytes(b"")
    result = run_batch("bench", folder, *FAST, check=False)
    assert result.returncode == 2 and "none of the 4 files can be decoded, such as" in result.stderr


def test_a_peer_writes_the_top_five_of_every_file(photos, tmp_path):
    files = tmp_path / "files.txt"
    files.write_text("".join(f"{path}\n" for path in sorted(photos.glob("*.jpg"))))
    peers.main(["dataloader", str(files), "-o", str(tmp_path / "peer.parquet"), *FAST])
    rows = pq.read_table(tmp_path / "peer.parquet").to_pylist()
    assert [row["path"] for row in rows] == sorted(str(path) for path in photos.glob("*.jpg"))
    assert all(len(row["topk_labels"]) == 5 and row["label"] == row["topk_labels"][0] for row in rows)


def test_folding_batch_norm_keeps_the_answers():
    torch.manual_seed(0)
    network = torchvision.models.mobilenet_v3_small().eval()
    for module in network.modules():  # untrained statistics are 0 and 1; make the fold do real work
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    pictures = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        expected = network(pictures)
        folded = fold_batch_norm(network)
        assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
        torch.testing.assert_close(folded(pictures), expected, rtol=1e-4, atol=1e-4)
