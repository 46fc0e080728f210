"""Distillation loss: per level, the mean over positions of 1 − cosine similarity over channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pairs → (B, H, W) of 1 − cos, computed in float32 whatever the autocast dtype."""
    return 1.0 - F.cosine_similarity(teacher.float(), student.float(), dim=1)


class DistillationLoss(nn.Module):
    """Weighted mean over levels of the mean 1 − cos.

    The official code weights levels equally; the paper speaks of adaptive factors, so the
    weights are a parameter (normalised to sum to one).
    """

    def __init__(self, level_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        super().__init__()
        weights = torch.as_tensor(level_weights, dtype=torch.float32)
        if weights.ndim != 1 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"level weights must be non-negative, not all zero: {level_weights}")
        self.register_buffer("weights", weights / weights.sum())

    def per_level(
        self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        if len(teacher) != len(student) or len(teacher) != len(self.weights):
            raise ValueError(
                f"{len(teacher)} teacher and {len(student)} student levels for "
                f"{len(self.weights)} weights"
            )
        return torch.stack(
            [cosine_distance(t, s).mean() for t, s in zip(teacher, student, strict=True)]
        )

    def forward(
        self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        return (self.per_level(teacher, student) * self.weights).sum()
