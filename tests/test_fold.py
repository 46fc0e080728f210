"""Folding BatchNorms and activations into convolutions for eager scoring (distill/fold.py): the
same features (bitwise for the activations, in float32 and bf16), no BatchNorm left where a
convolution feeds it, nothing folded or fused that another reader needs, and the detector's own
model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distill.fold import ConvActivation2d, fold_batch_norms, folded_copy, fuse_activations
from distill.inference import Detector, bf16_supported
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, build_teacher
from distill.torch_model import ReverseDistillation


def _randomised(net: nn.Module) -> nn.Module:
    """BatchNorm statistics away from 0 / 1, so a wrong fold shows."""
    generator = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(shape, generator=generator) * 0.2)
    return net.eval()


def _batch_norms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


@pytest.mark.parametrize("name", ["efficientnet_lite1", "resnet18"])
def test_a_teacher_folds_whole_and_gives_the_same_features(name):
    backbone = _randomised(build_teacher(name, "random").backbone)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    example = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    folded = fold_batch_norms(backbone, example)
    assert folded is not backbone and _batch_norms(folded) == 0 < _batch_norms(backbone)
    x = torch.randn(3, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for e, g in zip(backbone(x), folded(x), strict=True):
            assert (e - g).abs().max() <= 1e-5 * e.abs().max()
    after = backbone.state_dict()  # the original keeps its BatchNorms and weights
    assert all(torch.equal(before[k], after[k]) for k in before)


class _ConvReadTwice(nn.Module):
    """A convolution's output read by a BatchNorm and by an addition: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.conv(x)
        return [self.bn(y) + y]


def test_a_convolution_another_op_also_reads_is_not_folded():
    net = _randomised(_ConvReadTwice())
    assert fold_batch_norms(net, torch.randn(2, 3, 16, 16)) is net


def test_the_detector_scores_folded_and_keeps_its_model_whole():
    torch.manual_seed(0)
    model = ReverseDistillation(build_teacher("efficientnet_lite0", "random"))
    _randomised(model.student)
    detector = Detector(model, IMAGENET_MEAN, IMAGENET_STD, precision="fp32", batch_size=4)
    assert _batch_norms(detector.model) == _batch_norms(model) > 0  # saved and hashed as it is
    tiles = np.random.default_rng(0).integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    folded = detector.predict(tiles).maps
    with torch.inference_mode():
        x = (
            (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255)
            .sub(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            .div(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        )
        reference = model.eval()(x).numpy()
    np.testing.assert_allclose(folded, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())
    copy = folded_copy(model)
    assert _batch_norms(copy.teacher) == 0
    # the decoder's conv → BN fold; the projection units' conv → ReLU → BN cannot (their ReLU fuses)
    assert 0 < _batch_norms(copy.student) < _batch_norms(model.student)
    assert _fused(copy.teacher) > 0 and _fused(copy.student) > 0


def _fused(net: nn.Module) -> int:
    return sum(isinstance(m, ConvActivation2d) for m in net.modules())


def _bf16_cases() -> list[bool]:
    return [False, True] if bf16_supported(torch.device("cpu")) else [False]


@pytest.mark.parametrize("name", ["efficientnet_lite1", "resnet18"])
def test_activations_fuse_into_a_folded_teacher_with_the_same_bits(name):
    backbone = _randomised(build_teacher(name, "random").backbone)
    example = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    folded = fold_batch_norms(backbone, example)
    fused = fuse_activations(folded, example)
    assert _fused(fused) > 0 and _fused(folded) == 0  # a copy; the folded net stays as it was
    if name.startswith("efficientnet"):  # every ReLU6 follows a convolution there
        relu6 = sum(isinstance(m, nn.ReLU6) for m in fused.modules())
        assert relu6 == sum(
            isinstance(getattr(m, "activation", None), nn.ReLU6) for m in fused.modules()
        )
    x = torch.randn(4, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    x = x.contiguous(memory_format=torch.channels_last)
    for bf16 in _bf16_cases():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            for e, g in zip(folded(x), fused(x), strict=True):
                assert e.dtype == g.dtype and torch.equal(e, g)


class _ReluCalledTwice(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module after a convolution and after a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.relu(self.conv2(self.relu(self.conv1(x))) + x)]


class _ConvReadByReluAndSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.conv(x)
        return [self.relu(y) + y]


class _SamePadding(nn.Module):
    """A convolution padded by the string "same", which oneDNN's op cannot take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.relu(self.conv(x))]


@pytest.mark.parametrize("net", [_ReluCalledTwice, _ConvReadByReluAndSum, _SamePadding])
def test_a_reused_activation_a_conv_read_twice_or_string_padding_is_not_fused(net):
    net = net().eval()
    assert fuse_activations(net, torch.randn(2, 3, 16, 16)) is net


def test_a_fused_convolution_trains_unfused():
    conv, relu = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6()
    fused = ConvActivation2d(conv, relu)
    x = torch.randn(2, 3, 8, 8) * 10
    fused(x).sum().backward()  # the oneDNN op has no gradient: with one wanted, conv then clamp
    expected = conv.weight.grad.clone()
    conv.weight.grad = None
    relu(conv(x)).sum().backward()
    assert torch.equal(conv.weight.grad, expected)
    with torch.no_grad():
        assert torch.equal(fused(x), relu(conv(x))) and fused(x).max() == 6
