"""timm models as users save them, classified offline and compared with timm's own inference.

The models are timm's tiny `test_*` architectures, randomly initialised and saved by timm itself. A random
head gives one label to every picture, so the head is re-centred on the test pictures' features: each of
the first pictures then scores highest on a class of its own, and top-1 means something.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config
from timm.models import save_for_hf

from tests import images
from tests.conftest import DROP_ROOT_READ, read_rows

LABELS = ["alpha", "beta", "gamma", "delta"]
SIDE = 160  # test_vit's and test_resnet's input size


def offline(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real CLI with no network at all (`unshare -n`): a model that reached for the hub would fail."""
    result = subprocess.run(["unshare", "-n", *DROP_ROOT_READ, sys.executable, "-m", "batch", *map(str, args)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"batch {' '.join(map(str, args))} exited {result.returncode}\n{result.stderr}")
    return result


def crops(folder: Path) -> list[Path]:
    """Twelve different pictures of the model's input size, cut from the bundled photos, as PNG."""
    folder.mkdir()
    paths = []
    for name in ("chelsea", "coffee", "rocket"):
        photo = images.photo(name).convert("RGB")
        for step in range(4):
            left = step * (photo.width - SIDE) // 3
            top = (step % 2) * (photo.height - SIDE)
            paths.append(folder / f"{name}-{step}.png")
            photo.crop((left, top, left + SIDE, top + SIDE)).save(paths[-1])
    return paths


def with_distinct_labels(network: torch.nn.Module, pictures: list[Path]) -> torch.nn.Module:
    """The head re-centred and scaled so that the first pictures each win a class of their own."""
    transform = create_transform(**resolve_data_config(model=network))
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in pictures])
    with torch.no_grad():
        features = network.forward_head(network.forward_features(batch), pre_logits=True)
        centred = features - features.mean(0)
        directions = centred[: len(LABELS)] / centred[: len(LABELS)].norm(dim=1, keepdim=True)
        head = network.get_classifier()
        head.weight.copy_(directions * 8 / centred.norm(dim=1).mean())
        head.bias.copy_(-head.weight @ features.mean(0))
    return network.eval()


def timm_top1(network: torch.nn.Module, pictures: list[Path]) -> tuple[list[int], np.ndarray]:
    """timm's own inference: its transforms from its data config, then softmax."""
    transform = create_transform(**resolve_data_config(model=network))
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in pictures])
    with torch.no_grad():
        scores = network(batch).softmax(1).numpy()
    return scores.argmax(1).tolist(), scores


def mixed(pictures: list[Path], folder: Path) -> list[Path]:
    """The pictures at other sizes, in turn RGB, greyscale and RGBA, as PNG; beside them (not listed) a
    truncated JPEG, broken.jpg."""
    folder.mkdir()
    made = []
    for number, path in enumerate(pictures):
        picture = Image.open(path).resize((SIDE + 61, SIDE + 19 * number), Image.Resampling.BICUBIC)
        made.append(folder / f"{path.stem}.png")
        picture.convert(("RGB", "L", "RGBA")[number % 3]).save(made[-1])
    (folder / "broken.jpg").write_bytes((images.PHOTOS / "coffee.jpg").read_bytes()[:2000])
    return made


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    """crops(), once per test module that uses them."""
    return crops(tmp_path_factory.mktemp("crops") / "at-size")


def save_tiny_vit(folder: Path, pictures: list[Path]) -> torch.nn.Module:
    """test_vit with four classes, saved by save_for_hf with its label names; crop_pct 1 so that pictures
    of the input size reach the network untouched."""
    torch.manual_seed(0)
    network = timm.create_model("test_vit", num_classes=len(LABELS))
    network.pretrained_cfg = {**network.pretrained_cfg, "crop_pct": 1.0}
    network = with_distinct_labels(network, pictures)
    save_for_hf(network, folder, model_config={"label_names": LABELS}, safe_serialization=True)
    return network


@pytest.fixture(scope="module")
def vit(pictures, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("timm") / "vit"
    return folder, save_tiny_vit(folder, pictures)


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {Path(row["path"]).name: row for row in rows}


def test_a_saved_folder_classifies_offline_as_timm_does(vit, pictures, tmp_path):
    folder, network = vit
    expected, scores = timm_top1(network, pictures)
    assert len(set(expected)) == len(LABELS), "the re-centred head must spread the pictures over every class"
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder, "--batch-size", "5")
    rows = by_name(read_rows(tmp_path / "out"))
    assert len(rows) == len(pictures)  # 12 in batches of 5: the last one partial
    for path, top1, row_scores in zip(pictures, expected, scores):
        row = rows[path.name]
        assert row["label"] == LABELS[top1] and row["topk_labels"][0] == LABELS[top1]
        assert np.allclose(row["topk_scores"], np.sort(row_scores)[::-1], atol=1e-5)
    offline("report", tmp_path / "out", "-o", tmp_path / "report.html")
    assert "model timm:test_vit (vit)." in (tmp_path / "report.html").read_text()  # its name and source
    moved = tmp_path / "scratch" / "vit"
    shutil.copytree(folder, moved)  # as a job copies the model to node-local scratch: the same results go on
    resumed = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", moved)
    assert "12 already done, 0 to classify" in resumed.stderr


def test_other_sizes_modes_and_a_broken_file_agree_with_timms_preprocessing(vit, pictures, tmp_path):
    folder, network = vit
    made = mixed(pictures, tmp_path / "mixed")
    expected, _ = timm_top1(network, made)
    offline("classify", made[0].parent, "-o", tmp_path / "out", "--model", folder)
    rows = by_name(read_rows(tmp_path / "out"))
    assert rows["broken.jpg"]["error"] and rows["broken.jpg"]["label"] is None
    agree = [rows[path.name]["label"] == LABELS[top1] for path, top1 in zip(made, expected)]
    assert sum(agree) >= len(made) - 1, f"top-1 agrees with timm (PIL backend) on {sum(agree)} of {len(made)}"


def test_a_training_checkpoint_loads_as_data_with_its_arguments_and_its_ema(pictures, tmp_path):
    """What timm's train.py writes: state_dict, state_dict_ema, argparse arguments, DDP's `module.` prefix."""
    torch.manual_seed(1)
    network = with_distinct_labels(timm.create_model("test_resnet", num_classes=len(LABELS)), pictures)
    ema = {f"module.{key}": -value if key == "fc.bias" else value for key, value in network.state_dict().items()}
    arguments = argparse.Namespace(model="test_resnet", num_classes=len(LABELS), crop_pct=1.0, img_size=SIDE,
                                   interpolation="bilinear", mean=None, std=None)  # fmt: skip
    checkpoint = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "test_resnet", "state_dict": network.state_dict(), "state_dict_ema": ema,
                "args": arguments}, checkpoint)  # fmt: skip
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS))
    expected, _ = timm_top1(network, pictures)
    common = ["--model", "timm:test_resnet", "--labels", labels]
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", *common, "--weights", checkpoint)
    assert [by_name(read_rows(tmp_path / "out"))[path.name]["label"] for path in pictures] == [LABELS[i] for i in expected]
    offline("classify", pictures[0].parent, "-o", tmp_path / "ema", *common, "--weights", f"{checkpoint}#ema")
    assert read_rows(tmp_path / "ema") != read_rows(tmp_path / "out")  # the EMA weights were the ones used

    alone = tmp_path / "weights.pth"
    torch.save(network.state_dict(), alone)
    refused = offline("classify", pictures[0].parent, "-o", tmp_path / "x", *common, "--weights", f"{alone}#ema",
                      check=False)  # fmt: skip
    assert refused.returncode == 2 and "holds no EMA weights" in refused.stderr


def test_a_safetensors_checkpoint_with_an_architecture_name_gets_its_classes_from_its_head(vit, pictures, tmp_path):
    """timm:ARCH --weights FILE.safetensors, its keys as distributed training saved them (`module.`): the head's
    four rows ask for four labels (read from the file's header), and with them it classifies as timm does."""
    folder, network = vit
    state = load_file(folder / "model.safetensors")
    save_file({f"module.{key}": value for key, value in state.items()}, tmp_path / "ddp.safetensors")
    unnamed = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", "timm:test_vit",
                      "--weights", tmp_path / "ddp.safetensors", check=False)  # fmt: skip
    assert unnamed.returncode == 2 and "timm:test_vit names no classes (4 outputs): pass --labels FILE" in unnamed.stderr, unnamed.stderr
    four = tmp_path / "four.txt"
    four.write_text("\n".join(LABELS))
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", "timm:test_vit", "--weights",
            tmp_path / "ddp.safetensors", "--labels", four, "--resize", str(SIDE), "--crop", str(SIDE))  # fmt: skip
    expected, _ = timm_top1(network, pictures)  # its saved config crops nothing: crop_pct 1
    assert [by_name(read_rows(tmp_path / "out"))[path.name]["label"] for path in pictures] == [LABELS[i] for i in expected]


def test_a_head_of_another_size_is_an_error_naming_the_keys(vit, pictures, tmp_path):
    folder, _ = vit
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    refused = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder, "--labels", three,
                      check=False)  # fmt: skip
    assert refused.returncode == 2 and f"--labels names 3 classes, but {folder} has 4" in refused.stderr
    four = tmp_path / "four.txt"
    four.write_text("\n".join(LABELS))
    alien = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=len(LABELS)).state_dict(), alien)
    mismatch = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", "timm:test_vit",
                       "--weights", alien, "--labels", four, check=False)  # fmt: skip
    assert mismatch.returncode == 1, mismatch.stderr
    assert "do not fit timm:test_vit with 4 classes" in mismatch.stderr
    assert "missing: cls_token, pos_embed" in mismatch.stderr and "unexpected: conv1.0.weight" in mismatch.stderr
    assert not (tmp_path / "out").exists() or not read_rows(tmp_path / "out")


def test_weights_this_user_cannot_read_are_a_usage_error_naming_the_file(vit, pictures, tmp_path):
    folder, _ = vit
    shutil.copytree(folder, tmp_path / "vit")
    (tmp_path / "vit" / "model.safetensors").chmod(0o600)
    os.chown(tmp_path / "vit" / "model.safetensors", 4242, 4242)  # another user's: root too is refused (setpriv)
    refused = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", tmp_path / "vit", check=False)
    assert refused.returncode == 2, refused.stderr
    assert f"weights file cannot be read: {tmp_path / 'vit' / 'model.safetensors'}" in refused.stderr


def as_hub_cache(saved: Path, cache: Path) -> Path:
    """The hub cache's layout of a saved folder: refs/main names a snapshot of symlinks into blobs/."""
    (cache / "blobs").mkdir(parents=True)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0123abcd")
    snapshot = cache / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in saved.iterdir():
        blob = cache / "blobs" / f"blob-{file.name}"
        blob.write_bytes(file.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    return cache


def test_a_hub_cache_folder_is_read_through_its_snapshot_symlinks(vit, pictures, tmp_path):
    folder, network = vit
    cache = as_hub_cache(folder, tmp_path / "models--timm--test_vit.tiny")
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", cache)
    expected, _ = timm_top1(network, pictures)
    assert [by_name(read_rows(tmp_path / "out"))[path.name]["label"] for path in pictures] == [LABELS[i] for i in expected]


def test_unknown_architectures_and_missing_checkpoints_are_usage_errors(tmp_path):
    unknown = offline("classify", images.PHOTOS, "-o", tmp_path / "out", "--model", "timm:resnet5O", "--weights",
                      "x.pth", check=False)  # fmt: skip
    assert unknown.returncode == 2 and "timm has no architecture 'resnet5O'" in unknown.stderr
    missing = offline("classify", images.PHOTOS, "-o", tmp_path / "out", "--model", "timm:resnet50", check=False)
    assert missing.returncode == 2 and "needs its checkpoint: --weights FILE" in missing.stderr


def test_sigmoid_scores_each_class_on_its_own_and_is_part_of_the_identity(vit, pictures, tmp_path):
    folder, network = vit
    transform = create_transform(**resolve_data_config(model=network))
    with torch.no_grad():
        logits = network(torch.stack([transform(Image.open(path).convert("RGB")) for path in pictures]))
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder, "--activation", "sigmoid")
    rows = by_name(read_rows(tmp_path / "out"))
    for path, expected in zip(pictures, logits.sigmoid().sort(descending=True).values.numpy()):
        assert np.allclose(rows[path.name]["topk_scores"], expected[:4], atol=1e-5)
    assert sum(rows[pictures[0].name]["topk_scores"]) != pytest.approx(1)
    again = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder, check=False)
    assert again.returncode != 0 and "activation" in again.stderr


def test_timm_is_imported_only_for_a_timm_model():
    """`import timm` costs every start about half a second: the other models never pay it."""
    code = ("import sys; from batch import models, pipeline; models.resolve(); models.resolve('resnet18', 'none'); "
            "assert 'timm' not in sys.modules, 'timm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_crop_mode_we_cannot_do_is_refused_unless_a_centre_crop_is_chosen(pictures, tmp_path):
    torch.manual_seed(2)
    network = timm.create_model("test_vit", num_classes=len(LABELS))
    network.pretrained_cfg = {**network.pretrained_cfg, "crop_mode": "squash"}
    save_for_hf(network, tmp_path / "squash", model_config={"label_names": LABELS})
    refused = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", tmp_path / "squash", check=False)
    assert refused.returncode == 2 and "crop_mode 'squash': only 'center' is supported" in refused.stderr
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", tmp_path / "squash",
            "--resize", str(SIDE), "--crop", str(SIDE))  # fmt: skip
    assert len(read_rows(tmp_path / "out")) == len(pictures)


def test_an_interpolation_we_do_not_have_is_replaced_by_bicubic_with_a_warning_unless_one_is_chosen(pictures, tmp_path):
    torch.manual_seed(3)
    network = timm.create_model("test_vit", num_classes=len(LABELS))
    network.pretrained_cfg = {**network.pretrained_cfg, "interpolation": "lanczos"}
    save_for_hf(network, tmp_path / "lanczos", model_config={"label_names": LABELS})
    warned = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", tmp_path / "lanczos")
    assert f"{tmp_path / 'lanczos'} resizes with 'lanczos' interpolation, which batch does not have: bicubic instead" in warned.stderr
    chosen = offline("classify", pictures[0].parent, "-o", tmp_path / "chosen", "--model", tmp_path / "lanczos",
                     "--interpolation", "bilinear")  # fmt: skip
    assert "which batch does not have" not in chosen.stderr
    assert len(read_rows(tmp_path / "out")) == len(read_rows(tmp_path / "chosen")) == len(pictures)


def test_label_descriptions_name_the_classes_where_the_model_has_them(pictures, tmp_path):
    """As timm's ImageNet models: synset ids as label_names, what they are in label_descriptions."""
    network = timm.create_model("test_vit", num_classes=2)
    save_for_hf(network, tmp_path / "described", model_config={
        "label_names": ["n02123045", "n07920052"], "label_descriptions": {"n02123045": "tabby, tabby cat"}})
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", tmp_path / "described", "--topk", "2")
    assert sorted(read_rows(tmp_path / "out")[0]["topk_labels"]) == ["n07920052", "tabby, tabby cat"]
