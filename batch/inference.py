"""The model stage: uint8 batches in, top-k classes (and optionally embeddings) out.

Pixels arrive as uint8 NHWC, which is NCHW in channels_last memory; they are copied to the device as
uint8 (a quarter of the bytes of float32) and normalised there.

On a GPU, `submit` only queues the work and returns: the pixels are copied on a stream of their own
into one of a few device buffers of a whole batch each, the network runs on them there, and the
answers come back into page-locked memory; `Pending.result` waits for them. So the caller can hand
over the next batch, and build and write the rows of the last, while the GPU computes. Every batch
runs padded to the batch size, so cuDNN's autotuner (`cudnn.benchmark`) picks its kernels once.
On the CPU, `submit` computes at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from batch import network as networks
from batch.devices import PRECISIONS
from batch.models import ModelError, ModelSpec

IN_FLIGHT = 2  # batches queued on the GPU beyond the one being handed over


@dataclass
class Predictions:
    topk_ids: np.ndarray  # (n, k) int32
    topk_scores: np.ndarray  # (n, k) float32, descending
    embeddings: np.ndarray | None  # (n, d) float16


class Pending:
    """A batch's answers, once the device has them."""

    def __init__(self, answers: tuple[torch.Tensor, ...], done: torch.cuda.Event | None = None):
        self._answers, self._done = answers, done

    def result(self) -> Predictions:
        if self._done is not None:
            self._done.synchronize()
        ids, scores, *features = (answer.numpy() for answer in self._answers)
        return Predictions(ids, scores, features[0] if features else None)


class _Lane:
    """A device buffer of a whole batch of pixels, and when the work that last read it was done."""

    def __init__(self, device: torch.device, batch_size: int, crop: int):
        self.pixels = torch.zeros((batch_size, crop, crop, 3), dtype=torch.uint8, device=device)
        self.done: torch.cuda.Event | None = None


class Classifier:
    def __init__(self, spec: ModelSpec, device: torch.device, precision: str, topk: int, embeddings: bool,
                 batch_size: int):  # fmt: skip
        self.device = device
        self.precision = precision
        self.topk = min(topk, len(spec.labels))
        self.activation = spec.activation
        # channels_last matches the NHWC pixels and doubles EfficientNet-Lite0 even on CPU (15.6 -> 31 images/s).
        built = networks.prepare(spec.load(device), spec.preprocess.crop)
        self.network = built.to(device, memory_format=torch.channels_last)
        preprocess = spec.preprocess
        # (pixel - mean) / std as pixel * scale + shift, applied along whole rows of RGBRGB... so the
        # arithmetic runs over long contiguous stretches: 3x faster than broadcasting over 3 channels.
        self.scale = 1 / torch.tensor(preprocess.std, device=device)
        self.shift = -torch.tensor(preprocess.mean, device=device) * self.scale
        self._features: torch.Tensor | None = None
        if embeddings:
            self._hook_penultimate_layer(spec.name)
        self._lanes: list[_Lane] = []
        if device.type == "cuda":
            torch.set_num_threads(1)  # this process only launches kernels; the cores decode
            torch.backends.cudnn.benchmark = True  # every batch has the same shape: padded to batch_size
            self._copies = torch.cuda.Stream(device)
            self._lanes = [_Lane(device, batch_size, preprocess.crop) for _ in range(IN_FLIGHT + 1)]
            self._turn = 0

    def _hook_penultimate_layer(self, name: str) -> None:
        """The embedding is the input of the last Linear layer, the classifier head, in every model we build."""
        heads = [module for module in self.network.modules() if isinstance(module, torch.nn.Linear)]
        if not heads:
            raise ModelError(f"--embeddings is not available for {name}: it has no linear classifier head")

        def keep_input(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            self._features = inputs[0].flatten(1)

        heads[-1].register_forward_pre_hook(keep_input)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    @torch.inference_mode()
    def submit(self, pixels: torch.Tensor) -> Pending:
        """Start classifying uint8 (n, h, w, 3). When it returns, the pixels have been read: their memory
        may be reused, though on a GPU the answers may still be on their way."""
        if not self._lanes:
            return Pending(self._classify(pixels, len(pixels)))
        lane = self._lanes[self._turn]
        self._turn = (self._turn + 1) % len(self._lanes)
        count = len(pixels)
        with torch.cuda.stream(self._copies):
            if pixels.is_cuda:  # decoded on the device (decode_device.py): by work queued on this stream
                self._copies.wait_stream(torch.cuda.current_stream(self.device))
            if lane.done is not None:
                self._copies.wait_event(lane.done)  # the batch that last used this buffer has been read
            lane.pixels[:count].copy_(pixels, non_blocking=True)
            copied = torch.cuda.Event(blocking=True)  # waiting threads sleep: the cores decode
            copied.record()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        answers = tuple(self._to_host(answer) for answer in self._classify(lane.pixels, count))
        lane.done = torch.cuda.Event(blocking=True)
        lane.done.record(compute)
        copied.synchronize()  # the pixels' own memory (a worker's slot) is free again
        return Pending(answers, lane.done)

    @staticmethod
    def _to_host(answer: torch.Tensor) -> torch.Tensor:
        host = torch.empty(answer.shape, dtype=answer.dtype, pin_memory=True)
        return host.copy_(answer, non_blocking=True)

    def _classify(self, pixels: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
        """Top-k ids and scores (and features) of the first `count` pictures of a batch on the device."""
        batch, height, width, channels = pixels.shape
        rows = pixels.to(self.device).reshape(batch * height, width * channels).float()
        rows.mul_(self.scale.repeat(width)).add_(self.shift.repeat(width))
        inputs = rows.view(batch, height, width, channels).permute(0, 3, 1, 2)  # NCHW in channels_last memory
        with self._autocast():
            logits = self.network(inputs)
        if isinstance(logits, (tuple, list)):  # some models return (logits, aux)
            logits = logits[0]
        logits = logits[:count].float()
        scores = logits.sigmoid() if self.activation == "sigmoid" else logits.softmax(dim=1)
        scores, ids = scores.topk(self.topk, dim=1)
        answers = (ids.to(torch.int32), scores)
        if self._features is not None:
            answers += (self._features[:count].to(torch.float16),)
            self._features = None
        return answers
