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
