"""The selection's one-standard-error rule: a single map wins ties within the noise."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from distill.selection import auroc_standard_error, pick_weight


@pytest.mark.parametrize(("shift", "n_positive", "n_negative"), [(1.8, 100, 50), (3.3, 126, 63)])
def test_the_standard_error_matches_the_spread_of_simulated_aurocs(shift, n_positive, n_negative):
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(n_positive), np.zeros(n_negative)]
    aurocs = [
        roc_auc_score(labels, np.r_[rng.normal(shift, 1, n_positive), rng.normal(0, 1, n_negative)])
        for _ in range(600)
    ]
    predicted = auroc_standard_error(float(np.mean(aurocs)), n_positive, n_negative)
    assert predicted == pytest.approx(np.std(aurocs), rel=0.3)


def test_the_standard_error_shrinks_with_more_tiles_and_vanishes_at_a_perfect_score():
    assert auroc_standard_error(0.95, 400, 200) < auroc_standard_error(0.95, 100, 50)
    assert auroc_standard_error(1.0, 100, 50) == 0.0


def _trials(means: dict[float, float]) -> dict[float, dict[str, float]]:
    return {w: {"tile_auroc": m, "pixel_auroc": m, "mean": m} for w, m in means.items()}


@pytest.mark.parametrize(
    ("means", "tolerance", "chosen"),
    [
        # a fusion ahead by more than the noise keeps its place
        ({0.0: 0.970, 0.25: 0.980, 0.5: 0.985, 0.75: 0.975, 1.0: 0.950}, 0.002, 0.5),
        # the memory bank alone within the noise of the best fusion: the bank alone
        ({0.0: 0.9833, 0.25: 0.9843, 0.5: 0.9846, 0.75: 0.9825, 1.0: 0.9531}, 0.002, 0.0),
        # the student alone within it, the bank not: the student alone
        ({0.0: 0.950, 0.5: 0.972, 0.75: 0.974, 1.0: 0.973}, 0.002, 1.0),
        # both within it: the better of the two
        ({0.0: 0.9800, 0.5: 0.9810, 1.0: 0.9805}, 0.002, 1.0),
        # no tolerance: the best mean, as before the rule
        ({0.0: 0.9833, 0.5: 0.9846, 1.0: 0.9531}, 0.0, 0.5),
        # one weight (a fixed choice): that weight
        ({0.75: 0.9}, 0.01, 0.75),
    ],
)
def test_a_single_map_within_the_tolerance_of_the_best_is_chosen(means, tolerance, chosen):
    assert pick_weight(_trials(means), tolerance) == chosen
