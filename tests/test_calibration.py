"""Threshold calibration: empirical where the data resolves the rate, Gumbel where it cannot."""

import numpy as np
import pytest
from scipy import stats

from distill.calibration import calibrate_threshold


def test_plenty_of_tiles_use_the_empirical_quantile():
    scores = np.random.default_rng(0).gumbel(1.0, 0.1, 20_000)
    cal = calibrate_threshold(scores, 0.01)
    assert cal.method == "empirical"
    assert (scores > cal.threshold).mean() <= 0.01


def test_few_tiles_extrapolate_to_the_target_rate():
    truth = stats.gumbel_r(loc=1.0, scale=0.1)
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(20):
        cal = calibrate_threshold(truth.rvs(size=300, random_state=rng), 0.001)
        assert cal.method == "gumbel" and cal.n == 300
        rates.append(truth.sf(cal.threshold))
    # the true false-alarm rate lands near the target, far below the empirical max's ~1/300
    assert 0.0002 < np.median(rates) < 0.003


def test_never_below_the_empirical_quantile_and_degenerate_input():
    scores = np.array([0.1, 0.1, 0.1, 0.9])
    assert calibrate_threshold(scores, 0.001).threshold >= 0.9
    assert calibrate_threshold(np.full(5, 0.3), 0.001).threshold == pytest.approx(0.3)
