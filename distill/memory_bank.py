"""A coreset memory bank over the teacher's features: PatchCore's nearest-neighbour scorer.

The student reconstructs the teacher's features; where a defect is subtle, it sometimes
reconstructs it too well. A bank of the good tiles' own patch features has no such blind spot:
a patch's score is its distance to the nearest good patch (Roth et al., "Towards Total Recall in
Industrial Anomaly Detection", 2022). Patches are the teacher's levels averaged over a 3×3
neighbourhood and brought to one grid (stride 8); the bank keeps a greedy k-centre coreset of
them, so it covers the good fabric's variety with a few thousand vectors. The bank is a buffer:
it travels in the checkpoint with the student.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LEVELS = (2, 3)
# What training chooses among when no levels are given (by synthetic defects, distill.selection):
# the default first, since a tie keeps it (fewer channels, faster); stride 4 (level 1) adds the
# fine texture that thin flaws need on some fabrics
LEVEL_CHOICES = (DEFAULT_LEVELS, (1, 2, 3))
DEFAULT_STRIDE = 8
DEFAULT_BANK_SIZE = 4096
# Greedy k-centre is O(candidates × bank size); candidates beyond this are a random sample.
MAX_CANDIDATES = 65536
_PROJECTION_DIM = 64  # k-centre runs on a random projection (Johnson–Lindenstrauss), as PatchCore
_QUERY_CHUNK = 1024  # queries per distance matrix: 1024 × 4096 float32 stays in cache


def patch_embedding(
    features: Sequence[torch.Tensor], levels: Sequence[int], stride: int, size: Sequence[int]
) -> torch.Tensor:
    """(B, ΣC, H/stride, W/stride) float32 for an (H, W) input: the chosen levels, each averaged
    over a 3×3 neighbourhood (PatchCore's local aggregation), brought to one grid."""
    size = (size[0] // stride, size[1] // stride)
    out = []
    for level in levels:
        f = F.avg_pool2d(features[level].float(), 3, 1, 1, count_include_pad=False)
        if f.shape[-2] > size[0]:
            f = F.adaptive_avg_pool2d(f, size)
        elif f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def greedy_coreset(points: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Indices of `size` points chosen by greedy k-centre (each the farthest from those chosen).

    Runs on a seeded random projection; deterministic for a given input and seed.
    """
    n = points.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    if points.shape[1] > _PROJECTION_DIM:
        projection = torch.randn(points.shape[1], _PROJECTION_DIM, generator=generator)
        points = points @ (projection / _PROJECTION_DIM**0.5)
    norms = (points * points).sum(dim=1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = norms + norms[chosen[0]] - 2 * (points @ points[chosen[0]])
    for k in range(1, size):
        chosen[k] = int(nearest.argmax())
        torch.minimum(
            nearest, norms + norms[chosen[k]] - 2 * (points @ points[chosen[k]]), out=nearest
        )
    return chosen


def patch_rows(embedding: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, h, w) patch embeddings as (B·h·w, C) rows, only the `keep` ones when given."""
    flat = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
    return flat if keep is None else flat[keep.reshape(-1)]


class MemoryBank(nn.Module):
    """Nearest-neighbour distance of each patch to a bank of good patches."""

    def __init__(
        self,
        channels: int,
        size: int,
        levels: Sequence[int] = DEFAULT_LEVELS,
        stride: int = DEFAULT_STRIDE,
    ) -> None:
        super().__init__()
        self.levels = tuple(int(level) for level in levels)
        self.stride = int(stride)
        self.register_buffer("bank", torch.zeros(size, channels))
        self.register_buffer("twin", None)  # (size, channels) when the bank has a bf16 twin
        # the device type the twin was computed on: another device's bf16 kernels round otherwise
        self.twin_device: str | None = None
        self.reads_bf16 = False  # True once `use_twin` made this bank score bf16 features

    @classmethod
    def fit(
        cls,
        embeddings: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
        levels: Sequence[int] = DEFAULT_LEVELS,
        stride: int = DEFAULT_STRIDE,
        size: int = DEFAULT_BANK_SIZE,
        seed: int = 0,
        twins: Iterable[torch.Tensor] | None = None,
    ) -> MemoryBank:
        """Build from (B, C, h, w) patch embeddings of good tiles (see `patch_embedding`).

        An embedding may come with a (B, h, w) boolean of the patches to keep (those whose
        centre lies on fabric), as a pair (embedding, keep). `twins`: the same tiles' embeddings
        from the teacher in bf16, one per embedding; the coreset is chosen on the float32 ones
        and the twin keeps the same patches."""
        pairs = [item if isinstance(item, tuple) else (item, None) for item in embeddings]
        parts = [patch_rows(e, keep) for e, keep in pairs]
        twin_parts = []
        if twins is not None:
            twins = list(twins)
            if len(twins) != len(pairs):
                raise ValueError(f"{len(twins)} twin embeddings for {len(pairs)} embeddings")
            for twin, (e, keep) in zip(twins, pairs, strict=True):
                if twin.shape != e.shape:
                    raise ValueError(f"a twin of shape {tuple(twin.shape)} for {tuple(e.shape)}")
                twin_parts.append(patch_rows(twin.float(), keep))
        patches = torch.cat(parts)
        if patches.shape[0] == 0:
            raise ValueError("no good patches to build a memory bank from")
        candidates = torch.arange(patches.shape[0])
        if patches.shape[0] > MAX_CANDIDATES:
            generator = torch.Generator().manual_seed(seed)
            candidates = torch.randperm(patches.shape[0], generator=generator)[:MAX_CANDIDATES]
        chosen = candidates[greedy_coreset(patches[candidates], size, seed)]
        bank = cls(patches.shape[1], len(chosen), levels, stride)
        bank.bank.copy_(patches[chosen])
        if twin_parts:
            bank.twin = torch.cat(twin_parts)[chosen]
        return bank

    def use_twin(self) -> MemoryBank:
        """Score bf16 teacher features from now on: the twin replaces the float32 vectors (call
        it on a copy; the checkpoint keeps both)."""
        if self.twin is None:
            raise ValueError("this memory bank has no bf16 twin")
        self.bank, self.reads_bf16 = self.twin, True
        return self

    def embed(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        return patch_embedding(features, self.levels, self.stride, size)

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """(B, H/stride, W/stride) float32 distances to the nearest bank patch, for an (H, W)
        input whose teacher features these are."""
        return self.distances(self.embed(features, size))

    def distances(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, h, w) float32 distances to the nearest bank patch of (B, C, h, w) patch embeddings."""
        b, c, h, w = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, c).float()
        # float32 even under the detector's bf16 autocast: the expanded form |q|² + |b|² − 2q·b
        # loses the small distances that matter to bf16 rounding (and autocast's bf16 addmm was
        # slower here than float32 in chunks that stay in cache)
        with torch.autocast(queries.device.type, enabled=False):
            bank = self.bank.float()
            bank_norms = (bank * bank).sum(dim=1)
            nearest = []
            for start in range(0, queries.shape[0], _QUERY_CHUNK):
                q = queries[start : start + _QUERY_CHUNK]
                squared = torch.addmm(bank_norms, q, bank.T, alpha=-2.0)
                nearest.append(squared.amin(dim=1) + (q * q).sum(dim=1))
        return torch.cat(nearest).clamp_min_(0).sqrt_().reshape(b, h, w)
