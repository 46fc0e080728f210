"""Building blocks of the reverse-distillation student and its embedding.

Layer order and widths follow the official DBFAD implementation (Thomine & Snoussi, 2024), so
that parameter counts and behaviour match the paper's model; note its "conv → ReLU → BN" order.
"""

from __future__ import annotations

import operator
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn


class ConvReluBn(nn.Sequential):
    """k×k convolution (no bias) → ReLU → BatchNorm, the paper's projection unit."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(out_ch),
        )


class ChannelAttention(nn.Module):
    """Three 1×1 convolutions; the softmax over the last (width) axis of the third gates the first."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 1)
        self.conv3 = nn.Conv2d(out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.relu(self.conv1(x))
        gate = torch.softmax(self.conv3(F.relu(self.conv2(x1))), dim=-1)
        return gate * x1


class SpatialAttention(nn.Module):
    """3×3 conv + ReLU, then a 3×3 conv whose softmax over the last axis gates the first."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.relu(self.conv1(x))
        return torch.softmax(self.conv2(x1), dim=-1) * x1


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al., 2018): each channel scaled by a weight in (0, 1) computed
    from the channels' spatial means through a bottleneck of `channels // ratio`."""

    def __init__(self, channels: int, ratio: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // ratio)
        self.fc2 = nn.Linear(channels // ratio, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * weights[:, :, None, None]


class SSPCAB(nn.Module):
    """Self-supervised predictive convolutional attention block (Ristea et al., 2022).

    Four k×k kernels sit at the corners of a masked window; their sum is what the block
    "predicts" for the hidden centre, followed by squeeze-and-excitation.
    """

    def __init__(
        self, channels: int, kernel_dim: int = 1, dilation: int = 1, ratio: int = 8
    ) -> None:
        super().__init__()
        self.pad = kernel_dim + dilation
        self.border = kernel_dim + 2 * dilation + 1
        self.corners = nn.ModuleList(nn.Conv2d(channels, channels, kernel_dim) for _ in range(4))
        self.se = SqueezeExcitation(channels, ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, b = self.pad, self.border
        x = F.pad(x, (p, p, p, p))
        windows = (x[:, :, :-b, :-b], x[:, :, b:, :-b], x[:, :, :-b, b:], x[:, :, b:, b:])
        x = reduce(operator.add, (conv(w) for conv, w in zip(self.corners, windows, strict=True)))
        return self.se(F.relu(x))


def _upsample_2x(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2, bias=False)


class ReverseBasicBlock(nn.Module):
    """ResNet basic block run backwards: a 2×2 transposed conv (stride 2) replaces the strided conv."""

    def __init__(self, in_ch: int, out_ch: int, upsample: bool = False) -> None:
        super().__init__()
        if upsample:
            self.conv1: nn.Module = _upsample_2x(in_ch, out_ch)
        else:
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if upsample or in_ch != out_ch:
            shortcut_conv = (
                _upsample_2x(in_ch, out_ch) if upsample else nn.Conv2d(in_ch, out_ch, 1, bias=False)
            )
            self.shortcut = nn.Sequential(shortcut_conv, nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def reverse_stage(in_ch: int, out_ch: int, upsample: bool, blocks: int = 2) -> nn.Sequential:
    layers = [ReverseBasicBlock(in_ch, out_ch, upsample)]
    layers += [ReverseBasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)
