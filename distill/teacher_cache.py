"""The frozen teacher's features of a run's tiles, computed once and read every epoch.

Without augmentation a tile reaches the frozen teacher the same way every epoch, so its features
are a function of the tile alone, and recomputing them at every step repeats the teacher's whole
forward pass: 10 % of a bf16 step with lite1's student on 2 Zen 4 cores, 22 % with ResNet34's
(`bench/train_throughput.py`). bf16 training therefore keeps them, in bf16 and on the training
device, when they fit `TrainConfig.teacher_cache_mb`. fp32 training recomputes them at every
step as the recipe always has, so that its models stay bitwise what they were (the demo pins one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distill.progress import progress_bar

if TYPE_CHECKING:
    from distill.train import Trainer

VALIDATION_BATCH = 8  # tiles per pass of `Trainer.validate`


class TeacherCache:
    """The teacher's features (one tensor per level, first axis the tile) of a stack of tiles."""

    def __init__(self, levels: list[torch.Tensor]) -> None:
        self.levels = levels

    @classmethod
    def build(
        cls, trainer: Trainer, images: torch.Tensor, batch: int, progress: bool = False
    ) -> TeacherCache:
        """The teacher's features of (N, H, W, C) tiles, in `trainer`'s precision and layout,
        computed `batch` tiles at a time: the batch size the features would otherwise be
        computed in, so that the same kernels compute them (bitwise the same, whatever the
        batch's composition, on the Zen 4 measured: docs/benchmarks.md)."""
        levels: list[torch.Tensor] = []
        with progress_bar(total=len(images), desc="teacher's features", unit="tile", leave=False,
                  disable=not progress, dynamic_ncols=True) as bar:  # fmt: skip
            for start in range(0, len(images), batch):
                features = trainer.teacher_features(trainer.inputs(images[start : start + batch]))
                if not levels:  # filled in place: no second copy of the stack while it grows
                    levels = [
                        torch.empty((len(images), *f.shape[1:]), dtype=f.dtype, device=f.device,
                                    memory_format=_layout(f))
                        for f in features
                    ]  # fmt: skip
                for level, f in zip(levels, features, strict=True):
                    level[start : start + len(f)] = f
                bar.update(len(features[0]))
        return cls(levels)

    def take(self, idx: torch.Tensor | slice) -> list[torch.Tensor]:
        """The features of tiles `idx` (indexing keeps each level's memory layout; a slice is a
        view, so validation's consecutive batches copy nothing)."""
        return [level[idx] for level in self.levels]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.levels)


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def bytes_per_tile(trainer: Trainer, images: torch.Tensor) -> int:
    """The cache's size per tile: the teacher's features of one tile, in its precision."""
    return _nbytes(trainer.teacher_features(trainer.inputs(images[:1])))


def cache_for(
    trainer: Trainer, train_images: torch.Tensor, val_images: torch.Tensor, progress: bool = False
) -> tuple[TeacherCache | None, TeacherCache | None, str]:
    """The training and held-out tiles' caches where this run keeps them (else None, None), and
    a line that says which and why."""
    config = trainer.config
    if not trainer.bf16:
        return None, None, "teacher's features recomputed each step (fp32: the recipe, bitwise)"
    if config.augment:
        return None, None, "teacher's features recomputed each step (augmented tiles vary)"
    if not config.teacher_cache_mb:
        return None, None, "teacher's features recomputed each step (--teacher-cache-mb 0)"
    total = bytes_per_tile(trainer, train_images) * (len(train_images) + len(val_images))
    mib = total / 2**20
    if mib > config.teacher_cache_mb:
        return None, None, (
            f"teacher's features recomputed each step: {mib:,.1f} MiB would exceed "
            f"--teacher-cache-mb {config.teacher_cache_mb:,}"
        )  # fmt: skip
    train = TeacherCache.build(trainer, train_images, config.batch, progress)
    val = TeacherCache.build(trainer, val_images, VALIDATION_BATCH, progress)
    return train, val, f"teacher's features computed once ({mib:,.1f} MiB), read every epoch"
