"""Reverse-distillation student (residual and DG variants) around a frozen teacher.

The student is built from the teacher's channel list. Its internal widths are the paper's
(64, 64, 128, 256 per level, 512 at the bottleneck) whatever the teacher; a narrower or wider
teacher is adapted at the edges only — the embedding's first convolutions take the teacher's
channels and a 1×1 head maps each student output back to them. (Shrinking the student to a
narrow teacher's widths was measured to stall training: DESIGN.md, "Model".)
"""

from __future__ import annotations

import operator
from functools import reduce
from typing import Literal

import torch
from torch import nn

from distill.anomaly_map import AnomalyMap, EdgeTiles, MapFusion
from distill.blocks import SSPCAB, ChannelAttention, ConvReluBn, SpatialAttention, reverse_stage
from distill.memory_bank import MemoryBank
from distill.teacher import Teacher

Variant = Literal["residual", "dg"]
VARIANTS: tuple[str, ...] = ("residual", "dg")
LEVEL_WIDTHS = (64, 64, 128, 256)
BOTTLENECK_WIDTH = 512


class Embedding(nn.Module):
    """Projects the four teacher levels to stride 32 and fuses them (the paper's bottleneck)."""

    def __init__(self, teacher_channels: tuple[int, ...]) -> None:
        super().__init__()
        c0, c1, c2, c3 = teacher_channels
        self.level0 = nn.Sequential(ConvReluBn(c0, 128, stride=2), ConvReluBn(128, 256, stride=2))
        self.level1 = nn.Sequential(ConvReluBn(c1, 128, stride=2), ConvReluBn(128, 256, stride=2))
        self.level2 = ConvReluBn(c2, 256, stride=2)
        self.level3 = ConvReluBn(c3, 256)
        self.fuse = nn.Sequential(
            ConvReluBn(256, 256),
            ConvReluBn(256, 256),
            ConvReluBn(256, BOTTLENECK_WIDTH, stride=2),
            SSPCAB(BOTTLENECK_WIDTH),
        )
        self.attention = SpatialAttention(BOTTLENECK_WIDTH)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        projections = (self.level0, self.level1, self.level2, self.level3)
        # reduce, not sum(): sum's leading `0 +` is an op of its own to export and quantize
        x = reduce(operator.add, (p(level) for p, level in zip(projections, levels, strict=True)))
        return self.attention(self.fuse(x))


class ResidualBranch(nn.Sequential):
    """3×3 conv → ReLU → BN from a teacher level, pooled to the target stride, channel attention."""

    def __init__(self, in_ch: int, out_ch: int, downsample: bool) -> None:
        layers: list[nn.Module] = [ConvReluBn(in_ch, out_ch, kernel_size=3)]
        if downsample:
            layers.append(nn.AvgPool2d(2))
        layers.append(ChannelAttention(out_ch, out_ch))
        super().__init__(*layers)


class Student(nn.Module):
    """Embedding + reversed ResNet decoder; returns features aligned with [L0, L1, L2, L3]."""

    def __init__(self, teacher_channels: tuple[int, ...], variant: Variant = "residual") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.embedding = Embedding(teacher_channels)
        w0, w1, w2, w3 = LEVEL_WIDTHS
        # stage k produces the student's estimate of teacher level 3 - k
        self.stages = nn.ModuleList(
            [
                reverse_stage(BOTTLENECK_WIDTH, w3, upsample=True),
                reverse_stage(w3, w2, upsample=True),
                reverse_stage(w2, w1, upsample=True),
                reverse_stage(w1, w0, upsample=False),
            ]
        )
        self.residuals = nn.ModuleList()
        if variant == "residual":
            # teacher L2 → after stage 0, L1 → after stage 1, L0 → after stage 2
            c0, c1, c2, _ = teacher_channels
            self.residuals.extend(
                [
                    ResidualBranch(c2, w3, downsample=True),
                    ResidualBranch(c1, w2, downsample=True),
                    ResidualBranch(c0, w1, downsample=False),
                ]
            )
        self.heads = nn.ModuleList(
            nn.Identity() if width == ch else nn.Conv2d(width, ch, 1)
            for width, ch in zip(LEVEL_WIDTHS, teacher_channels, strict=True)
        )

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        x = self.embedding(levels)
        outputs = []
        for k, stage in enumerate(self.stages):
            x = stage(x)
            if k < len(self.residuals):
                x = x + self.residuals[k](levels[2 - k])
            outputs.append(x)
        outputs.reverse()  # now ordered like the teacher: L0, L1, L2, L3
        return [head(out) for head, out in zip(self.heads, outputs, strict=True)]


class ReverseDistillation(nn.Module):
    """Teacher + student (+ an optional memory bank over the teacher's features).

    Training mode returns both feature lists; eval mode the anomaly map, which `fusion` makes
    from the student's map, the memory bank's, or both.
    """

    def __init__(self, teacher: Teacher, variant: Variant = "residual", sigma: float = 4.0) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = Student(teacher.channels, variant)
        self.anomaly_map = AnomalyMap(sigma=sigma)
        self.memory: MemoryBank | None = None
        self.fusion = MapFusion()

    def set_scoring(self, memory: MemoryBank | None, fusion: MapFusion) -> None:
        """Attach a memory bank (on the model's device) and the fusion that uses it."""
        if fusion.uses_memory and memory is None:
            raise ValueError("this fusion uses the memory bank, but the model has none")
        device = next(self.student.parameters()).device
        self.memory = None if memory is None else memory.to(device)
        self.fusion = fusion

    def maps(
        self,
        teacher_features: list[torch.Tensor],
        student_features: list[torch.Tensor] | None,
        size: tuple[int, int],
        edges: EdgeTiles | None = None,
    ) -> torch.Tensor:
        """(B, H, W) float32 fused map at `size` (the input's), from the features of one batch;
        `edges`: the tiles holding pixels off the fabric (`AnomalyMap`), None for none."""
        student = memory = None
        if self.fusion.uses_student:
            student = self.anomaly_map(teacher_features, student_features, size, edges)
        if self.fusion.uses_memory:
            grid = self.memory(teacher_features, size)
            memory = self.anomaly_map.upsampled(grid, size, edges)
        return self.fusion(student, memory)

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            teacher_features = self.teacher(x)
        return teacher_features, self.student(teacher_features)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | torch.Tensor:
        teacher_features, student_features = self.features(x)
        if self.training:
            return teacher_features, student_features
        return self.maps(teacher_features, student_features, tuple(x.shape[-2:]))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
