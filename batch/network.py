"""The network as it runs: batch norm folded into the convolutions, the head kept in fp32, checked.

- Folding makes each BatchNorm after a convolution part of that convolution's weights: the same
  answers, one pass over memory fewer. torch.fx's own `fuse` matches exact classes only, so it folded
  nothing in EfficientNet-Lite0, whose convolutions are a padding subclass of `nn.Conv2d`: here any
  subclass is folded, and the answers are checked against the unfolded network on a sample batch.
- Under bf16 or fp16 autocast, the classifier head and the global pooling that feeds it run in fp32:
  bf16 logits come in steps of 0.0625 near 10, which quantises the scores and reorders near-ties,
  and the embeddings (the head's input) would keep only bf16's 8 bits.
A network that cannot be traced, or that answers differently once folded, runs unfolded.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

log = logging.getLogger(__name__)

GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
SAMPLE_BATCH = 2
SAMPLE_SIDE = 160
TOLERANCE = 1e-3  # of the largest logit: folding reorders float sums, and no more


def prepare(network: nn.Module, crop: int) -> nn.Module:
    """The network to run, from the one built (which it leaves untouched)."""
    if isinstance(network, torch.jit.ScriptModule):
        return network  # a TorchScript file: neither traceable nor made of modules we may swap
    folded = fold_batch_norm(network)
    if folded is not network and not _answers_alike(network, folded, crop):
        folded = network
    return in_fp32(folded, head_layers(network))


def _answers_alike(network: nn.Module, changed: nn.Module, crop: int) -> bool:
    """Whether both answer the same on a sample batch; folded networks are convolutional, so a
    sample smaller than the crop tells as well, in less time on the CPU."""
    side = min(crop, SAMPLE_SIDE)
    sample = torch.randn(SAMPLE_BATCH, 3, side, side, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            expected, got = network(sample), changed(sample)
    except Exception as error:  # noqa: BLE001 - a network that takes no sample of this size
        log.debug("batch norm not folded in %s: the sample could not be checked (%s)", type(network).__name__, error)
        return False
    if not _close(got, expected):
        log.warning("batch norm not folded in %s: folded, it answers differently", type(network).__name__)
        return False
    return True


def _close(got: torch.Tensor | tuple, expected: torch.Tensor | tuple) -> bool:
    got, expected = (value[0] if isinstance(value, (tuple, list)) else value for value in (got, expected))
    scale = float(expected.abs().max()) or 1.0
    return got.shape == expected.shape and float((got - expected).abs().max()) <= TOLERANCE * scale


class _ConvolutionsWhole(fx.Tracer):
    """Keeps every convolution one node, subclasses too (EfficientNet-Lite's pads before it convolves)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) or super().is_leaf_module(
            module, qualified_name
        )


def fold_batch_norm(network: nn.Module) -> nn.Module:
    """A traced copy with each BatchNorm that alone follows a convolution folded into it; the network
    itself when there is none, or when torch.fx cannot trace it (data-dependent control flow)."""
    if not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in network.modules()):
        return network
    try:
        traced = fx.GraphModule(network, _ConvolutionsWhole().trace(network))
    except Exception as error:  # noqa: BLE001 - fx raises many kinds for untraceable code
        log.debug("batch norm not folded, %s cannot be traced: %s", type(network).__name__, error)
        return network
    modules = dict(traced.named_modules())
    folded = 0
    for node in list(traced.graph.nodes):
        convolution = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm) and isinstance(convolution, fx.Node)
                and convolution.op == "call_module" and len(convolution.users) == 1
                and isinstance(modules.get(convolution.target), nn.modules.conv._ConvNd)):  # fmt: skip
            continue
        norm, conv = modules[node.target], copy.deepcopy(modules[convolution.target])
        if norm.running_mean is None or norm.running_var is None:
            continue  # normalises by each batch's own statistics: nothing fixed to fold
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
        traced.set_submodule(convolution.target, conv)  # the copy: the network as built keeps its own
        after = _after_normalising(norm)
        if after is None:
            node.replace_all_uses_with(convolution)
            traced.graph.erase_node(node)
        else:
            traced.set_submodule(node.target, after)  # the node now applies only what follows normalising
        folded += 1
    if not folded:
        return network
    traced.graph.lint()
    traced.recompile()
    traced.delete_all_unused_submodules()
    log.debug("folded %d batch norms of %s", folded, type(network).__name__)
    return traced


def _after_normalising(norm: nn.Module) -> nn.Module | None:
    """What a batch norm layer does after normalising, if anything: timm's BatchNormAct2d, in most of its
    convolutional networks, drops out (nothing, in eval mode) and activates. The sample check confirms it."""
    activation = getattr(norm, "act", None)
    if not isinstance(activation, nn.Module):
        return None
    return nn.Sequential(getattr(norm, "drop", nn.Identity()), activation)


class Float32(nn.Module):
    """Runs its module in fp32 whatever autocast says, on inputs made fp32."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(inputs.device.type, enabled=False):
            return self.module(inputs.float())

    def __getattr__(self, name: str):
        """A forward that reads the wrapped layer's weights (`self.fc.weight`) still finds them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def head_layers(network: nn.Module) -> list[str]:
    """The layers to run in fp32: the head (the last Linear, or every layer of the Sequential block
    holding it) and the last global pooling. Leaves only: a traced network calls them one by one."""
    named = dict(network.named_modules())
    linears = [name for name, module in named.items() if isinstance(module, nn.Linear)]
    if not linears:
        return []
    head = linears[-1]
    parent = head.rpartition(".")[0]
    in_block = parent and isinstance(named[parent], nn.Sequential)
    leaves = [name for name, module in named.items() if not list(module.children())
              and (name.startswith(f"{parent}.") if in_block else name == head)]  # fmt: skip
    pools = [name for name, module in named.items() if isinstance(module, GLOBAL_POOLS)]
    return leaves + pools[-1:]


def in_fp32(network: nn.Module, layers: list[str]) -> nn.Module:
    """A copy of the network whose named layers run in fp32; the network itself when there are none."""
    if not layers:
        return network
    result = _shallow_copy(network)
    for name in layers:
        result.set_submodule(name, Float32(result.get_submodule(name)))
    return result


def _shallow_copy(network: nn.Module) -> nn.Module:
    """A copy whose module tree can be changed without changing the network's; parameters are shared."""
    duplicate = copy.copy(network)
    duplicate._modules = {name: _shallow_copy(child) for name, child in network._modules.items()}
    return duplicate
