"""Zero-shot OpenCLIP with class names the user writes, classified offline and compared with open_clip's own
zero-shot recipe: its `local-dir:` model and preprocessing, its tokenizer, prompts averaged per class.

The model is a tiny CLIP configuration, randomly initialised; its image projection is solved so that the
first pictures' embeddings point at the text embeddings of distinct classes (a random model gives every
picture the same class).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from batch.writer import read_record
from tests.conftest import read_rows
from tests.test_model_timm import SIDE, as_hub_cache, by_name, mixed, offline, pictures  # noqa: F401 - a fixture

LABELS = ["cat", "coffee cup", "rocket", "teapot"]
TEMPLATES = ("a photo of a {}.", "a picture of the {}")
CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": SIDE, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}  # fmt: skip


def own_zero_shot(folder: Path, pictures: list[Path], labels: list[str] = LABELS,
                  templates: tuple[str, ...] = TEMPLATES) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """open_clip's own: its model and validation transform from the folder, prompts averaged per class."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        text = model.encode_text(tokenizer([t.format(label) for label in labels for t in templates]), normalize=True)
        text = torch.nn.functional.normalize(text.view(len(labels), len(templates), -1).mean(1), dim=-1)
        image = model.encode_image(torch.stack([preprocess(Image.open(path)) for path in pictures]), normalize=True)
        return (model.logit_scale.exp() * image @ text.T).softmax(1).numpy(), image.numpy()


def save_tiny_clip(folder: Path, pictures: list[Path]) -> Path:
    """A tiny CLIP whose image projection sends the first pictures to the text embeddings of distinct classes."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**CONFIG).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the same bundled BPE vocabulary as the config's
    transform = open_clip.image_transform(SIDE, is_train=False)
    with torch.no_grad():
        text = model.encode_text(tokenizer([TEMPLATES[0].format(label) for label in LABELS]), normalize=True)
        projection, model.visual.proj = model.visual.proj, None
        pooled = model.encode_image(torch.stack([transform(Image.open(path)) for path in pictures]))
        mean = pooled.mean(0, keepdim=True)
        wanted = torch.cat([text * 10, torch.zeros_like(text[:1])])  # picture i -> class i; the mean -> nothing
        solved = torch.linalg.pinv(torch.cat([pooled[: len(LABELS)] - mean, mean])) @ wanted
        model.visual.proj = torch.nn.Parameter(solved + 1e-3 * projection)
    folder.mkdir(parents=True)
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    settings = {"model_cfg": CONFIG, "preprocess_cfg": {"interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="module")
def clip(pictures, tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", pictures)


def labels_file(folder: Path, labels: list[str] = LABELS) -> Path:
    path = folder / "classes.txt"
    path.write_text("\n".join(labels) + "\n")
    return path


def test_zero_shot_labels_scores_and_embeddings_are_open_clips_own(clip, pictures, tmp_path):
    scores, embeddings = own_zero_shot(clip, pictures)
    assert len(set(scores.argmax(1))) == len(LABELS), "the solved projection must spread the pictures over every class"
    prompts = [argument for template in TEMPLATES for argument in ("--template", template)]
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", clip, "--labels", labels_file(tmp_path),
            *prompts, "--batch-size", "5", "--embeddings")  # fmt: skip
    rows = by_name(read_rows(tmp_path / "out"))
    assert len(rows) == len(pictures)  # 12 in batches of 5: the last one partial
    for path, row_scores, embedding in zip(pictures, scores, embeddings):
        row = rows[path.name]
        assert row["label"] == LABELS[row_scores.argmax()]
        assert np.allclose(row["topk_scores"], np.sort(row_scores)[::-1], atol=1e-5)
        assert np.allclose(row["embedding"], embedding, atol=2e-3)  # float16, unit length
    identity = read_record(str(next((tmp_path / "out").glob("part-*.parquet"))))["identity"]
    assert identity["templates"] == list(TEMPLATES)
    other = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", clip, "--labels",
                    labels_file(tmp_path), check=False)  # fmt: skip
    assert other.returncode == 2 and "templates" in other.stderr  # other prompts: other results, another output


def test_any_number_of_classes_other_sizes_modes_and_a_broken_file(clip, pictures, tmp_path):
    made = mixed(pictures, tmp_path / "mixed")
    labels = [*LABELS, "dog", "bicycle", "mountain"]  # seven classes: a CLIP head is as long as the list
    expected = own_zero_shot(clip, made, labels, ("a photo of a {}.",))[0].argmax(1)
    offline("classify", made[0].parent, "-o", tmp_path / "out", "--model", clip, "--labels", labels_file(tmp_path, labels))
    rows = by_name(read_rows(tmp_path / "out"))
    assert rows["broken.jpg"]["error"] and rows["broken.jpg"]["label"] is None
    agree = [rows[path.name]["label"] == labels[top1] for path, top1 in zip(made, expected)]
    assert sum(agree) >= len(made) - 1, f"top-1 agrees with open_clip (PIL transforms) on {sum(agree)} of {len(made)}"


def test_a_built_in_architecture_with_a_weights_file_takes_its_configs_preprocessing_and_says_so(pictures, tmp_path):
    """open_clip:ViT-B-32 --weights open_clip_pytorch_model.bin, the weights random (nothing is downloaded):
    scores equal open_clip's own with the built-in config's preprocessing (224, bicubic, OpenAI's mean)."""
    torch.manual_seed(3)
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(weights))
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer("ViT-B-32")([f"a photo of a {x}." for x in LABELS]), normalize=True)
        image = model.encode_image(torch.stack([preprocess(Image.open(path)) for path in pictures]), normalize=True)
        scores = (model.logit_scale.exp() * image @ text.T).softmax(1).numpy()
    ran = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", "open_clip:ViT-B-32",
                  "--weights", weights, "--labels", labels_file(tmp_path))  # fmt: skip
    assert "open_clip:ViT-B-32 takes the built-in config's preprocessing: {'resize_shorter_side': 224" in ran.stderr
    rows = by_name(read_rows(tmp_path / "out"))
    for path, row_scores in zip(pictures, scores):
        assert np.allclose(rows[path.name]["topk_scores"], np.sort(row_scores)[::-1], atol=1e-5)


def test_weights_of_another_architecture_are_an_error_naming_the_model(clip, pictures, tmp_path):
    refused = offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", "open_clip:ViT-B-32",
                      "--weights", clip / "open_clip_model.safetensors", "--labels", labels_file(tmp_path),
                      check=False)  # fmt: skip
    assert refused.returncode == 1 and "cannot load open_clip:ViT-B-32 from" in refused.stderr, refused.stderr
    assert not (tmp_path / "out").exists() or not read_rows(tmp_path / "out")


def test_what_a_zero_shot_model_needs_is_asked_for_by_name(clip, pictures, tmp_path):
    bare = tmp_path / "open_clip_pytorch_model.bin"  # weights with no architecture: it would get default preprocessing
    torch.save(load_file(clip / "open_clip_model.safetensors"), bare)
    cases = {
        ("--model", bare, "--labels", labels_file(tmp_path)): "holds weights only (torch.save of a state dict), no network",
        ("--model", clip): "pass --labels FILE",
        ("--model", "open_clip:ViT-B-32", "--labels", labels_file(tmp_path)): "needs its weights: --weights FILE",
        ("--model", "open_clip:", "--weights", clip / "open_clip_model.safetensors", "--labels",
         labels_file(tmp_path)): "open_clip has no built-in architecture ''",
        ("--model", clip, "--labels", labels_file(tmp_path), "--template", "a photo"): "has no {} where the class",
        ("--model", "resnet18", "--weights", "none", "--template", "a {}"): "--template is for zero-shot CLIP models",
    }  # fmt: skip
    for arguments, message in cases.items():
        refused = offline("classify", pictures[0].parent, "-o", tmp_path / "out", *arguments, check=False)
        assert refused.returncode == 2 and message in refused.stderr, (arguments, refused.stderr)
    assert not (tmp_path / "out").exists()


def test_a_hub_cache_folder_is_read_through_its_snapshot_symlinks(clip, pictures, tmp_path):
    cache = as_hub_cache(clip, tmp_path / "models--someone--tiny-clip")
    offline("classify", pictures[0].parent, "-o", tmp_path / "out", "--model", cache, "--labels", labels_file(tmp_path))
    expected = own_zero_shot(clip, pictures, templates=("a photo of a {}.",))[0].argmax(1)
    assert [by_name(read_rows(tmp_path / "out"))[path.name]["label"] for path in pictures] == [LABELS[i] for i in expected]


def test_bench_times_a_zero_shot_model_with_its_labels_and_prompts(clip, pictures, tmp_path):
    """batch bench resolves the model as classify does: a CLIP model needs its class names, and takes prompts."""
    common = ("bench", pictures[0].parent, "--model", clip, "--device", "cpu", "--batch-size", "4", "--workers", "1")
    refused = offline(*common, check=False)
    assert refused.returncode == 2 and "pass --labels FILE" in refused.stderr, refused.stderr
    report = offline(*common, "--labels", labels_file(tmp_path), "--template", "a photo of a {}.", "--template", "a {}").stdout
    assert report.startswith(f"batch bench: {len(pictures)} images from {pictures[0].parent}; open_clip:tiny-clip (tiny-clip) on cpu")
    assert re.search(r"^  end to end +[0-9.]+ images/s", report, re.MULTILINE), report
