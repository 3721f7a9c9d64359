"""The network as it runs (batch/network.py): folded, the same answers; the head in fp32 under autocast."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from batch import models, network
from batch.inference import Classifier
from tests.conftest import run_batch


def randomised_statistics(model: nn.Module) -> nn.Module:
    """Untrained statistics are 0 and 1: make folding do real work."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def test_folding_batch_norm_keeps_the_answers():
    model = randomised_statistics(torchvision.models.mobilenet_v3_small())
    pictures = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        expected = model(pictures)
        folded = network.prepare(model, 224)
        assert batch_norms(folded) == 0 and batch_norms(model) == 34, "folded in a copy; the model as built is kept"
        torch.testing.assert_close(folded(pictures), expected, rtol=1e-4, atol=1e-4)


def test_the_default_models_batch_norms_are_folded_though_its_convolutions_are_a_subclass():
    """EfficientNet-Lite0 pads in a subclass of nn.Conv2d, which torch.fx's own fuse does not match."""
    spec = models.resolve()
    built = spec.load()
    assert batch_norms(built) == 49
    prepared = network.prepare(built, spec.preprocess.crop)
    assert batch_norms(prepared) == 0
    pictures = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(pictures), built(pictures), rtol=1e-4, atol=1e-4)


def test_timms_batch_norms_that_also_activate_are_folded_and_still_activate():
    """timm's BatchNormAct2d normalises, then activates: folded, the activation stays where the norm was."""
    import timm

    built = randomised_statistics(timm.create_model("mobilenetv3_small_050"))
    assert batch_norms(built) == 34
    prepared = network.prepare(built, 224)
    assert batch_norms(prepared) == 0
    pictures = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(pictures), built(pictures), rtol=1e-4, atol=1e-4)


class BiasIgnored(nn.Conv2d):
    """A convolution whose forward never adds `self.bias`: folding a batch norm into it would be wrong."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.conv2d(inputs, self.weight, None, self.stride, self.padding)


def test_a_convolution_that_folding_would_change_is_left_as_built():
    model = randomised_statistics(nn.Sequential(BiasIgnored(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4)))
    pictures = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(pictures)
        prepared = network.prepare(model, 32)
        assert batch_norms(prepared) == 1
        torch.testing.assert_close(prepared(pictures), expected)


def test_the_head_runs_in_fp32_under_bf16_autocast():
    """bf16 logits come in steps of 0.0625 near 10: the scores would be quantised and near-ties reordered."""
    spec = models.resolve()
    classifier = Classifier(spec, torch.device("cpu"), "bf16", 5, embeddings=True, batch_size=4)
    head = [module for module in classifier.network.modules() if isinstance(module, nn.Linear)][-1]
    seen = {}
    head.register_forward_hook(lambda _module, inputs, output: seen.update(inputs=inputs[0], logits=output))
    pixels = torch.randint(0, 256, (4, 224, 224, 3), dtype=torch.uint8)
    answers = classifier.submit(pixels).result()
    assert seen["inputs"].dtype == seen["logits"].dtype == torch.float32
    with torch.inference_mode():
        expected = F.linear(seen["inputs"], head.weight, head.bias).softmax(dim=1).topk(5, dim=1).values
    np.testing.assert_allclose(answers.topk_scores, expected.numpy(), rtol=1e-5)


def test_embeddings_under_bf16_keep_more_than_bf16s_bits(photos, tmp_path):
    """The pooling that makes them runs in fp32 too: stored as float16, most values are not bf16 values."""
    run_batch("classify", photos, "-o", tmp_path / "out", "--device", "cpu", "--precision", "bf16", "--embeddings")
    vectors = np.array(ds.dataset(tmp_path / "out").to_table().column("embedding").to_pylist(), np.float32)
    as_bf16 = torch.from_numpy(vectors).to(torch.bfloat16).float().numpy()
    nonzero = vectors != 0  # a channel that ReLU6 zeroed everywhere pools to an exact 0 in any precision
    assert vectors.shape == (3, 1280) and np.mean(vectors[nonzero] == as_bf16[nonzero]) < 0.5
