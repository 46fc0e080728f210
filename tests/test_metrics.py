import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from distill.metrics import (
    aupro,
    coverage,
    f1_max,
    image_auroc,
    pixel_auroc,
    pixel_auroc_with_bound,
    pro_curve,
    threshold_at_fpr,
)

# The brief's small example: defective 0.3, 0.4; good 0.1, 0.2, 0.35.
SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.35])
LABELS = np.array([0, 0, 1, 1, 0])


def _two_region_masks() -> np.ndarray:
    """One image with a small (2×2) and a large (10×10) defect region."""
    masks = np.zeros((2, 20, 20), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 10:20, 10:20] = True
    return masks


# ------------------------------------------------------------------------- tile metrics


def test_small_example_by_hand():
    # AUROC: of the 6 (defect, good) pairs only 0.3 < 0.35 is misordered -> 5/6.
    assert image_auroc(SCORES, LABELS) == pytest.approx(5 / 6)
    # F1 at "score >= 0.3": TP 2, FP 1, FN 0 -> P 2/3, R 1 -> F1 0.8 (the best).
    assert f1_max(SCORES, LABELS) == pytest.approx(0.8)
    # t_low 0.3, t_high 0.35: 0.1, 0.2 surely good, 0.4 surely defective -> 3/5.
    assert coverage(SCORES, LABELS) == pytest.approx(0.6)


def test_perfect_and_reversed_separation():
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1])
    assert image_auroc(scores, labels) == 1.0
    assert image_auroc(-scores, labels) == 0.0
    assert f1_max(scores, labels) == 1.0
    assert coverage(scores, labels) == 1.0  # t_low 0.8 > t_high 0.3: all decided
    assert coverage(-scores, labels) == 0.0  # fully overlapping ranges: nothing decided


def test_coverage_ties_at_the_cutoffs_are_undecided():
    scores = np.array([0.0, 0.5, 0.5, 1.0])
    labels = np.array([0, 0, 1, 1])
    # t_low = t_high = 0.5: only 0.0 and 1.0 are decided.
    assert coverage(scores, labels) == pytest.approx(0.5)


def test_threshold_at_fpr_on_1000_values():
    rng = np.random.default_rng(1)
    good = rng.normal(size=1000)
    for fpr in (0.0, 0.001, 0.01, 0.05, 0.29, 0.5):
        t = threshold_at_fpr(good, fpr)
        assert np.mean(good > t) <= fpr
        # Smallest such t: the next lower score already lets too many through.
        below = np.max(good[good < t])
        assert np.mean(good > below) > fpr
    assert threshold_at_fpr(good, 0.0) == good.max()
    # Integer scores make the quantile visible: 10 of 1000 may lie above -> t = 989.
    assert threshold_at_fpr(np.random.default_rng(2).permutation(1000), 0.01) == 989
    # 0.29 * 100 is 28.999999999999996 in floating point; 29 scores may still lie above.
    assert threshold_at_fpr(np.arange(100.0), 0.29) == 70.0


def test_threshold_at_fpr_with_ties():
    good = np.array([1.0, 2.0, 2.0, 2.0, 3.0])
    assert threshold_at_fpr(good, 0.2) == 2.0  # one score (3.0) may lie above
    assert threshold_at_fpr(good, 0.1) == 3.0  # none may


# ------------------------------------------------------------------------ pixel metrics


def test_pixel_auroc_perfect_and_reversed():
    masks = _two_region_masks()
    maps = masks.astype(np.float32)
    assert pixel_auroc(maps, masks) == 1.0
    assert pixel_auroc(-maps, masks) == 0.0


def test_pixel_auroc_agrees_with_sklearn_within_bound():
    rng = np.random.default_rng(3)
    masks = rng.random((4, 24, 24)) < 0.1
    # Rounded scores add exact ties, which both sides must count as one half.
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 2).astype(np.float32)
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    for n_bins in (8, 256, 1 << 16):
        auroc, bound = pixel_auroc_with_bound(maps, masks, n_bins=n_bins)
        assert abs(auroc - exact) <= bound + 1e-12
    coarse = pixel_auroc_with_bound(maps, masks, n_bins=8)
    assert coarse[1] > 1e-3  # a coarse grid reports a real, non-trivial bound
    fine = pixel_auroc_with_bound(maps, masks)
    assert fine[0] == pytest.approx(exact, abs=1e-3)


def test_pixel_auroc_warns_when_outlier_squeezes_the_grid():
    rng = np.random.default_rng(4)
    masks = rng.random((2, 16, 16)) < 0.2
    maps = rng.random(masks.shape)
    maps[0, 0, 0] = 1e9
    with pytest.warns(RuntimeWarning, match="error bound"):
        pixel_auroc(maps, masks)


def test_aupro_perfect_map_is_one():
    masks = _two_region_masks()
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)


def test_aupro_one_of_two_regions_detected():
    masks = _two_region_masks()
    # Only the small region lights up; the large one scores like the background.
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, 1:3, 1:3] = 1.0
    fpr, pro = pro_curve(maps, masks)
    # At FPR 0 the overlap is the region mean 0.5, although only 4 of 104 defect
    # pixels are found: regions weigh equally whatever their size.
    assert pro[fpr == 0].max() == pytest.approx(0.5)
    # The rest is one tie at score 0 (FPR 0 -> 1, PRO 0.5 -> 1), interpolated linearly:
    # area to 0.3 = 0.3 * 0.5 + 0.5 * 0.3 * 0.15 = 0.1725, / 0.3 = 0.575.
    assert aupro(maps, masks) == pytest.approx(0.575)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75)


def test_aupro_uses_8_connectivity():
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 2, 2:4] = True
    masks[0, 3, 4] = True  # touches (2, 3) only diagonally
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, 3, 4] = 1.0
    fpr, pro = pro_curve(maps, masks)
    # One 3-pixel region, a third found; 4-connectivity would see two regions (0 + 1) / 2.
    assert pro[fpr == 0].max() == pytest.approx(1 / 3)


def test_aupro_regions_across_images_and_memmap(tmp_path):
    rng = np.random.default_rng(5)
    masks = np.zeros((6, 32, 32), dtype=bool)
    masks[1, 4:9, 4:9] = True
    masks[4, 20:30, 2:6] = True
    maps = (rng.random(masks.shape) + 2.0 * masks).astype(np.float32)
    on_disk = np.lib.format.open_memmap(tmp_path / "maps.npy", "w+", np.float32, maps.shape)
    on_disk[:] = maps
    assert aupro(on_disk, masks) == pytest.approx(1.0)
    assert pixel_auroc(on_disk, masks) == 1.0


def test_aupro_nan_without_regions():
    masks = np.zeros((2, 8, 8), dtype=bool)
    assert np.isnan(aupro(np.random.default_rng(0).random(masks.shape), masks))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2], [0, 1, 1], "length"),
        ([0.1, 0.2, 0.3], [0, 0, 0], "no defective"),
        ([0.1, 0.2, 0.3], [1, 1, 1], "no good"),
        ([0.1, 0.2, 0.3], [0, 2, 1], "0 .good. or 1"),
        ([0.1, np.nan, 0.3], [0, 1, 1], "NaN"),
        ([], [], "empty"),
    ],
)
def test_tile_metrics_reject_bad_input(scores, labels, match):
    for metric in (image_auroc, coverage):
        with pytest.raises(ValueError, match=match):
            metric(np.array(scores), np.array(labels))


def test_f1_needs_defects_and_matching_lengths():
    with pytest.raises(ValueError, match="no defective"):
        f1_max(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="length"):
        f1_max(np.array([0.1, 0.2]), np.array([1]))


def test_pixel_metrics_reject_bad_input():
    masks = _two_region_masks()
    maps = masks.astype(np.float32)
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(maps[:, :10], masks)
    with pytest.raises(ValueError, match="no defect pixels"):
        pixel_auroc(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="no defect-free"):
        pixel_auroc(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.where(masks, np.nan, 0.0), masks)
    with pytest.raises(ValueError, match="boolean"):
        aupro(maps, masks * 0.5)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="no defect-free"):
        aupro(maps, np.ones_like(masks))


def test_threshold_at_fpr_rejects_bad_input():
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr(np.arange(10.0), 1.0)
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr(np.arange(10.0), -0.1)
    with pytest.raises(ValueError, match="non-empty"):
        threshold_at_fpr(np.array([]), 0.1)
