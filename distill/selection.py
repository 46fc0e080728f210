"""How a model makes its map, chosen honestly: by synthetic defects on held-out good tiles.

After training, the held-out good tiles (never trained on) give each map's statistics on good
fabric, and copies of them with synthetic defects pasted in (`paste_defects`) give something to
find. Every fusion weight in a grid — 1 is the student alone, 0 the memory bank alone — is scored
on these by tile AUROC and pixel AUROC. The best mean wins, unless a single map (the bank alone,
or the student alone) comes within one standard error of it: then that one, which is simpler
and faster to score (the "one-standard-error rule" of model selection). Real test tiles play no
part, so the choice means the same on a fabric nobody has labelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from distill.anomaly_map import MapFusion
from distill.data.synthetic_defects import paste_defects
from distill.metrics import image_auroc, pixel_auroc, tile_scores_on
from distill.preprocess import as_batch, edge_tiles, normalise
from distill.torch_model import ReverseDistillation

FUSION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SINGLE_MAP_WEIGHTS = (0.0, 1.0)  # the memory bank alone, the student alone: one map to compute


def auroc_standard_error(auroc: float, n_positive: int, n_negative: int) -> float:
    """Standard error of an AUROC measured on so many positives and negatives (Hanley & McNeil,
    1982, exponential approximation): the noise of a figure the selection compares."""
    a = min(max(auroc, 0.0), 1.0)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = a * (1 - a) + (n_positive - 1) * (q1 - a * a) + (n_negative - 1) * (q2 - a * a)
    return float(np.sqrt(max(variance, 0.0) / (n_positive * n_negative)))


def pick_weight(trials: dict[float, dict[str, float]], tolerance: float) -> float:
    """The best mean's weight, or the single map's within `tolerance` of it (the better of the
    two if both are): differences inside the noise do not buy a second map to compute."""
    best = max(trials, key=lambda w: (round(trials[w]["mean"], 6), w))
    floor = trials[best]["mean"] - tolerance
    near = [w for w in SINGLE_MAP_WEIGHTS if w in trials and trials[w]["mean"] >= floor]
    return max(near, key=lambda w: (trials[w]["mean"], -w)) if near else best


def pick_cheapest(means: Sequence[float], tolerance: float) -> int:
    """Index of the first of `means` within `tolerance` of the best: candidates come cheapest
    first, and a difference inside the noise does not buy a costlier one."""
    floor = max(means) - tolerance
    return next(i for i, mean in enumerate(means) if mean >= floor)


@dataclass
class RawMaps:
    """Both maps of a set of tiles, unfused: (N, H, W) float32 each (None where not computed)."""

    student: np.ndarray | None
    memory: np.ndarray | None


@torch.no_grad()
def raw_maps(
    model: ReverseDistillation,
    images: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 16,
    fabric: np.ndarray | None = None,
) -> RawMaps:
    """The student's and the memory bank's maps of `images`, in float32, before fusion;
    `fabric`: (N, H, W) booleans, True on fabric (None: all fabric)."""
    model.eval()
    device = next(model.student.parameters()).device
    batch = as_batch(images)
    student, memory = [], []
    for start in range(0, batch.shape[0], batch_size):
        x, (h, w) = normalise(batch[start : start + batch_size], mean, std, device)
        size = tuple(x.shape[-2:])
        edges = None if fabric is None else edge_tiles(fabric[start : start + batch_size], x)
        teacher_features, student_features = model.features(x)
        student_map = model.anomaly_map(teacher_features, student_features, size, edges)
        student.append(student_map[:, :h, :w].cpu())
        if model.memory is not None:
            grid = model.memory(teacher_features, size)
            memory.append(model.anomaly_map.upsampled(grid, size, edges)[:, :h, :w].cpu())
    return RawMaps(torch.cat(student).numpy(), torch.cat(memory).numpy() if memory else None)


def _max_stats(maps: np.ndarray, valid: np.ndarray | None) -> tuple[float, float]:
    peaks = tile_scores_on(maps, valid).astype(np.float64)
    return float(peaks.mean()), float(max(peaks.std(), 1e-6 * max(abs(peaks.mean()), 1e-6)))


def fuse_maps(fusion: MapFusion, maps: RawMaps) -> np.ndarray:
    """The fused map of raw maps, as the detector would make it."""

    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(a)

    return fusion(
        tensor(maps.student) if fusion.uses_student else None,
        tensor(maps.memory) if fusion.uses_memory else None,
    ).numpy()


@dataclass
class Selection:
    """The chosen fusion and, for every weight tried, its figures on the synthetic defects."""

    fusion: MapFusion
    trials: dict[float, dict[str, float]] = field(default_factory=dict)
    n_good: int = 0
    n_synthetic: int = 0
    tolerance: float = 0.0  # one standard error of the best mean: what counts as a tie
    # the memory bank's level sets tried ("2,3": its chosen weight's mean figure), when several
    levels: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "weight": self.fusion.weight,
            "tolerance": self.tolerance,
            "n_good": self.n_good,
            "n_synthetic": self.n_synthetic,
            "trials": {f"{w:g}": figures for w, figures in self.trials.items()},
        } | ({"levels": self.levels} if self.levels else {})


def choose_fusion(
    model: ReverseDistillation,
    held_out: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    valid: np.ndarray | None = None,
    weights: tuple[float, ...] = FUSION_WEIGHTS,
    seed: int = 0,
) -> Selection:
    """Pick the fusion weight by synthetic defects pasted on the held-out good tiles.

    `valid` marks each held-out tile's fabric pixels (None: all): the maps are made from them,
    statistics and figures count only them, and defects are pasted only on tiles that are
    fabric throughout. With no memory
    bank only the student is possible (weight 1); a single weight in `weights` fixes the choice
    and only measures it.
    """
    if model.memory is None:
        weights = (1.0,)
    good = raw_maps(model, held_out, mean, std, fabric=valid)
    whole = np.ones(len(held_out), bool) if valid is None else valid.all(axis=(1, 2))
    base = np.asarray(as_batch(held_out))[whole if whole.any() else slice(None)]
    defective, masks = paste_defects(base, seed=seed)
    bad = raw_maps(model, defective, mean, std)
    student_stats = _max_stats(good.student, valid)
    memory_stats = _max_stats(good.memory, valid) if good.memory is not None else (0.0, 1.0)
    labels = np.r_[np.zeros(len(held_out)), np.ones(len(defective))]
    all_masks = np.concatenate([np.zeros((len(held_out), *masks.shape[1:]), bool), masks])
    all_valid = None if valid is None else np.concatenate([valid, np.ones_like(masks)])
    trials: dict[float, dict[str, float]] = {}
    for weight in weights:
        fusion = MapFusion(weight, student_stats, memory_stats)
        maps = np.concatenate([fuse_maps(fusion, good), fuse_maps(fusion, bad)])
        tile = image_auroc(tile_scores_on(maps, all_valid), labels)
        pixel = pixel_auroc(maps, all_masks, valid=all_valid)
        trials[weight] = {"tile_auroc": tile, "pixel_auroc": pixel, "mean": (tile + pixel) / 2}
    top = max(trials.values(), key=lambda t: t["mean"])
    # the mean's noise taken as the tile AUROC's halved: leaving the pixel AUROC's noise out
    # (its pixels are many but not independent) makes the tolerance smaller, the rule cautious
    tolerance = auroc_standard_error(top["tile_auroc"], len(defective), len(held_out)) / 2
    best = pick_weight(trials, tolerance)
    fusion = MapFusion(best, student_stats, memory_stats)
    return Selection(fusion, trials, len(held_out), len(defective), tolerance)
