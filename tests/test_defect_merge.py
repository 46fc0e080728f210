"""Fragments of one flaw are one defect: the merge rule (`worker.components.merge_groups`), the
streaming finder across band boundaries, finalize through PostgreSQL, the setting, and the
AITEX benchmark's planted flaws counted by the same rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage
from sqlalchemy import select

import worker.components as components
from rollscan_testing.aitex_fabric_roll import mask_flaws
from rollscan_testing.roll_matching import pixel_matches
from storage.schema import Defect, Model, Roll, Run
from storage.settings import MERGE_GAP_MM, Settings, SettingsError, get_settings
from storage.zarr_rolls import create_roll
from worker.components import DefectFinder, merge_groups
from worker.context import WorkerContext
from worker.finalize import finalize_run
from worker.inline import InlineEnqueuer


def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y1]


def groups(*boxes: list[float], gap: float) -> list[int]:
    return merge_groups(np.array(boxes, dtype=np.float64).reshape(-1, 4), gap).tolist()


# ------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize(
    ("second_x0", "merged"), [(14.99, True), (15.0, True), (15.01, False), (100.0, False)]
)
def test_gap_across_just_under_at_and_over_the_limit(second_x0, merged):
    # the first box ends at x = 5: gaps 9.99, 10, 10.01 and 95 mm; they overlap along
    assert groups(box(0, 0, 5, 5), box(second_x0, 2, second_x0 + 3, 4), gap=10.0) == (
        [0, 0] if merged else [0, 1]
    )


@pytest.mark.parametrize(("second_y0", "merged"), [(14.99, True), (15.0, True), (15.01, False)])
def test_gap_along_just_under_at_and_over_the_limit(second_y0, merged):
    assert groups(box(0, 0, 5, 5), box(1, second_y0, 4, second_y0 + 1), gap=10.0) == (
        [0, 0] if merged else [0, 1]
    )


def test_both_gaps_must_be_within_the_limit():
    assert groups(box(0, 0, 1, 1), box(9, 9, 10, 10), gap=8.0) == [0, 0]  # 8 across, 8 along
    assert groups(box(0, 0, 1, 1), box(9, 9.5, 10, 10), gap=8.0) == [0, 1]  # 8.5 along


def test_zero_gap_merges_only_boxes_that_touch_or_overlap():
    assert groups(box(0, 0, 2, 2), box(1, 1, 3, 3), gap=0.0) == [0, 0]  # overlap
    assert groups(box(0, 0, 2, 2), box(2, 0, 3, 2), gap=0.0) == [0, 0]  # share an edge
    assert groups(box(0, 0, 2, 2), box(2, 2, 3, 3), gap=0.0) == [0, 0]  # share a corner
    assert groups(box(0, 0, 2, 2), box(2.1, 0, 3, 2), gap=0.0) == [0, 1]


def test_chains_merge_transitively_and_ids_follow_first_appearance():
    # a dotted crease: each dash 8 mm from the next, the ends 40 mm apart; a far speck
    dashes = [box(10 * k, 0, 10 * k + 2, 1) for k in range(5)]
    assert groups(box(500, 500, 501, 501), *dashes, gap=8.0) == [0, 1, 1, 1, 1, 1]
    assert groups(*dashes, gap=7.9) == [0, 1, 2, 3, 4]


def test_merged_boxes_merge_again_until_no_two_defects_are_within_the_gap():
    # A and B link (1 mm apart); C is 3 mm from each alone, but inside their union's box
    a, b, c = box(0, 0, 1, 10), box(2, 0, 10, 1), box(5, 4, 6, 5)
    assert groups(a, b, c, gap=2.0) == [0, 0, 0]
    assert groups(a, c, gap=2.0) == [0, 1] and groups(b, c, gap=2.0) == [0, 1]


def test_empty_single_and_invalid_input():
    assert merge_groups(np.zeros((0, 4)), 10.0).tolist() == []
    assert groups(box(0, 0, 1, 1), gap=0.0) == [0]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gap_mm"):
            merge_groups(np.array([box(0, 0, 1, 1)]), bad)
    with pytest.raises(ValueError, match="finite"):
        merge_groups(np.array([box(0, 0, float("nan"), 1)]), 1.0)
    with pytest.raises(ValueError, match="x0 ≤ x1"):
        merge_groups(np.array([box(2, 0, 1, 1)]), 1.0)


def _brute_force(boxes: np.ndarray, gap: float) -> list[set[int]]:
    """The rule by its definition: merge any two groups within the gap until none are."""
    parts = [({i}, boxes[i].copy()) for i in range(len(boxes))]
    merged = True
    while merged:
        merged = False
        for (i, (mi, bi)), (j, (mj, bj)) in itertools.combinations(enumerate(parts), 2):
            gx = max(bi[0], bj[0]) - min(bi[2], bj[2])
            gy = max(bi[1], bj[1]) - min(bi[3], bj[3])
            if gx <= gap and gy <= gap:
                both = np.r_[np.minimum(bi[:2], bj[:2]), np.maximum(bi[2:], bj[2:])]
                parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [(mi | mj, both)]
                merged = True
                break
    return sorted((members for members, _ in parts), key=min)


def _as_sets(group: np.ndarray) -> list[set[int]]:
    """The groups as sets of box indices, in the order of their ids."""
    return [set(np.flatnonzero(group == g).tolist()) for g in range(int(group.max()) + 1)]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("chunk", [1, 5, 1 << 22])  # the sweep's pairs, a few at a time or all
def test_sweep_agrees_with_the_definition_in_any_order(seed, chunk, monkeypatch):
    monkeypatch.setattr(components, "_PAIRS_PER_CHUNK", chunk)
    rng = np.random.default_rng(seed)
    n = 30
    corner = rng.uniform(0, 100, (n, 2)).round(1)  # round: gaps that equal the limit exactly
    boxes = np.c_[corner, corner + rng.uniform(0, 12, (n, 2)).round(1)]
    gap = float(rng.choice([0.0, 1.0, 2.5, 6.0]))
    group = merge_groups(boxes, gap)
    assert _as_sets(group) == _brute_force(boxes, gap)
    first = [int(np.flatnonzero(group == g)[0]) for g in range(int(group.max()) + 1)]
    assert first == sorted(first)  # ids by first appearance
    perm = rng.permutation(n)  # the same boxes in another order: the same partition
    again, moved = merge_groups(boxes[perm], gap), group[perm]
    assert np.array_equal(again[:, None] == again[None, :], moved[:, None] == moved[None, :])


def test_many_components_along_a_roll_stay_cheap():
    # 200 000 specks along 1 km of roll: the sweep looks at neighbours, not at every pair
    rng = np.random.default_rng(0)
    corner = np.c_[rng.uniform(0, 2000, 200_000), rng.uniform(0, 1e6, 200_000)]
    boxes = np.c_[corner, corner + 1.0]
    group = merge_groups(boxes, 10.0)
    assert 150_000 < group.max() + 1 < 200_000


# ---------------------------------------------------------------------- the streaming finder


def find(scores: np.ndarray, band_rows: int, **kw) -> list[components.Defect]:
    finder = DefectFinder(0.5, px_per_mm_x=kw.pop("px_x", 1.0), px_per_mm_y=kw.pop("px_y", 1.0),
                          scale=kw.pop("scale", 1), **kw)  # fmt: skip
    for r0 in range(0, len(scores), band_rows):
        finder.add_band(scores[r0 : r0 + band_rows], r0)
    return finder.finish()


def _split_hole() -> np.ndarray:
    """A hole whose rim comes out as three fragments, two rows apart across the boundary at
    row 16, beside a far speck."""
    scores = np.zeros((40, 40), np.float32)
    scores[12:15, 10:16] = 0.9  # band 0 (rows 0..15)
    scores[17:20, 9:12] = 0.7  # band 1: 2 empty rows below the first, which a band ends in
    scores[17:21, 14:17] = 0.6
    scores[35, 38] = 0.8  # far away: a defect of its own
    return scores


def test_a_flaw_split_across_a_band_boundary_is_one_defect():
    scores = _split_hole()
    assert len(find(scores, 16)) == 4  # no merging: three fragments and a speck
    merged = find(scores, 16, merge_gap_mm=3.0)
    assert len(merged) == 2
    hole, speck = merged
    assert (hole.row0, hole.col0, hole.row1, hole.col1) == (12, 9, 20, 16)
    assert (hole.pixels, hole.fragments) == (18 + 9 + 12, 3)
    assert hole.area_mm2 == pytest.approx(39.0)
    assert hole.max_score == pytest.approx(0.9)
    assert hole.mean_score == pytest.approx((18 * 0.9 + 9 * 0.7 + 12 * 0.6) / 39)
    assert (hole.x0_mm, hole.y0_mm, hole.x1_mm, hole.y1_mm) == (9.0, 12.0, 17.0, 21.0)
    assert (hole.length_mm, hole.width_mm) == (9.0, 8.0)
    assert (speck.defect_no, speck.pixels, speck.fragments) == (2, 1, 1)
    assert len(find(scores, 16, merge_gap_mm=1.9)) == 4  # 2 empty rows = 2 mm


@pytest.mark.parametrize("band_rows", [1, 3, 7, 16, 17, 40])
def test_any_banding_gives_what_the_whole_map_gives(band_rows):
    scores = _split_hole()
    whole = find(scores, len(scores), merge_gap_mm=3.0)
    assert find(scores, band_rows, merge_gap_mm=3.0) == whole


@pytest.mark.parametrize("seed", range(4))
def test_random_maps_merge_as_the_rule_says_whatever_the_banding(seed):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((160, 90)), sigma=1.2)
    scores = (noise / noise.std() / 3 + 0.1).astype(np.float16)  # many small blobs > 0.5
    labels, n = ndimage.label(scores > 0.5, structure=np.ones((3, 3)))
    assert n > 20
    # the reference: whole-array components, boxes in mm (¼-res px × 4 / px_per_mm), the rule
    slices = ndimage.find_objects(labels)
    mm = np.array([(c.start * 2.0, r.start * 0.5, c.stop * 2.0, r.stop * 0.5) for r, c in slices])
    group = merge_groups(mm, 4.0)
    expected = sorted(
        (sum(int((labels == k + 1).sum()) for k in np.flatnonzero(group == g)),
         int(np.count_nonzero(group == g)))
        for g in range(int(group.max()) + 1)
    )  # fmt: skip
    assert len(expected) < n  # some did merge
    results = [
        find(scores, rows, px_x=2.0, px_y=8.0, scale=4, merge_gap_mm=4.0) for rows in (5, 32, 160)
    ]
    assert sorted((d.pixels, d.fragments) for d in results[0]) == expected
    assert results[1] == results[0] and results[2] == results[0]


def test_min_area_counts_the_merged_flaw_not_its_fragments():
    scores = np.zeros((20, 20), np.float32)
    scores[2, 2:4] = scores[4, 2:4] = 0.9  # two 2-pixel fragments one row apart
    scores[15, 15] = 0.9  # a lone speck
    assert find(scores, 8, min_area_px=3) == []
    (d,) = find(scores, 8, min_area_px=3, merge_gap_mm=1.0)
    assert (d.pixels, d.fragments, d.row0, d.row1) == (4, 2, 2, 4)


def test_gap_uses_each_axis_scale():
    # scale 4 at 2 px/mm across and 4 px/mm along: a ¼-res pixel is 2 mm across, 1 mm along
    across = np.zeros((10, 20), np.float32)
    across[4, 2] = across[4, 6] = 0.9  # 3 empty columns: 6 mm
    assert len(find(across, 4, px_x=2.0, px_y=4.0, scale=4, merge_gap_mm=6.0)) == 1
    assert len(find(across, 4, px_x=2.0, px_y=4.0, scale=4, merge_gap_mm=5.9)) == 2
    along = across.T.copy()  # 3 empty rows: 3 mm
    assert len(find(along, 4, px_x=2.0, px_y=4.0, scale=4, merge_gap_mm=3.0)) == 1
    assert len(find(along, 4, px_x=2.0, px_y=4.0, scale=4, merge_gap_mm=2.9)) == 2


def test_zero_gap_joins_diagonal_neighbours_of_four_connectivity_only():
    scores = np.zeros((6, 6), np.float32)
    scores[1, 1] = scores[2, 2] = 0.9  # corners touch
    scores[4, 4] = 0.9  # one empty pixel from (2, 2)
    assert len(find(scores, 3, connectivity=4)) == 3
    assert [d.fragments for d in find(scores, 3, connectivity=4, merge_gap_mm=0.0)] == [2, 1]


@pytest.mark.parametrize("gap", [-0.1, float("nan"), float("inf")])
def test_finder_refuses_a_bad_gap(gap):
    with pytest.raises(ValueError, match="merge_gap_mm"):
        DefectFinder(0.5, 1.0, 1.0, merge_gap_mm=gap)


# -------------------------------------------------------------------------- the setting


def test_setting_default_env_and_range(monkeypatch):
    assert get_settings().merge_gap_mm == MERGE_GAP_MM == 10.0
    monkeypatch.setenv("ROLLSCAN_MERGE_GAP_MM", "2.5")
    assert get_settings().merge_gap_mm == 2.5
    for bad in ("-1", "nan"):
        monkeypatch.setenv("ROLLSCAN_MERGE_GAP_MM", bad)
        with pytest.raises(SettingsError, match="merge_gap_mm"):
            get_settings()


# ----------------------------------------------------------------- finalize, in PostgreSQL

PX_PER_MM = 10.0  # a ¼-res pixel is 0.4 mm


def _hole_and_knot() -> np.ndarray:
    """¼-res map of a 512 × 512 px roll in two bands of 256 rows (64 ¼-res rows): a hole in
    two fragments either side of the boundary, 0.8 mm apart, and a knot 20 mm away."""
    scores = np.zeros((128, 128), np.float32)
    scores[58:63, 40:50] = 0.9  # band 0
    scores[65:70, 42:52] = 0.8  # band 1
    scores[100:103, 100:104] = 0.7
    return scores


@pytest.mark.parametrize(("gap", "expected"), [(10.0, 2), (0.0, 3)])
def test_finalize_stores_one_row_per_flaw(db_engine, local_store, tmp_path, gap, expected):
    settings = Settings(band_height=256, data_dir=tmp_path / "data", merge_gap_mm=gap)
    ctx = WorkerContext(settings, db_engine, local_store, InlineEnqueuer(), device="cpu")
    scores = _hole_and_knot()
    arrays = create_roll(local_store, "R-merge", width=512, channels=1, band_height=256,
                         manifest={"roll_id": "R-merge"})  # fmt: skip
    arrays.write_band_scores("m-merge", 0, scores[:64])
    arrays.write_band_scores("m-merge", 1, scores[64:])
    with ctx.session() as session:
        session.add(
            Roll(
                id="R-merge",
                fabric_type="denim",
                width_mm=51.2,
                px_per_mm_x=PX_PER_MM,
                px_per_mm_y=PX_PER_MM,
                width_px=512,
                channels=1,
                rows_ingested=512,
            )
        )
        session.add(Model(version="m-merge", fabric_type="denim", variant="residual",
                          teacher="resnet34", tile=256, checkpoint_uri="file:///m.pt",
                          sha256="a" * 64, threshold=0.5))  # fmt: skip
        session.flush()
        run = Run(roll_id="R-merge", model_version="m-merge", purpose="live", status="scoring",
                  bands_total=2, bands_done=2)  # fmt: skip
        session.add(run)
        session.flush()
        run_id = run.id

    assert finalize_run(ctx, run_id) == expected
    with ctx.session() as session:
        rows = session.scalars(
            select(Defect).where(Defect.run_id == run_id).order_by(Defect.defect_no)
        ).all()
        hole = rows[0]
        if gap == 0.0:  # the fragments stay two rows, either side of the boundary at 25.6 mm
            flat = [v for r in rows[:2] for v in (r.y0_mm, r.y1_mm)]
            assert flat == pytest.approx([23.2, 25.2, 26.0, 28.0])
            return
        assert (hole.x0_mm, hole.y0_mm, hole.x1_mm, hole.y1_mm) == pytest.approx(
            (16.0, 23.2, 20.8, 28.0)
        )
        assert hole.area_mm2 == pytest.approx(100 * 0.16)
        assert hole.max_score == pytest.approx(0.9, rel=1e-3)  # stored as float16
        assert hole.mean_score == pytest.approx((50 * 0.9 + 50 * 0.8) / 100, rel=1e-3)
        assert rows[1].x0_mm == pytest.approx(40.0)


# ---------------------------------------------------------- planted flaws, AITEX benchmark


def test_a_dotted_mask_is_one_planted_flaw():
    mask = np.zeros((256, 600), dtype=bool)
    for k in range(12):
        mask[100, 200 + 5 * k] = True  # a crease drawn as 12 specks, 0.4 mm apart at 10 px/mm
    mask[10:20, 500:510] = True  # 24.4 mm away across: a flaw of its own (first in raster order)
    flaws = mask_flaws(mask, 10.0, 10.0, "crease", row0=1000)
    assert [(f.components, len(f.pixels)) for f in flaws] == [(1, 100), (12, 12)]
    assert flaws[0].bbox_px == (1010, 500, 1020, 510)
    assert flaws[1].bbox_px == (1100, 200, 1101, 256)
    assert flaws[1].center_px == (1100, 228)
    assert set(flaws[1].pixels) == {(1100, 200 + 5 * k) for k in range(12)}
    assert len(mask_flaws(mask, 10.0, None, "crease")) == 13  # unmerged: every component
    assert mask_flaws(np.zeros((4, 4), bool), 10.0, 10.0, "none") == []


def test_pixel_matches_counts_found_fragments_as_one_defect():
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:12, 8:12] = True
    planted = mask_flaws(mask, 10.0, 10.0, "hole")
    scores = np.zeros((16, 16), np.float16)
    scores[2, 2] = 0.9  # on the mask
    scores[2, 5] = 0.9  # a fragment 2 ¼-res px (0.8 mm) beside it, touching no mask
    assert pixel_matches(scores, 0.5, planted) == ({0}, 1)  # unmerged: a false defect
    assert pixel_matches(scores, 0.5, planted, px_per_mm=10.0, merge_gap_mm=10.0) == ({0}, 0)
    assert pixel_matches(scores, 0.5, planted, px_per_mm=10.0, merge_gap_mm=0.5) == ({0}, 1)
