"""Every choice of a training run, checked when it is made: `TrainConfig` and the names each
of its choices may take (what `rollscan train` offers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from distill.augment import check_augmentations
from distill.inference import PRECISIONS
from distill.loss import LOSSES
from distill.memory_bank import DEFAULT_BANK_SIZE, DEFAULT_STRIDE
from distill.selection import FUSION_WEIGHTS
from distill.teacher import DEFAULT_TEACHER

MIN_TILE, MAX_TILE = 64, 4096  # a model's tile, px: what a checkpoint may hold

SCORERS: tuple[str, ...] = ("auto", "student", "memory", "fused")
EDGE_MODES: tuple[str, ...] = ("mask", "exclude")
TILE_LAYOUTS: tuple[str, ...] = ("grid", "fabric")
HELD_OUT_MODES: tuple[str, ...] = ("random", "last")
MEMORY_STRIDES: tuple[int, ...] = (4, 8, 16)


@dataclass
class TrainConfig:
    """Every choice of a training run (the official recipe by default), recorded in the model card
    so that a checkpoint says how it was made."""

    teacher: str = DEFAULT_TEACHER
    teacher_weights: str | None = None
    variant: str = "residual"
    epochs: int = 100
    batch: int = 4
    lr: float = 0.005
    betas: tuple[float, float] = (0.9, 0.999)
    val_ratio: float = 0.3
    lr_patience: int = 5
    stop_patience: int = 10
    tile: int = 256
    seed: int = 0
    device: str = "cpu"
    fpr: float = 0.001
    level_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    sigma: float = 4.0
    loss: str = "pixel"
    augment: tuple[str, ...] = ()
    # auto: the fusion weight chosen by synthetic defects; student / memory: one map alone;
    # fused: `fusion_weight` fixed
    scorer: str = "auto"
    fusion_weight: float = 0.5
    memory_size: int = DEFAULT_BANK_SIZE
    # the teacher's levels the bank compares; None: chosen among LEVEL_CHOICES by synthetic defects
    memory_levels: tuple[int, ...] | None = None
    memory_stride: int = DEFAULT_STRIDE  # px of the input per bank patch (the map's grid)
    # tiles that straddle the fabric's edge: "mask" leaves their off-fabric pixels out of the
    # loss and the memory bank; "exclude" leaves such tiles out of training altogether
    edge: str = "mask"
    # how the pipeline lays a roll's tiles for this model (`worker.tiling`): "grid" over the
    # whole width, or "fabric": each tile row laid on the fabric, its first tile starting at the
    # edge — for data that holds such tiles (`rollscan datasets import-aitex --edge-start-tiles`)
    tile_layout: str = "grid"
    max_minutes: float | None = None  # a time budget; None trains to the end
    # whole images (a benchmark such as MVTec AD) resized to the tile; without it, training
    # images must be tiles of the model's size, the scale the worker cuts the roll at
    resize: bool = False
    # fp32, or bf16 autocast (forward passes in bf16, weights, loss and optimiser in float32,
    # channels-last); auto: bf16 where the device has it natively
    precision: str = "fp32"
    # bf16 training keeps the frozen teacher's features of every tile when they fit in this many
    # MiB (distill.teacher_cache); 0: recomputed at every step
    teacher_cache_mb: int = 4096
    held_out: str = "random"  # or "last": the last tiles in name order (see split_held_out)
    # the training tiles' resolution (px per mm), when known: a worker refuses to score a roll
    # scanned at another (`distill.input_fit`); None: not checked
    px_per_mm: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch < 1:
            raise ValueError("epochs and batch must be at least 1")
        # refused here, not by the checkpoint's reader once training has run for an hour
        if not MIN_TILE <= self.tile <= MAX_TILE:
            raise ValueError(f"tile must be in {MIN_TILE}…{MAX_TILE} px, not {self.tile}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, not {self.lr}")
        if not all(math.isfinite(w) and w >= 0 for w in self.level_weights):
            raise ValueError(f"level weights must be numbers ≥ 0, not {self.level_weights}")
        if self.max_minutes is not None and not (
            math.isfinite(self.max_minutes) and self.max_minutes > 0
        ):
            raise ValueError(f"max_minutes must be a positive number, not {self.max_minutes}")
        if self.px_per_mm is not None and not (
            math.isfinite(self.px_per_mm) and self.px_per_mm > 0
        ):
            raise ValueError(f"px_per_mm must be a positive number, not {self.px_per_mm}")
        if not 0 < self.val_ratio < 1:
            raise ValueError(f"val_ratio must be in (0, 1), not {self.val_ratio}")
        if not 0 <= self.fpr < 1:
            raise ValueError(f"fpr must be in [0, 1), not {self.fpr}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {self.scorer!r}; choose one of {', '.join(SCORERS)}")
        if not 0 <= self.fusion_weight <= 1:
            raise ValueError(f"fusion weight must be in [0, 1], not {self.fusion_weight}")
        if self.memory_size < 1:
            raise ValueError(f"memory bank size must be at least 1, not {self.memory_size}")
        if self.memory_levels is not None and (
            not self.memory_levels or not set(self.memory_levels) <= {0, 1, 2, 3}
        ):
            raise ValueError(f"memory levels must be among 0-3, not {self.memory_levels}")
        if self.memory_stride not in MEMORY_STRIDES or self.tile % self.memory_stride:
            raise ValueError(
                f"memory stride must be one of {MEMORY_STRIDES} and divide the tile "
                f"({self.tile}), not {self.memory_stride}"
            )
        if self.edge not in EDGE_MODES:
            raise ValueError(
                f"unknown edge mode {self.edge!r}; choose one of {', '.join(EDGE_MODES)}"
            )
        if self.tile_layout not in TILE_LAYOUTS:
            raise ValueError(
                f"unknown tile layout {self.tile_layout!r}; choose one of {', '.join(TILE_LAYOUTS)}"
            )
        if self.teacher_cache_mb < 0:
            raise ValueError(f"teacher_cache_mb must be at least 0, not {self.teacher_cache_mb}")
        if self.held_out not in HELD_OUT_MODES:
            raise ValueError(f"held_out must be random or last, not {self.held_out!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        self.augment = check_augmentations(self.augment)

    @property
    def fusion_weights(self) -> tuple[float, ...]:
        """The fusion weights the selection may choose among."""
        fixed = {"student": 1.0, "memory": 0.0, "fused": self.fusion_weight}
        return (fixed[self.scorer],) if self.scorer in fixed else FUSION_WEIGHTS
