"""Streaming defect labelling across bands (worker/components.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from worker.components import Defect, DefectFinder


def find(scores: np.ndarray, band_rows: int, threshold: float = 0.5, **kw) -> list[Defect]:
    finder = DefectFinder(
        threshold, px_per_mm_x=kw.pop("px_x", 1.0), px_per_mm_y=kw.pop("px_y", 1.0), **kw
    )
    for r0 in range(0, len(scores), band_rows):
        finder.add_band(scores[r0 : r0 + band_rows], r0)
    return finder.finish()


def boxes(defects: list[Defect]) -> list[tuple[int, int, int, int, int]]:
    return [(d.row0, d.col0, d.row1, d.col1, d.pixels) for d in defects]


def reference(scores: np.ndarray, threshold: float, connectivity: int = 8):
    """Whole-array scipy labelling: (row0, col0, row1, col1, pixels, max, mean) per component."""
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, _ = ndimage.label(scores > threshold, structure=structure)
    out = []
    for k, (rs, cs) in enumerate(ndimage.find_objects(labels), start=1):
        values = scores[labels == k].astype(np.float64)
        out.append(
            (rs.start, cs.start, rs.stop - 1, cs.stop - 1, values.size, values.max(), values.mean())
        )
    return sorted(out)


def test_blob_straddling_a_band_boundary_is_one_defect():
    scores = np.zeros((32, 20), np.float32)
    scores[13:19, 4:9] = 0.9  # rows 13..18 cross the boundary at 16
    (d,) = find(scores, 16)
    assert boxes([d]) == [(13, 4, 18, 8, 30)]
    assert len(find(scores, 16, connectivity=4)) == 1


def test_u_shape_whose_arms_meet_in_a_later_band_is_one_defect():
    scores = np.zeros((40, 20), np.float32)
    scores[0:30, 2] = 0.8  # left arm, through bands 0, 1 and 2
    scores[0:30, 15] = 0.9  # right arm
    scores[30, 2:16] = 0.7  # the bottom of the U, in band 3 only
    assert len(find(scores[:30], 10)) == 2  # without the bottom: two arms
    (d,) = find(scores, 10)
    assert boxes([d]) == [(0, 2, 30, 15, 30 + 30 + 14)]
    assert d.max_score == pytest.approx(0.9)


def test_arms_joined_only_diagonally_across_the_boundary():
    scores = np.zeros((8, 6), np.float32)
    scores[3, 1] = scores[4, 2] = 1.0  # diagonal neighbours on both sides of row 4
    assert len(find(scores, 4)) == 1
    assert len(find(scores, 4, connectivity=4)) == 2


def test_two_blobs_numbered_along_the_roll_then_across():
    scores = np.zeros((60, 40), np.float32)
    scores[40:44, 1:3] = 0.9  # third along the roll
    scores[5:8, 30:33] = 0.9  # same top row as the next one, further right: second
    scores[5:6, 10:12] = 0.9  # first
    defects = find(scores, 16)
    assert [d.defect_no for d in defects] == [1, 2, 3]
    assert [(d.row0, d.col0) for d in defects] == [(5, 10), (5, 30), (40, 1)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("connectivity", [4, 8])
def test_any_band_height_equals_whole_array_labelling(seed, connectivity):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((150, 70)), sigma=rng.uniform(0.5, 3))
    scores = (noise / noise.std()).astype(np.float16)  # as stored: float16
    expected = reference(scores, 0.8, connectivity)
    assert len(expected) > 3  # the data has a few components, some spanning bands
    results = []
    for band_rows in (1, 3, 16, 64, len(scores)):
        defects = find(scores, band_rows, threshold=0.8, connectivity=connectivity)
        assert [d.defect_no for d in defects] == list(range(1, len(defects) + 1))
        got = sorted(
            (*box, d.max_score, d.mean_score)
            for box, d in zip(boxes(defects), defects, strict=True)
        )
        assert [g[:6] for g in got] == [e[:6] for e in expected]
        assert [g[6] for g in got] == pytest.approx([e[6] for e in expected], rel=1e-12)
        results.append(defects)
    for other in results[1:]:  # identical output, numbering included, whatever the banding
        assert boxes(other) == boxes(results[0])
        assert [d.defect_no for d in other] == [d.defect_no for d in results[0]]


def test_millimetres_on_a_hand_computed_example():
    scores = np.zeros((20, 12), np.float32)
    scores[10:13, 3:8] = 0.6  # 3 rows × 5 cols = 15 ¼-res pixels
    scores[11, 5] = 0.9
    (d,) = find(scores, 8, threshold=0.5, px_x=2.0, px_y=4.0, scale=4)
    # one ¼-res pixel = 4 full-res px = 2 mm across (x), 1 mm along (y)
    assert (d.x0_mm, d.x1_mm) == pytest.approx((6.0, 16.0))  # cols 3 .. 7 inclusive
    assert (d.y0_mm, d.y1_mm) == pytest.approx((10.0, 13.0))  # rows 10 .. 12 inclusive
    assert (d.x_mm, d.y_mm) == pytest.approx(
        (11.0, 11.5)
    )  # ((3 + 7)/2 + 0.5)·2, ((10 + 12)/2 + 0.5)·1
    assert (d.length_mm, d.width_mm) == pytest.approx((10.0, 3.0))
    assert d.area_mm2 == pytest.approx(15 * 16 / 8)  # 15 px × 4² / (2 · 4)
    assert d.max_score == pytest.approx(0.9)
    assert d.mean_score == pytest.approx((14 * 0.6 + 0.9) / 15)
    assert (d.row0, d.col0, d.row1, d.col1, d.pixels, d.defect_no) == (10, 3, 12, 7, 15, 1)


def test_a_box_in_the_last_partial_block_ends_at_the_image_edge():
    """A roll of 77 rows × 46 px: its last ¼-res row covers 1 row, its last column 2 px. A
    defect there reached up to 3 px past the image (y1_mm beyond the roll's length)."""
    scores = np.zeros((20, 12), np.float32)
    scores[17:20, 9:12] = 0.9  # ¼-res rows 17..19, columns 9..11: the roll's corner
    unclamped, clamped = (
        find(scores, 8, px_x=2.0, px_y=4.0, scale=4, **kw) for kw in ({}, {"image_px": (77, 46)})
    )
    assert (unclamped[0].x1_mm, unclamped[0].y1_mm) == pytest.approx((24.0, 20.0))
    (d,) = clamped
    assert (d.x0_mm, d.x1_mm, d.y0_mm, d.y1_mm) == pytest.approx((18.0, 23.0, 17.0, 19.25))
    assert (d.x_mm, d.y_mm) == pytest.approx((20.5, 18.125))
    assert (d.length_mm, d.width_mm) == pytest.approx((5.0, 2.25))
    assert d.area_mm2 == pytest.approx(5.0 * 2.25)  # its blocks' 18 mm², at most its box's
    assert d.row1 == 19 and d.col1 == 11  # the ¼-res cells themselves are unchanged


def test_length_is_the_longer_side_along_the_roll():
    scores = np.zeros((30, 10), np.float32)
    scores[2:22, 4] = 1.0  # 20 rows tall, 1 col wide
    (d,) = find(scores, 7, px_x=1.0, px_y=2.0, scale=4)
    assert (d.length_mm, d.width_mm) == pytest.approx((40.0, 4.0))


def test_threshold_is_strict_and_min_area_drops_specks():
    scores = np.zeros((10, 10), np.float32)
    scores[1, 1] = 0.5  # equal to the threshold: not a defect
    scores[5, 5] = 0.51
    scores[7:9, 0:2] = 0.7
    assert boxes(find(scores, 4)) == [(5, 5, 5, 5, 1), (7, 0, 8, 1, 4)]
    assert boxes(find(scores, 4, min_area_px=2)) == [(7, 0, 8, 1, 4)]
    assert find(np.zeros((5, 5), np.float32), 2) == []


def test_threshold_compares_in_double_precision():
    value = np.float32(0.1)  # 0.10000000149…, just above the double 0.1
    assert len(find(np.full((2, 2), value), 1, threshold=0.1)) == 1


def test_nan_raises():
    scores = np.zeros((10, 10), np.float16)
    scores[6, 3] = np.nan
    finder = DefectFinder(0.5, 1.0, 1.0)
    finder.add_band(scores[:5], 0)
    with pytest.raises(ValueError, match="NaN"):
        finder.add_band(scores[5:], 5)


def test_bands_must_come_in_order_and_keep_their_width():
    finder = DefectFinder(0.5, 1.0, 1.0)
    finder.add_band(np.zeros((4, 6)), 0)
    with pytest.raises(ValueError, match="order"):
        finder.add_band(np.zeros((4, 6)), 5)
    with pytest.raises(ValueError, match="width"):
        finder.add_band(np.zeros((4, 7)), 4)
    finder.finish()
    with pytest.raises(RuntimeError):
        finder.add_band(np.zeros((4, 6)), 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": float("nan")},
        {"px_per_mm_x": 0.0},
        {"px_per_mm_y": -1.0},
        {"connectivity": 6},
        {"scale": 0},
        {"min_area_px": 0},
    ],
)
def test_bad_parameters(kwargs):
    args = {"threshold": 0.5, "px_per_mm_x": 1.0, "px_per_mm_y": 1.0} | kwargs
    with pytest.raises(ValueError):
        DefectFinder(**args)
