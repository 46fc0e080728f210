"""Anomaly maps: the student's, the memory bank's, and their fusion.

The student's map: per-level 1 − cos upsampled to the input size, summed, smoothed by a 2-D
Gaussian. The memory bank's: nearest-neighbour distances upsampled and smoothed the same way.

The official code smooths each row only (scipy over a squeezed batch); the smoothing here is a
true 2-D Gaussian (σ = 4, truncated at 4σ like scipy's default), separable, on the model's device.
Scores are never normalised by test-set statistics, so they mean the same in a stream as in a
benchmark.

A tile that holds the table beside the fabric (`EdgeTiles`: which tiles, and where their fabric
lies) gets its map over the fabric from the fabric alone: each upsampling and the smoothing become
normalised convolutions (only the coarse cells centred on fabric count, the blur divided by
the blurred mask), so the table's own high scores — it is not fabric, the bank holds none of
it — no longer bleed a few millimetres into the selvage. Tiles wholly on fabric are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.loss import cosine_distance

# the least fabric weight a pixel's normalised value is taken from (below: the plain map's)
_REACH = 1e-3


class EdgeTiles(NamedTuple):
    """The tiles of a batch that hold pixels off the fabric: their indices in the batch and
    their fabric masks, on the model's device (`distill.preprocess.edge_tiles` makes them)."""

    index: torch.Tensor  # (E,) int64
    fabric: torch.Tensor  # (E, H, W) bool, True on fabric, at the model's input size

    def alone(self) -> EdgeTiles:
        """The same tiles as a batch of their own (their features picked out of the batch's)."""
        return EdgeTiles(torch.arange(len(self.index), device=self.index.device), self.fabric)


def _resize(level: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(level, size=size, mode="bilinear", align_corners=False)


def _cell_centres(weight: torch.Tensor, cells: Sequence[int]) -> torch.Tensor:
    """(B, 1, H, W) fabric weights → (B, 1, h, w), each cell's weight that of its centre pixel:
    a cell is fabric when its centre is, as the memory bank keeps a patch when its centre lies on
    fabric (a cell whose centre lies on the table is not in the bank, and would score high)."""
    (h, w), (rows, cols) = cells, weight.shape[-2:]
    sy, sx = rows // h, cols // w
    return weight[:, :, sy // 2 :: sy, sx // 2 :: sx][:, :, :h, :w]


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


@lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(n, n) M with M @ x the 1-D Gaussian of x (length n) over torch's "reflect" padding
    (the border mirrored without repeating the edge sample)."""
    kernel = gaussian_kernel_1d(sigma)
    r = kernel.numel() // 2
    if r >= n:
        raise ValueError(f"a map of {n} px is too small for σ = {sigma} (needs more than {r})")
    source = torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None, :]  # (n, 2r + 1)
    source = torch.where(source < 0, -source, source)
    source = torch.where(source > n - 1, 2 * (n - 1) - source, source)
    with torch.inference_mode(False):  # a normal tensor: training may use it too
        matrix = torch.zeros(n, n).scatter_add_(1, source, kernel.expand(n, -1).contiguous())
        return matrix.to(device)


class AnomalyMap(nn.Module):
    """The student's anomaly map: per level 1 − cos between teacher and student features,
    upsampled to the input size, summed and smoothed by a 2-D Gaussian of `sigma` px. Its
    smoothing is shared: `upsampled` brings the memory bank's coarse scores to the same size and
    blur, so that `MapFusion` compares like with like."""

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma

    def smooth(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) float32 → the same, Gaussian-smoothed in 2-D with reflected borders.

        Each 1-D pass is a product with an (n, n) matrix that holds the kernel and the borders'
        reflection: one matrix product per axis, where a one-channel convolution ran ~10× slower
        on the CPU (it was most of the memory bank's map)."""
        if self.sigma <= 0:
            return maps
        h, w = maps.shape[-2:]
        # a compiled graph builds its matrices itself (constants, folded); eager calls share them
        blur = _blur_matrix.__wrapped__ if torch.compiler.is_compiling() else _blur_matrix
        rows = blur(h, self.sigma, maps.device)
        cols = rows if w == h else blur(w, self.sigma, maps.device)
        return rows @ maps @ cols.T

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        student: Sequence[torch.Tensor],
        size: Sequence[int],
        edges: EdgeTiles | None = None,
    ) -> torch.Tensor:
        """Return (B, H, W) float32 maps at `size`; `edges`: the tiles holding pixels off the
        fabric, whose maps come from their fabric alone (see the module's docstring)."""
        levels = [cosine_distance(t, s).unsqueeze(1) for t, s in zip(teacher, student, strict=True)]
        return self._combined(levels, size, edges)

    def upsampled(
        self, grid: torch.Tensor, size: Sequence[int], edges: EdgeTiles | None = None
    ) -> torch.Tensor:
        """(B, h, w) coarse scores (the memory bank's) → (B, H, W) float32, smoothed like the
        student's map."""
        return self._combined([grid.float().unsqueeze(1)], size, edges)

    def _combined(
        self, levels: list[torch.Tensor], size: Sequence[int], edges: EdgeTiles | None
    ) -> torch.Tensor:
        """(B, 1, h, w) coarse levels → one (B, H, W) map: upsampled, summed, smoothed."""
        size = tuple(size)
        total = None
        for level in levels:
            up = _resize(level, size)
            total = up if total is None else total + up
        maps = self.smooth(total).squeeze(1)
        if edges is None:
            return maps
        edge_levels = [level[edges.index] for level in levels]
        on_fabric = self.on_fabric(edge_levels, size, edges.fabric, maps[edges.index])
        return maps.index_copy(0, edges.index, on_fabric)

    def on_fabric(
        self, levels: list[torch.Tensor], size: tuple[int, int], fabric: torch.Tensor,
        plain: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The map of tiles that hold off-fabric pixels, over their fabric from fabric alone:
        each level upsampled from its cells on fabric only (`_cell_centres`), the sum smoothed
        by the Gaussian divided by the smoothed mask. Pixels far off the fabric (no weight
        reaches them) keep `plain`, the same tiles' (E, H, W) map made without the mask; they
        are never scored as fabric anyway."""
        weight = fabric.to(levels[0].dtype).unsqueeze(1)
        total = None
        for level in levels:
            centred = _cell_centres(weight, level.shape[-2:])
            reach = _resize(centred, size)
            part = torch.where(
                reach > _REACH,
                _resize(level * centred, size) / reach.clamp_min(_REACH),
                _resize(level, size),
            )
            total = part if total is None else total + part
        reach = self.smooth(weight).squeeze(1)
        smoothed = self.smooth(total * weight).squeeze(1) / reach.clamp_min(_REACH)
        return torch.where(reach > _REACH, smoothed, plain)


class MapFusion(nn.Module):
    """One map from the student's and the memory bank's: weight · z(student) + (1 − weight) ·
    z(memory), where z standardises a map by the mean and standard deviation of the maxima of
    held-out good tiles, so that both speak in "how unusual for good fabric" and the weight means
    the same on every fabric. A weight of 1 (the default, and every checkpoint from before the
    memory bank, whose statistics are the identity) is the student alone, 0 the bank alone; the
    side with no weight is not computed."""

    def __init__(
        self,
        weight: float = 1.0,
        student: Sequence[float] = (0.0, 1.0),
        memory: Sequence[float] = (0.0, 1.0),
    ) -> None:
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"fusion weight must be in [0, 1], not {weight}")
        for name, (mean, std) in (("student", student), ("memory", memory)):
            # a NaN mean would make every fused score NaN, which no threshold ever flags
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(
                    f"the {name} map's mean and standard deviation must be finite and the "
                    f"deviation positive, not {mean}, {std}"
                )
        self.weight = float(weight)
        self.student_stats = (float(student[0]), float(student[1]))
        self.memory_stats = (float(memory[0]), float(memory[1]))

    @property
    def uses_student(self) -> bool:
        return self.weight > 0

    @property
    def uses_memory(self) -> bool:
        return self.weight < 1

    def forward(self, student: torch.Tensor | None, memory: torch.Tensor | None) -> torch.Tensor:
        total = None
        for weight, maps, (mean, std) in (
            (self.weight, student, self.student_stats),
            (1.0 - self.weight, memory, self.memory_stats),
        ):
            if weight > 0:
                part = (maps - mean) * (weight / std)
                total = part if total is None else total + part
        return total


def tile_scores(maps: torch.Tensor) -> torch.Tensor:
    """Tile score = the map's maximum."""
    return maps.flatten(1).amax(dim=1)
