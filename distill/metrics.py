"""Evaluation metrics for tile scores and pixel anomaly maps.

Conventions: higher score = more anomalous; label 1 = defective; a pixel/tile is flagged
when its score is strictly greater than a threshold.

Pixel-level metrics (`pixel_auroc`, `pro_curve`, `aupro`) never hold more than one chunk
of ~4 M pixels in float64 at a time, so they work on e.g. 2000 maps of 256×256
(131 M pixels) or on a `np.memmap`.  They quantise scores onto a fine uniform grid
between the global min and max (2**16 bins by default) and count per bin with
`np.bincount`; see `pixel_auroc_with_bound` for the exact error bound this costs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "aupro",
    "coverage",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "pixel_auroc_with_bound",
    "pro_curve",
    "threshold_at_fpr",
    "tile_scores_on",
]

DEFAULT_BINS = 1 << 16
# Pixels per chunk: 4 M float64 values = 32 MiB of temporaries, whatever N is.
_CHUNK_PIXELS = 1 << 22
# Above this error bound pixel_auroc warns: the scores are too concentrated for the grid.
_BOUND_WARN = 1e-3
# 8-connectivity, as in the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------- validation


def _check_scores_labels(
    scores: np.ndarray, labels: np.ndarray, *, need_both: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if len(s) != len(y):
        raise ValueError(f"scores and labels differ in length: {len(s)} vs {len(y)}")
    if len(s) == 0:
        raise ValueError("scores and labels are empty")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    y = y.astype(bool)
    if need_both and (y.all() or not y.any()):
        which = "defective (1)" if not y.any() else "good (0)"
        raise ValueError(f"labels contain no {which} samples; the metric needs both classes")
    return s, y


def _check_maps_masks(maps: np.ndarray, masks: np.ndarray) -> None:
    if not hasattr(maps, "shape") or not hasattr(masks, "shape"):
        raise ValueError("maps and masks must be arrays")
    if maps.shape != masks.shape:
        raise ValueError(f"maps and masks differ in shape: {maps.shape} vs {masks.shape}")
    if maps.ndim != 3 or maps.size == 0:
        raise ValueError(f"maps and masks must be non-empty (N, H, W) arrays, got {maps.shape}")


def _as_bool(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != bool:
        if not np.all((a == 0) | (a == 1)):
            raise ValueError(f"{what} must be boolean (or 0/1)")
        a = a.astype(bool)
    return a


def _chunks(
    maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (float64 maps, bool masks, bool valid) for groups of whole images; validates as
    it goes. `valid` (default: every pixel) marks the pixels that count, e.g. those on fabric."""
    if valid is not None and valid.shape != maps.shape:
        raise ValueError(f"valid and maps differ in shape: {valid.shape} vs {maps.shape}")
    per_image = maps.shape[1] * maps.shape[2]
    step = max(1, _CHUNK_PIXELS // per_image)
    for i in range(0, maps.shape[0], step):
        m = np.asarray(maps[i : i + step], dtype=np.float64)
        g = _as_bool(masks[i : i + step], "masks")
        v = np.ones_like(g) if valid is None else _as_bool(valid[i : i + step], "valid")
        yield m, g, v


def _value_range(
    maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None
) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for m, _, v in _chunks(maps, masks, valid):
        m = m[v]
        if not np.all(np.isfinite(m)):
            raise ValueError("maps contain NaN or infinite values")
        if m.size:
            lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
    return lo, hi


def _bin_index(m: np.ndarray, lo: float, hi: float, n_bins: int) -> np.ndarray:
    # A monotone map value -> bin (floor of a positive affine map, rounding is monotone),
    # so pixels in different bins keep their order; only pairs sharing a bin become ties.
    if hi <= lo:
        return np.zeros(m.shape, dtype=np.intp)
    idx = np.floor((m - lo) * (n_bins / (hi - lo))).astype(np.intp)
    return np.minimum(idx, n_bins - 1, out=idx)


def _binned_chunks(
    maps: np.ndarray,
    masks: np.ndarray,
    n_bins: int,
    valid: np.ndarray | None,
    name: str = "n_bins",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The inputs checked, then `_chunks` with each map replaced by its bin indices on the
    common [min, max] range of all maps (`_bin_index`)."""
    _check_maps_masks(maps, masks)
    if n_bins < 2:
        raise ValueError(f"{name} must be >= 2, got {n_bins}")
    lo, hi = _value_range(maps, masks, valid)
    return ((_bin_index(m, lo, hi, n_bins), g, v) for m, g, v in _chunks(maps, masks, valid))


def _binned_counts(
    maps: np.ndarray, masks: np.ndarray, n_bins: int, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin counts of valid defect (positive) and good (negative) pixels."""
    chunks = _binned_chunks(maps, masks, n_bins, valid)
    pos = np.zeros(n_bins, dtype=np.int64)
    neg = np.zeros(n_bins, dtype=np.int64)
    for idx, g, v in chunks:
        pos += np.bincount(idx[g & v], minlength=n_bins)
        neg += np.bincount(idx[~g & v], minlength=n_bins)
    return pos, neg


# ----------------------------------------------------------------------------- tile level


def tile_scores_on(maps: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Each map's maximum over its valid (fabric) pixels; a tile with none scores lowest."""
    if valid is None:
        return maps.reshape(len(maps), -1).max(axis=1)
    scores = np.where(valid, maps, -np.inf).reshape(len(maps), -1).max(axis=1)
    finite = np.isfinite(scores)
    floor = scores[finite].min() - 1.0 if finite.any() else 0.0
    return np.where(finite, scores, floor)


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Tile-level AUROC (sklearn `roc_auc_score`; tied scores count one half)."""
    s, y = _check_scores_labels(scores, labels)
    return float(roc_auc_score(y, s))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 over all thresholds (sklearn `precision_recall_curve`)."""
    s, y = _check_scores_labels(scores, labels, need_both=False)
    if not y.any():
        raise ValueError("labels contain no defective (1) samples; F1 is undefined")
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def coverage(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of images an operator need not look at.

    With t_low = lowest score of a defective image and t_high = highest score of a good
    image, every image scoring < t_low is good and every image scoring > t_high is
    defective, so both groups are decided automatically with 100 % precision.  Returns
    their share of all images; when t_low > t_high the two groups cover everything (1.0).
    Note it is an oracle figure: the cut-offs are read off the labelled set itself.
    """
    s, y = _check_scores_labels(scores, labels)
    t_low, t_high = s[y].min(), s[~y].max()
    decided = (s < t_low) | (s > t_high)
    return float(decided.mean())


def threshold_at_fpr(good_scores: np.ndarray, fpr: float) -> float:
    """Smallest threshold t with share(good_scores > t) <= fpr.

    With n scores sorted ascending s_1 <= ... <= s_n and k = floor(fpr * n) (the number
    of good scores allowed above t), t = s_(n-k): at t the count above is at most k, and
    any t' < s_(n-k) has at least k + 1 scores above it.  So t is the empirical
    (1 - k/n) quantile, always one of the scores ("lower" interpolation), and
    fpr = 0 gives max(good_scores).  Flag a tile when its score is strictly > t.
    `fpr` must lie in [0, 1): at 1 every threshold qualifies and there is no smallest.
    """
    s = np.asarray(good_scores, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0:
        raise ValueError(f"good_scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("good_scores contain NaN or infinite values")
    if not (0.0 <= fpr < 1.0):
        raise ValueError(f"fpr must lie in [0, 1), got {fpr}")
    n = len(s)
    # The epsilon absorbs representation error, e.g. 0.29 * 100 = 28.999999999999996.
    k = min(n - 1, math.floor(fpr * n + 1e-9))
    return float(np.partition(s, n - k - 1)[n - k - 1])


# ----------------------------------------------------------------------------- pixel level


def pixel_auroc_with_bound(
    maps: np.ndarray,
    masks: np.ndarray,
    *,
    n_bins: int = DEFAULT_BINS,
    valid: np.ndarray | None = None,
) -> tuple[float, float]:
    """Pixel AUROC over all pixels and a hard bound on its deviation from the exact value.

    Why binned rather than sklearn on the full arrays: for 131 M pixels sklearn needs
    float64 copies plus an argsort (several GiB); the binned counts need 2 x n_bins
    int64 plus one chunk.  Why not subsampling: it gives a random, unbounded error.

    Method: scores are mapped to `n_bins` equal-width bins on [min, max] by a monotone
    function, so a (defect, good) pixel pair in different bins keeps its exact order;
    pairs in the same bin are counted as ties (1/2), as sklearn counts exactly equal
    scores.  Each such pair is off by at most 1/2, hence

        |AUROC_binned - AUROC_exact| <= 0.5 * sum_b pos_b * neg_b / (P * N),

    computed exactly from the counts and returned as the second value.  It is 0 when no
    bin mixes classes, and typically ~1e-5 with 2**16 bins for smooth maps; it grows
    only when a few extreme outliers squeeze most scores into a handful of bins.

    Only pixels where `valid` is True count (all by default): off-fabric pixels are never
    scored by the product, so they are left out of its figures too.
    """
    pos, neg = _binned_counts(maps, masks, n_bins, valid)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        which = "defect" if n_pos == 0 else "defect-free"
        raise ValueError(f"masks contain no {which} pixels; pixel AUROC needs both")
    pos_f, neg_f = pos.astype(np.float64), neg.astype(np.float64)
    neg_below = np.cumsum(neg_f) - neg_f
    pairs = float(n_pos) * float(n_neg)
    auroc = float(np.sum(pos_f * (neg_below + 0.5 * neg_f)) / pairs)
    bound = float(0.5 * np.sum(pos_f * neg_f) / pairs)
    return auroc, bound


def pixel_auroc(
    maps: np.ndarray,
    masks: np.ndarray,
    *,
    n_bins: int = DEFAULT_BINS,
    valid: np.ndarray | None = None,
) -> float:
    """Pixel AUROC; see `pixel_auroc_with_bound` for the method and its error bound.

    Warns (RuntimeWarning) when that bound exceeds 1e-3.
    """
    auroc, bound = pixel_auroc_with_bound(maps, masks, n_bins=n_bins, valid=valid)
    if bound > _BOUND_WARN:
        warnings.warn(
            f"pixel_auroc: binning error bound {bound:.2g} (scores concentrated in few of "
            f"{n_bins} bins; raise n_bins or clip outliers)",
            RuntimeWarning,
            stacklevel=2,
        )
    return auroc


def pro_curve(
    maps: np.ndarray,
    masks: np.ndarray,
    *,
    n_thresholds: int = DEFAULT_BINS,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve (MVTec AD): arrays (fpr, pro), fpr ascending from 0 to 1.

    Regions are the 8-connected components of each mask.  For a threshold t,
    pro(t) = mean over all regions r of |{p in r : score_p > t}| / |r| and fpr(t) = share
    of defect-free pixels (of all images) above t.  The thresholds are the edges of
    `n_thresholds` equal-width bins on [min, max].  The mean over regions equals a sum
    over defect pixels weighted 1 / (R * |r(p)|), so one weighted histogram replaces a
    per-region table: memory is O(n_thresholds) whatever the number of regions.
    Returns empty arrays when there is no defect region. Only `valid` pixels count (regions
    are cut to them), as in `pixel_auroc_with_bound`.
    """
    chunks = _binned_chunks(maps, masks, n_thresholds, valid, "n_thresholds")
    region_w = np.zeros(n_thresholds, dtype=np.float64)
    good = np.zeros(n_thresholds, dtype=np.int64)
    n_regions = 0
    for idx, g, v in chunks:
        good += np.bincount(idx[~g & v], minlength=n_thresholds)
        for img_idx, img_mask in zip(idx, g & v, strict=True):
            if not img_mask.any():
                continue
            lab, n_lab = ndimage.label(img_mask, structure=_EIGHT_CONNECTED)
            sizes = np.bincount(lab.ravel())
            inside = lab > 0
            weights = 1.0 / sizes[lab[inside]]
            region_w += np.bincount(img_idx[inside], weights=weights, minlength=n_thresholds)
            n_regions += n_lab
    if n_regions == 0:
        return np.zeros(0), np.zeros(0)
    n_good = int(good.sum())
    if n_good == 0:
        raise ValueError("masks contain no defect-free pixels; the PRO curve needs them")
    # above[k] = mass in bins >= k, i.e. scores at or above edge k; k = n .. 0.
    good_above = np.concatenate([np.cumsum(good[::-1])[::-1], [0]])
    region_above = np.concatenate([np.cumsum(region_w[::-1])[::-1], [0.0]])
    fpr = good_above[::-1] / n_good
    pro = np.minimum(region_above[::-1] / n_regions, 1.0)
    return fpr, pro


def aupro(
    maps: np.ndarray,
    masks: np.ndarray,
    fpr_limit: float = 0.3,
    *,
    n_thresholds: int = DEFAULT_BINS,
    valid: np.ndarray | None = None,
) -> float:
    """Area under the PRO curve for fpr in [0, fpr_limit], divided by fpr_limit.

    A perfect detector scores 1.0.  The curve (see `pro_curve`) is integrated with the
    trapezoid rule and linearly interpolated at `fpr_limit`, as in the MVTec AD code.
    Returns nan when the masks contain no defect region.
    """
    if not (0.0 < fpr_limit <= 1.0):
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks, n_thresholds=n_thresholds, valid=valid)
    if len(fpr) == 0:
        return float("nan")
    # fpr is non-decreasing with pro non-decreasing alongside, so equal-fpr runs are
    # vertical segments of zero area and the trapezoid sum stays correct.
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:end], pro[:end]
    if x[-1] < fpr_limit and end < len(fpr):
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))
    return area / fpr_limit
