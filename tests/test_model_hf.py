"""Hugging Face transformers folders as save_pretrained writes them, classified offline and compared with
transformers' own inference: its AutoImageProcessor (the torchvision backend, transformers 5's default)
and its model.

The models are tiny ViT and ConvNeXt configurations, randomly initialised; their heads are re-centred on
the test pictures' features so that the first pictures each win a class of their own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (AutoImageProcessor, ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor,
                          ViTConfig, ViTForImageClassification, ViTImageProcessor)  # fmt: skip

from batch.writer import read_record
from tests.conftest import read_rows
from tests.test_model_timm import SIDE, as_hub_cache, by_name, mixed, offline, pictures  # noqa: F401 - a fixture

LABELS = ["alpha", "beta", "gamma", "delta"]
NAMED = {"id2label": dict(enumerate(LABELS)), "label2id": {name: index for index, name in enumerate(LABELS)}}


def with_distinct_labels(network: torch.nn.Module, processor, pictures: list[Path]) -> torch.nn.Module:
    """The classifier re-centred and scaled on its input features, so that the first pictures each win a class."""
    features = []
    hook = network.classifier.register_forward_pre_hook(lambda _module, inputs: features.append(inputs[0]))
    with torch.no_grad():
        network(**processor(images=[Image.open(path).convert("RGB") for path in pictures], return_tensors="pt"))
        hook.remove()
        found = features[0]
        centred = found - found.mean(0)
        directions = centred[: len(LABELS)] / centred[: len(LABELS)].norm(dim=1, keepdim=True)
        network.classifier.weight.copy_(directions * 8 / centred.norm(dim=1).mean())
        network.classifier.bias.copy_(-network.classifier.weight @ found.mean(0))
    return network.eval()


def own_inference(folder: Path, pictures: list[Path]) -> np.ndarray:
    """transformers' own: the folder's AutoImageProcessor and model, then softmax."""
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    network = ViTForImageClassification if "ViT" in type(processor).__name__ else ConvNextForImageClassification
    model = network.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        inputs = processor(images=[Image.open(path).convert("RGB") for path in pictures], return_tensors="pt")
        return model(**inputs).logits.softmax(1).numpy()


def save_vit(folder: Path, pictures: list[Path]) -> Path:
    """A two-layer ViT of the pictures' size with named classes; its processor resizes to SIDE x SIDE."""
    torch.manual_seed(0)
    config = ViTConfig(image_size=SIDE, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=len(LABELS), **NAMED)  # fmt: skip
    processor = ViTImageProcessor(size={"height": SIDE, "width": SIDE})
    with_distinct_labels(ViTForImageClassification(config), processor, pictures).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_convnext(folder: Path, pictures: list[Path], named: bool = True) -> Path:
    """A tiny ConvNeXt whose processor resizes the shorter side to SIDE / 0.875 and crops SIDE."""
    torch.manual_seed(1)
    config = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=len(LABELS),
                            **(NAMED if named else {}))  # fmt: skip
    processor = ConvNextImageProcessor(size={"shortest_edge": SIDE}, crop_pct=0.875)
    with_distinct_labels(ConvNextForImageClassification(config), processor, pictures).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit(pictures, tmp_path_factory) -> Path:
    return save_vit(tmp_path_factory.mktemp("hf") / "vit", pictures)


def test_a_saved_vit_classifies_offline_as_transformers_does(vit, pictures, tmp_path):
    scores = own_inference(vit, pictures)
    assert len(set(scores.argmax(1))) == len(LABELS), "the re-centred head must spread the pictures over every class"
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", vit, "--batch-size", "5")
    rows = by_name(read_rows(tmp_path / "out"))
    assert len(rows) == len(pictures)  # 12 in batches of 5: the last one partial
    for path, row_scores in zip(pictures, scores):
        row = rows[path.name]
        assert row["label"] == LABELS[row_scores.argmax()]
        assert np.allclose(row["topk_scores"], np.sort(row_scores)[::-1], atol=1e-5)
    offline("report", tmp_path / "out", "-o", tmp_path / "report.html")
    assert "model hf:ViTForImageClassification (vit)." in (tmp_path / "report.html").read_text()
    moved = tmp_path / "scratch" / "vit"
    shutil.copytree(vit, moved)  # as a job copies the model to node-local scratch: the same results go on
    resumed = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", moved)
    assert "12 already done, 0 to classify" in resumed.stderr


def test_other_sizes_modes_and_a_broken_file_agree_with_the_models_own_processor(pictures, tmp_path):
    folder = save_convnext(tmp_path / "convnext", pictures)
    made = mixed(pictures, tmp_path / "mixed")
    expected = own_inference(folder, made).argmax(1)
    offline("classify", made[0].parent, "-o", tmp_path / "out", "--model", folder)
    rows = by_name(read_rows(tmp_path / "out"))
    assert rows["broken.jpg"]["error"] and rows["broken.jpg"]["label"] is None
    agree = [rows[path.name]["label"] == LABELS[top1] for path, top1 in zip(made, expected)]
    assert sum(agree) >= len(made) - 1, f"top-1 agrees with transformers (torchvision backend) on {sum(agree)} of {len(made)}"
    part = next((tmp_path / "out").glob("part-*.parquet"))
    recorded = read_record(str(part))["identity"]["preprocess"]
    assert recorded["image_processor"]["class"] == "ConvNextImageProcessor" and recorded["output_side"] == SIDE


def test_placeholder_labels_warn_and_labels_of_another_length_exit_2(pictures, tmp_path):
    folder = save_convnext(tmp_path / "unnamed", pictures, named=False)
    warned = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder)
    assert "names its classes only LABEL_0, LABEL_1, LABEL_2" in warned.stderr
    assert {row["label"] for row in read_rows(tmp_path / "out")} <= {f"LABEL_{index}" for index in range(4)}
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    refused = offline("classify", pictures[0].parent, "-o", tmp_path / "x", "--model", folder, "--labels", three,
                      check=False)  # fmt: skip
    assert refused.returncode == 2 and f"--labels names 3 classes, but {folder} has 4" in refused.stderr
    assert not (tmp_path / "x").exists()


def test_a_hub_cache_folder_is_read_through_its_snapshot_symlinks(vit, pictures, tmp_path):
    cache = as_hub_cache(vit, tmp_path / "models--someone--tiny-vit")
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", cache)
    expected = own_inference(vit, pictures).argmax(1)
    assert [by_name(read_rows(tmp_path / "out"))[path.name]["label"] for path in pictures] == [LABELS[i] for i in expected]


def test_weights_that_do_not_fit_the_config_are_an_error_naming_the_keys(vit, pictures, tmp_path):
    folder = tmp_path / "mixed-up"
    shutil.copytree(vit, folder)
    save_convnext(tmp_path / "convnext", pictures)
    shutil.copy(tmp_path / "convnext" / "model.safetensors", folder / "model.safetensors")
    refused = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder, check=False)
    assert refused.returncode == 1, refused.stderr
    assert f"the weights in {folder} do not fit hf:ViTForImageClassification: missing:" in refused.stderr
    assert not (tmp_path / "out").exists() or not read_rows(tmp_path / "out")


def test_a_processor_whose_output_shape_follows_the_picture_is_refused_unless_a_crop_is_chosen(vit, pictures, tmp_path):
    folder = tmp_path / "shortest-edge"
    shutil.copytree(vit, folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**settings, "size": {"shortest_edge": SIDE}}))
    refused = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder, check=False)
    assert refused.returncode == 2 and "only one square size is supported" in refused.stderr
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder,
            "--resize", str(SIDE), "--crop", str(SIDE))  # fmt: skip
    assert len(read_rows(tmp_path / "out")) == len(pictures)


def test_transformers_and_open_clip_are_imported_only_for_their_models():
    code = ("import sys; from batch import models, pipeline; models.resolve(); models.resolve('resnet18', 'none'); "
            "assert not {'transformers', 'open_clip'} & set(sys.modules), 'a family imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_what_the_processor_does_beyond_resizing_is_done_by_the_processor(vit, pictures, tmp_path):
    """MobileViT's flips the channels to BGR: batch runs the processor itself and measures its arithmetic
    on plain pictures, so the flip happens as the model was trained, with nothing read from its fields."""
    folder = tmp_path / "flipped"
    shutil.copytree(vit, folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    flipped = {**settings, "image_processor_type": "MobileViTImageProcessor", "do_flip_channel_order": True,
               "size": {"shortest_edge": SIDE}, "crop_size": {"height": SIDE, "width": SIDE}}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(flipped))
    scores = own_inference(folder, pictures)
    assert not np.array_equal(scores.argmax(1), own_inference(vit, pictures).argmax(1)), "the flip must matter"
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder)
    rows = by_name(read_rows(tmp_path / "out"))
    for path, row_scores in zip(pictures, scores):
        assert np.allclose(rows[path.name]["topk_scores"], np.sort(row_scores)[::-1], atol=1e-5)


def test_pytorch_model_bin_of_older_transformers_loads_as_the_safetensors_does(vit, pictures, tmp_path):
    """transformers 5 writes only safetensors; folders saved before hold pytorch_model.bin, read as data."""
    folder = tmp_path / "bin"
    shutil.copytree(vit, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder)
    expected = own_inference(vit, pictures)
    rows = by_name(read_rows(tmp_path / "out"))
    for path, row_scores in zip(pictures, expected):
        assert np.allclose(rows[path.name]["topk_scores"], np.sort(row_scores)[::-1], atol=1e-5)


def test_a_processor_replaced_whole_by_the_options_is_not_run(vit, pictures, tmp_path):
    """--resize, --crop, --mean and --std together: the processor is neither measured nor run (transformers
    5.25's EfficientNet processor cannot resize uint8 pictures without normalising them)."""
    folder = tmp_path / "efficientnet-processor"
    shutil.copytree(vit, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "EfficientNetImageProcessor"}))
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", folder, "--resize", str(SIDE),
            "--crop", str(SIDE), "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5")  # fmt: skip
    expected = own_inference(vit, pictures)  # ViTImageProcessor: the same resize and 0.5 mean and std
    rows = by_name(read_rows(tmp_path / "out"))
    for path, row_scores in zip(pictures, expected):
        assert np.allclose(rows[path.name]["topk_scores"], np.sort(row_scores)[::-1], atol=1e-5)
