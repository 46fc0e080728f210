"""PNG evaluation report for a person to look at: ROC curves and best/worst examples.

Rendering uses matplotlib's object API with the Agg canvas directly (no pyplot), so it
needs no display, keeps no global figure state and works from worker threads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from distill.metrics import image_auroc, pixel_auroc

__all__ = ["pick_examples", "write_report"]

# Pixels drawn per class for the pixel ROC plot; enough for a smooth curve.
_PLOT_PIXELS_PER_CLASS = 100_000
_DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI)
    return path


def _message_figure(path: Path, title: str, message: str) -> Path:
    # An undefined curve still gets its file, so a reader sees why instead of a gap.
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    return _save(fig, path)


def _roc_axes(fig: Figure, title: str):
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    return ax


def _plot_image_roc(
    path: Path, scores: np.ndarray, labels: np.ndarray, threshold: float | None
) -> Path:
    y = labels.astype(bool)
    if y.all() or not y.any():
        return _message_figure(path, "Tile ROC", "undefined: the tiles are all of one class")
    fpr, tpr, _ = roc_curve(y, scores)
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = _roc_axes(fig, f"Tile ROC ({y.sum()} defective, {(~y).sum()} good tiles)")
    ax.plot(fpr, tpr, color="C0", label=f"AUROC = {image_auroc(scores, y):.4f}")
    if threshold is not None:
        # Flagged = strictly above the threshold, as in metrics.threshold_at_fpr.
        op_fpr = float(np.mean(scores[~y] > threshold))
        op_tpr = float(np.mean(scores[y] > threshold))
        ax.plot(
            [op_fpr],
            [op_tpr],
            "o",
            color="C3",
            label=f"threshold {threshold:.4g}: FPR {op_fpr:.3f}, TPR {op_tpr:.3f}",
        )
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _pixel_counts(masks: np.ndarray, valid: np.ndarray) -> tuple[int, int]:
    """(defect pixels, all pixels) among the `valid` (fabric) ones, image by image."""
    n_pos = sum(int(np.count_nonzero(g & v)) for g, v in zip(masks, valid, strict=True))
    return n_pos, sum(int(np.count_nonzero(v)) for v in valid)


def _sample_pixels(
    maps: np.ndarray, masks: np.ndarray, valid: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to _PLOT_PIXELS_PER_CLASS map values per class, among the `valid` (fabric) pixels,
    drawn image by image.

    Sampling per class keeps rare defect pixels in the plot; a ROC curve does not depend
    on the class ratio, so this does not bias its shape.  Never materialises all pixels.
    """
    n_pos, n_valid = _pixel_counts(masks, valid)
    values, classes = [], []
    for is_pos, total in ((True, n_pos), (False, n_valid - n_pos)):
        k = min(total, _PLOT_PIXELS_PER_CLASS)
        # Sorted global ranks within the class, mapped onto images as we stream through.
        ranks = np.sort(rng.choice(total, size=k, replace=False))
        offset = 0
        for m, g, ok in zip(maps, masks, valid, strict=True):
            v = np.asarray(m)[ok & ((g != 0) == is_pos)]
            lo, hi = np.searchsorted(ranks, [offset, offset + len(v)])
            values.append(v[ranks[lo:hi] - offset])
            offset += len(v)
        classes.append(np.full(k, is_pos))
    return np.concatenate(values).astype(np.float64), np.concatenate(classes)


def _plot_pixel_roc(
    path: Path, maps: np.ndarray, masks: np.ndarray, valid: np.ndarray, rng: np.random.Generator
) -> Path:
    n_pos, n_valid = _pixel_counts(masks, valid)
    if n_pos == 0 or n_pos == n_valid:
        return _message_figure(path, "Pixel ROC", "undefined: the pixels are all of one class")
    values, classes = _sample_pixels(maps, masks, valid, rng)
    fpr, tpr, _ = roc_curve(classes, values)
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    kind = "pixels" if n_valid == masks.size else "fabric pixels (off the fabric: none counted)"
    if len(values) < n_valid:
        title = (
            f"Pixel ROC — AUROC from all {n_valid:,} {kind};\n"
            f"curve drawn from a random subsample of {len(values):,}\n"
            "pixels (subsampled for plotting only)"
        )
    else:
        title = f"Pixel ROC (all {n_valid:,} {kind})"
    ax = _roc_axes(fig, title)
    auroc = pixel_auroc(maps, masks, valid=valid)
    ax.plot(fpr, tpr, color="C0", label=f"AUROC = {auroc:.4f}")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pick_examples(scores: np.ndarray, labels: np.ndarray, n: int, *, worst: bool) -> list[int]:
    """Worst: highest-scoring good and lowest-scoring defective tiles; best: the reverse.

    Half of the slots go to each class; a class with too few tiles leaves its slots to
    the other.  The sort is stable, so ties resolve by index and the pick is repeatable.
    """
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels == 1)
    good = good[np.argsort(scores[good], kind="stable")]
    bad = bad[np.argsort(scores[bad], kind="stable")]
    if worst:
        good = good[::-1]
    else:
        bad = bad[::-1]
    n_good = min(len(good), max(math.ceil(n / 2), n - len(bad)))
    n_bad = min(len(bad), n - n_good)
    return [int(i) for i in good[:n_good]] + [int(i) for i in bad[:n_bad]]


def _plot_examples(
    path: Path,
    title: str,
    picks: list[int],
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    images: np.ndarray,
) -> Path:
    if not picks:
        return _message_figure(path, title, "no tiles")
    shown = [np.asarray(maps[i], dtype=np.float32) for i in picks]
    # One colour scale per figure, so overlays can be compared across rows.
    vmin = min(float(m.min()) for m in shown)
    vmax = max(float(m.max()) for m in shown)
    fig = Figure(figsize=(9, 3 * len(picks) + 0.6), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(len(picks), 3, squeeze=False)
    heat = None
    for row, (i, amap) in enumerate(zip(picks, shown, strict=True)):
        img = np.asarray(images[i])
        gt = np.asarray(masks[i], dtype=bool)
        kind = "defective" if labels[i] else "good"
        cmap = "gray" if img.ndim == 2 else None
        for col in range(3):
            ax = axes[row, col]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            # contour() warns on constant input, so draw outlines only where they exist.
            if col > 0 and gt.any() and not gt.all():
                ax.contour(gt, levels=[0.5], colors="lime", linewidths=1)
        heat = axes[row, 2].imshow(amap, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        axes[row, 0].set_title(f"tile {i} ({kind}), score {scores[i]:.4g}", fontsize=9)
        axes[row, 1].set_title("ground truth (green)", fontsize=9)
        axes[row, 2].set_title("anomaly map", fontsize=9)
    fig.colorbar(heat, ax=axes[:, 2].tolist(), shrink=0.6, label="anomaly score")
    return _save(fig, path)


def write_report(
    out_dir: str | Path,
    *,
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    images: np.ndarray,
    threshold: float | None = None,
    n_examples: int = 6,
    valid: np.ndarray | None = None,
) -> list[Path]:
    """Write roc_image.png, roc_pixel.png, worst.png, best.png and summary.json (the AUROCs
    and pixel counts the plots show) into `out_dir`.

    scores (N,), labels (N,) 0/1, maps (N, H, W), masks (N, H, W) bool and images
    (N, H, W) or (N, H, W, 3) uint8.  `threshold` (a tile is flagged when its score is
    above it) adds the operating point to the tile ROC.  worst.png shows the
    `n_examples` worst-ranked tiles (highest-scoring good, lowest-scoring defective),
    best.png the best-ranked; each row is image / ground-truth outline / map overlay.
    The pixel ROC curve is drawn from a fixed-seed random subsample of pixels (its
    title says so), its AUROC from all pixels — all the fabric's, where `valid` (N, H, W)
    bool marks it: the pixel figures count no pixel off the fabric, as `rollscan evaluate`'s
    JSON does not.  Returns the written paths.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(scores)
    if scores.ndim != 1 or labels.shape != (n,):
        raise ValueError(
            f"scores and labels must be 1-D of equal length: {scores.shape}, {labels.shape}"
        )
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    if maps.ndim != 3 or maps.shape[0] != n or masks.shape != maps.shape:
        raise ValueError(f"maps and masks must be (N={n}, H, W): {maps.shape}, {masks.shape}")
    if (
        images.shape[:3] != maps.shape
        or images.ndim not in (3, 4)
        or (images.ndim == 4 and images.shape[3] != 3)
    ):
        raise ValueError(
            f"images must be (N, H, W) or (N, H, W, 3) matching maps {maps.shape}"
            f", got {images.shape}"
        )
    valid = np.ones(maps.shape, bool) if valid is None else np.asarray(valid, dtype=bool)
    if valid.shape != maps.shape:
        raise ValueError(f"valid must be (N, H, W) like maps {maps.shape}, got {valid.shape}")
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    labels = labels.astype(np.int8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [
        _plot_image_roc(out / "roc_image.png", scores, labels, threshold),
        _plot_pixel_roc(out / "roc_pixel.png", maps, np.asarray(masks, dtype=bool), valid, rng),
    ]
    for name, worst, title in (
        ("worst.png", True, "Worst-ranked tiles: highest-scoring good, lowest-scoring defective"),
        ("best.png", False, "Best-ranked tiles: lowest-scoring good, highest-scoring defective"),
    ):
        picks = pick_examples(scores, labels, n_examples, worst=worst)
        paths.append(_plot_examples(out / name, title, picks, scores, labels, maps, masks, images))
    paths.append(out / "summary.json")
    paths[-1].write_text(json.dumps(_summary(scores, labels, maps, masks, valid), indent=1) + "\n")
    return paths


def _summary(scores, labels, maps, masks, valid) -> dict:
    """The figures the plots show, for a reader (or a test) that wants the numbers; an AUROC
    of one class only is null."""
    masks = np.asarray(masks, dtype=bool)
    n_pos, n_valid = _pixel_counts(masks, valid)
    both_tiles = 0 < int(labels.sum()) < len(labels)
    both_pixels = 0 < n_pos < n_valid
    return {
        "tiles": len(scores),
        "tile_auroc": round(image_auroc(scores, labels), 6) if both_tiles else None,
        "pixels_counted": n_valid,
        "pixels_off_fabric": int(valid.size - n_valid),
        "pixel_auroc": round(pixel_auroc(maps, masks, valid=valid), 6) if both_pixels else None,
    }
