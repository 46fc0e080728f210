"""Decision threshold from held-out good tiles at a target false-alarm rate.

With n held-out tiles the empirical quantile only resolves rates down to about 1/n: for the
default 0.001 and a few hundred tiles, it degenerates to the largest held-out score, whose
false-alarm rate on a roll of thousands of tiles is about 1/(n + 1) per tile — far above the
target. A tile score is a maximum over the tile, and maxima follow an extreme-value (Gumbel)
law, so below n·fpr = 10 the threshold is the Gumbel quantile fitted to the held-out scores,
never below the empirical one. Above it, the empirical quantile is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from distill.metrics import threshold_at_fpr

MIN_EXCEEDANCES = 10  # below this many expected exceedances the empirical quantile is too coarse
# fewer held-out good tiles than this: a Gumbel law fitted to them is noise (`rollscan train` warns)
MIN_CALIBRATION_TILES = 20


@dataclass(frozen=True)
class Calibration:
    """A decision threshold and how it was reached, stored with the model."""

    threshold: float
    method: str  # "empirical" or "gumbel"
    n: int
    target_fpr: float


def calibrate_threshold(good_scores: np.ndarray, fpr: float) -> Calibration:
    """The tile-score threshold that flags about `fpr` of good tiles, from held-out good tiles'
    scores: their empirical quantile, or (too few tiles for `fpr`) a Gumbel fit's quantile,
    never below the empirical one (see the module docstring for why)."""
    scores = np.asarray(good_scores, dtype=np.float64)
    empirical = threshold_at_fpr(scores, fpr)
    n = len(scores)
    if n * fpr >= MIN_EXCEEDANCES or n < 3 or np.ptp(scores) == 0:
        return Calibration(empirical, "empirical", n, fpr)
    loc, scale = stats.gumbel_r.fit(scores)
    extrapolated = float(stats.gumbel_r.ppf(1.0 - max(fpr, 1e-9), loc=loc, scale=scale))
    return Calibration(max(empirical, extrapolated), "gumbel", n, fpr)


# Gumbel quantile q(p) = loc − scale·ln(−ln p): the quartiles fix loc and scale.
_LN_LN_4 = float(np.log(np.log(4.0)))  # −ln(−ln ¼)
_LN_LN_4_3 = float(-np.log(-np.log(0.75)))  # −ln(−ln ¾)
MIN_ROLL_BLOCKS = 64  # fewer tile-sized blocks of fabric than this: the roll's quartiles are noise


def roll_threshold(block_peaks: np.ndarray, fpr: float) -> float | None:
    """The tile-score threshold that flags about `fpr` of a roll's own tile-sized blocks.

    The held-out calibration sees good tiles from the strips the model trained on; later
    fabric of the same type can score higher overall (lighting, tension, yarn lot), and the
    calibrated threshold then flags a large share of good fabric. The roll itself is mostly
    good, so its block peaks (the maximum score of each tile-sized block of fabric) estimate
    its own good-score law. They are fitted with a Gumbel law through their quartiles, not by
    maximum likelihood: the defects are the upper tail, and quartiles ignore it as long as
    fewer than a quarter of the blocks hold a defect. None when the roll has too few blocks
    (MIN_ROLL_BLOCKS) or its quartiles coincide."""
    peaks = np.asarray(block_peaks, dtype=np.float64)
    peaks = peaks[np.isfinite(peaks)]
    if len(peaks) < MIN_ROLL_BLOCKS:
        return None
    q1, q3 = np.quantile(peaks, [0.25, 0.75])
    scale = (q3 - q1) / (_LN_LN_4_3 + _LN_LN_4)
    if not scale > 0:
        return None
    loc = q1 + _LN_LN_4 * scale
    return float(stats.gumbel_r.ppf(1.0 - max(fpr, 1e-9), loc=loc, scale=scale))
