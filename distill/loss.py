"""Distillation losses: the paper's per-pixel cosine, RD4AD's flattened one, and a hard-mined one.

- ``pixel`` (the official DBFAD code): per level, the mean over positions of 1 − cos over channels.
- ``flat`` (RD4AD's official code, anomalib): per level and image, 1 − cos between the whole
  flattened feature maps. It constrains the map's overall direction rather than each pixel,
  which RD4AD's authors found to generalise better (their issue #22: the per-pixel form dropped
  carpet image AUROC to 92.3 %).
- ``hard`` (ReContrast's ``global_cosine_hm``): the flattened loss, with the gradient of pixels
  already reconstructed better than the level's mean + one standard deviation damped ×0.1, so
  training spends itself on what the student still gets wrong.

Levels are weighted (the official code weights them equally; the paper speaks of adaptive
factors), the weights normalised to sum to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES: tuple[str, ...] = ("pixel", "flat", "hard")
_HARD_MINING_FACTOR = 0.1  # gradient kept on well-reconstructed pixels (ReContrast, Dinomaly)
Levels = Sequence[torch.Tensor]  # one (B, C, h, w) feature map per level, shallow first


def cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pairs → (B, H, W) of 1 − cos, computed in float32 whatever the autocast dtype."""
    return 1.0 - F.cosine_similarity(teacher.float(), student.float(), dim=1)


def _flat_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(teacher.float().flatten(1), student.float().flatten(1), dim=1)


def _damp_easy_pixels(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The student's features with the gradient of its well-reconstructed pixels scaled down."""
    with torch.no_grad():
        distance = cosine_distance(teacher, student).unsqueeze(1)
        easy = distance < distance.mean() + distance.std()
        scale = torch.where(easy, _HARD_MINING_FACTOR, 1.0).to(student.dtype)
    detached = student.detach()
    return detached + (student - detached) * scale


class DistillationLoss(nn.Module):
    """Weighted mean over levels of one of the losses in LOSSES."""

    def __init__(
        self, level_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), kind: str = "pixel"
    ) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
        weights = torch.as_tensor(level_weights, dtype=torch.float32)
        if weights.ndim != 1 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"level weights must be non-negative, not all zero: {level_weights}")
        self.kind = kind
        self.register_buffer("weights", weights / weights.sum())

    def level_loss(
        self, teacher: torch.Tensor, student: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One level's loss; `keep` (B, 1, h, w) in {0, 1} leaves out positions off the fabric."""
        if keep is not None:
            teacher, student = teacher * keep, student * keep
        if self.kind == "pixel":
            distance = cosine_distance(teacher, student)
            if keep is None:
                return distance.mean()
            # zeroed positions have cos 0 (distance 1): count only the kept ones
            kept = keep[:, 0]
            return (distance * kept).sum() / kept.sum().clamp_min(1.0)
        if self.kind == "hard" and student.requires_grad:
            student = _damp_easy_pixels(teacher, student)
        return _flat_distance(teacher, student).mean()

    def per_level(self, teacher: Levels, student: Levels, valid: Tensor | None = None) -> Tensor:
        """Each level's loss; `valid` (B, H, W) booleans of the input marks the fabric."""
        if len(teacher) != len(student) or len(teacher) != len(self.weights):
            raise ValueError(
                f"{len(teacher)} teacher and {len(student)} student levels for "
                f"{len(self.weights)} weights"
            )
        losses = []
        for t, s in zip(teacher, student, strict=True):
            keep = None
            if valid is not None:
                keep = F.interpolate(valid[:, None].float(), size=t.shape[-2:], mode="nearest")
            losses.append(self.level_loss(t, s, keep))
        return torch.stack(losses)

    def forward(self, teacher: Levels, student: Levels, valid: Tensor | None = None) -> Tensor:
        return (self.per_level(teacher, student, valid) * self.weights).sum()
