"""Anomaly map: per-level 1 − cos upsampled to the input size, summed, smoothed by a 2-D Gaussian.

The official code smooths each row only (scipy over a squeezed batch); the smoothing here is a
true 2-D Gaussian (σ = 4, truncated at 4σ like scipy's default), separable, on the model's device.
Scores are never normalised by test-set statistics, so they mean the same in a stream as in a
benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.loss import cosine_distance


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


class AnomalyMap(nn.Module):
    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma
        self.register_buffer("kernel", gaussian_kernel_1d(sigma), persistent=False)

    def smooth(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) float32 → the same, Gaussian-smoothed in 2-D with reflected borders."""
        if self.sigma <= 0:
            return maps
        k = self.kernel.to(maps.device)
        r = k.numel() // 2
        maps = F.conv2d(F.pad(maps, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
        return F.conv2d(F.pad(maps, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        student: Sequence[torch.Tensor],
        size: Sequence[int],
    ) -> torch.Tensor:
        """Return (B, H, W) float32 maps at `size`."""
        total = None
        for t, s in zip(teacher, student, strict=True):
            level = cosine_distance(t, s).unsqueeze(1)
            level = F.interpolate(level, size=tuple(size), mode="bilinear", align_corners=False)
            total = level if total is None else total + level
        return self.smooth(total).squeeze(1)


def tile_scores(maps: torch.Tensor) -> torch.Tensor:
    """Tile score = the map's maximum."""
    return maps.flatten(1).amax(dim=1)
