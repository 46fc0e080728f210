"""Folding a frozen network's BatchNorms and activations into the convolutions that feed them,
for eager inference.

In eval mode a BatchNorm is an affine map per channel, so conv → BN is one convolution with
scaled weights and a bias. Eager PyTorch runs them as two passes over the activations: on a
2-core CPU the lite teachers' BatchNorms took 37 % of their forward pass (docs/benchmarks.md).
The ReLU6 after them is a third pass over the inverted residuals' expanded tensors (26 % of
the default detector's profile on a CPU with AMX; fusing it gained 7–8 %): on the CPU oneDNN
applies it in the convolution's epilogue instead, with the same bits (a clamp commutes with
rounding to bf16).
torch.compile with freezing and OpenVINO fold both on their own; this is for the eager path, and
for the frozen teacher of a bf16 training run (`distill.train.Trainer`).
"""

from __future__ import annotations

import copy

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# folded outputs must match the original's to this fraction of their largest magnitude
_TOLERANCE = 1e-4
# the activations oneDNN can apply in a convolution's epilogue: (its name there, its scalars)
_EPILOGUES = {nn.ReLU: ("relu", []), nn.ReLU6: ("hardtanh", [0.0, 6.0])}
# the private op torch.compile's CPU fusions call (torch pinned in pyproject); absent elsewhere
_CONV_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
# bf16 where oneDNN runs it natively (as the bf16 detector does); other dtypes run unfused
_FUSED_DTYPES = (torch.float32,) + (
    (torch.bfloat16,)
    if _CONV_POINTWISE is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    else ()
)


class ConvActivation2d(nn.Module):
    """A convolution and the ReLU or ReLU6 that reads its output, run as one oneDNN primitive on
    the CPU in inference (autocast's dtype applied as autocast would: input, weight and bias
    cast); elsewhere, in other dtypes, or where gradients are wanted, the two modules one after
    the other."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module) -> None:
        super().__init__()
        self.conv, self.activation = conv, activation
        self.epilogue, self.scalars = _EPILOGUES[type(activation)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        grad = torch.is_grad_enabled() and conv.weight.requires_grad
        if x.device.type != "cpu" or grad or dtype not in _FUSED_DTYPES:
            return self.activation(conv(x))
        bias = None if conv.bias is None else conv.bias.to(dtype)
        return _CONV_POINTWISE(
            x.to(dtype), conv.weight.to(dtype), bias, conv.padding, conv.stride,
            conv.dilation, conv.groups, self.epilogue, self.scalars, "",
        )  # fmt: skip


def _conv_readers(
    net: nn.Module, example: torch.Tensor, reader_types: tuple[type, ...]
) -> tuple[list[tuple[str, str]], dict[nn.Module, int]]:
    """(conv, reader) module names where a module of `reader_types` reads that convolution's
    output, by one traced forward pass (module order alone does not say which tensor a module
    reads), and how many times each of them ran."""
    names = {module: name for name, module in net.named_modules()}
    # output id → (conv, the output kept alive so that its id stays unique, its version)
    produced: dict[int, tuple[nn.Module, torch.Tensor, int]] = {}
    calls: dict[nn.Module, int] = {}
    pairs = []

    def conv_hook(module, _inputs, output) -> None:
        calls[module] = calls.get(module, 0) + 1
        produced[id(output)] = (module, output, output._version)

    def reader_hook(module, inputs) -> None:
        calls[module] = calls.get(module, 0) + 1
        source = produced.get(id(inputs[0]))
        # the same tensor, not changed in place since (an in-place ReLU between them)
        if source is not None and source[1] is inputs[0] and source[2] == inputs[0]._version:
            pairs.append((names[source[0]], names[module]))

    hooks = [m.register_forward_hook(conv_hook) for m in net.modules() if type(m) is nn.Conv2d]
    hooks += [
        m.register_forward_pre_hook(reader_hook) for m in net.modules() if type(m) in reader_types
    ]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs, calls


def _conv_bn_pairs(net: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, BN) module names where the BN's input is that convolution's output."""
    pairs, _ = _conv_readers(net, example, (nn.BatchNorm2d, BatchNormAct2d))
    used = [conv for conv, _ in pairs]
    return [(c, b) for c, b in pairs if used.count(c) == 1]  # a conv feeding one BN only


def _conv_activation_pairs(net: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, activation) module names where the activation reads that convolution's output
    and each runs once (a module called twice cannot be replaced by one of them)."""
    pairs, calls = _conv_readers(net, example, tuple(_EPILOGUES))
    return [
        (c, a) for c, a in pairs if calls[net.get_submodule(a)] == 1 and _fusable(net, c, calls)
    ]


def _fusable(net: nn.Module, conv_name: str, calls: dict[nn.Module, int]) -> bool:
    """Whether oneDNN's op can stand for this convolution: called once, zero-padded by
    numbers (the op takes no "same" or "valid" string)."""
    conv = net.get_submodule(conv_name)
    return calls[conv] == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _same_outputs(
    net: nn.Module, other: nn.Module, example: torch.Tensor, tolerance: float
) -> bool:
    """Whether `other`'s outputs (feature levels, or a batch's samples) on `example` match
    `net`'s within `tolerance` of their largest magnitude."""
    with torch.no_grad():
        expected, got = net(example), other(example)
    return all(
        (e.float() - g.float()).abs().max() <= tolerance * e.float().abs().max()
        for e, g in zip(expected, got, strict=True)
    )


def fuse_activations(net: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of the eval-mode `net` with each ReLU or ReLU6 that reads a convolution's output
    applied by the convolution (`ConvActivation2d`). Returns `net` itself where the op is
    missing, `net` is not on the CPU, nothing fuses, or the copy's outputs are not
    bitwise `net`'s, in float32 and under bf16 autocast: a bf16 detector reads a memory bank's
    twin, made by the unfused teacher."""
    if _CONV_POINTWISE is None or next(net.parameters()).device.type != "cpu":
        return net
    fused = copy.deepcopy(net).eval()
    pairs = _conv_activation_pairs(fused, example)
    if not pairs:
        return net
    for conv_name, activation_name in pairs:
        conv, activation = fused.get_submodule(conv_name), fused.get_submodule(activation_name)
        _set(fused, conv_name, ConvActivation2d(conv, activation))
        _set(fused, activation_name, nn.Identity())
    for bf16 in (False, True) if torch.bfloat16 in _FUSED_DTYPES else (False,):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if not _same_outputs(net, fused, example, tolerance=0.0):
                return net
    return fused


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
    return folded if _same_outputs(net, folded, example, _TOLERANCE) else net


def folded_copy(model: nn.Module) -> nn.Module:
    """A copy of a `ReverseDistillation` for eager scoring with the BatchNorms of teacher and
    student folded where a convolution feeds them, and the ReLUs after them fused on the CPU
    (the original stays as it is: it trains, saves and hashes its weights). The student's
    projection units put a ReLU between convolution and BatchNorm (conv → ReLU → BN): the
    ReLU fuses, the BatchNorm stays."""
    device = next(model.parameters()).device
    example = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        features = model.teacher(example)
    folded = {
        id(part): fuse_activations(fold_batch_norms(part, example_in), example_in)
        for part, example_in in ((model.teacher.backbone, example), (model.student, features))
    }
    # the rest copied around the folded parts (already copies), not copied a second time
    return copy.deepcopy(model, {k: v for k, v in folded.items() if id(v) != k})
