"""Folding a frozen network's BatchNorms into the convolutions that feed them, for eager inference.

In eval mode a BatchNorm is an affine map per channel, so conv → BN is one convolution with
scaled weights and a bias. Eager PyTorch runs them as two passes over the activations: on a
2-core CPU the lite teachers' BatchNorms took 37 % of their forward pass (docs/benchmarks.md).
torch.compile with freezing and OpenVINO fold them on their own; this is for the eager path.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# folded outputs must match the original's to this fraction of their largest magnitude
_TOLERANCE = 1e-4


def _conv_bn_pairs(net: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, BN) module names where the BN's input is that convolution's output, by one traced
    forward pass (module order alone does not say which tensor a module reads)."""
    names = {module: name for name, module in net.named_modules()}
    # output id → (conv, the output kept alive so that its id stays unique, its version)
    produced: dict[int, tuple[nn.Module, torch.Tensor, int]] = {}
    pairs = []

    def conv_hook(module, _inputs, output) -> None:
        produced[id(output)] = (module, output, output._version)

    def bn_hook(module, inputs) -> None:
        source = produced.get(id(inputs[0]))
        # the same tensor, not changed in place since (an in-place ReLU between them)
        if source is not None and source[1] is inputs[0] and source[2] == inputs[0]._version:
            pairs.append((names[source[0]], names[module]))

    hooks = [m.register_forward_hook(conv_hook) for m in net.modules() if type(m) is nn.Conv2d]
    hooks += [
        m.register_forward_pre_hook(bn_hook)
        for m in net.modules()
        if type(m) in (nn.BatchNorm2d, BatchNormAct2d)
    ]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for hook in hooks:
            hook.remove()
    used = [conv for conv, _ in pairs]
    return [(c, b) for c, b in pairs if used.count(c) == 1]  # a conv feeding one BN only


def _set(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def fold_batch_norms(net: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of the eval-mode `net` with each BatchNorm fed by a convolution folded into it
    (timm's BatchNormAct2d keeps its activation). Returns `net` itself when nothing folds or
    when the copy's outputs on `example` differ from the original's beyond rounding: a
    convolution whose output something else also reads cannot be folded, and hooks cannot see
    a functional reader."""
    folded = copy.deepcopy(net).eval()
    pairs = _conv_bn_pairs(folded, example)
    if not pairs:
        return net
    for conv_name, bn_name in pairs:
        bn = folded.get_submodule(bn_name)
        _set(folded, conv_name, fuse_conv_bn_eval(folded.get_submodule(conv_name), bn))
        after = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
        _set(folded, bn_name, after)
    with torch.no_grad():
        expected, got = net(example), folded(example)
    for e, g in zip(expected, got, strict=True):  # the feature levels, or a batch's samples
        if (e - g).abs().max() > _TOLERANCE * e.abs().max():
            return net
    return folded


def folded_copy(model: nn.Module) -> nn.Module:
    """A copy of a `ReverseDistillation` for eager scoring with the BatchNorms of teacher and
    student folded where a convolution feeds them (the original stays as it is: it trains,
    saves and hashes its weights). The student's projection units put a ReLU between
    convolution and BatchNorm (conv → ReLU → BN): those stay."""
    device = next(model.parameters()).device
    example = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        features = model.teacher(example)
    folded = {
        id(part): fold_batch_norms(part, example_in)
        for part, example_in in ((model.teacher.backbone, example), (model.student, features))
    }
    # the rest copied around the folded parts (already copies), not copied a second time
    return copy.deepcopy(model, {k: v for k, v in folded.items() if id(v) != k})
