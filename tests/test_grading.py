"""The four-point system (ASTM D5430), pure logic, against hand-computed numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from results.grading import decisive_text, grade_roll
from results.grading_rules import GradingRules, RuleBook, load_rules
from worker.components import DefectFinder

IN, YD = 25.4, 914.4  # mm
ROLL_100YD, WIDTH_60IN = 100 * YD, 60 * IN  # 91.44 m × 1524 mm


def _defect(length_in: float, yard: int, x0_mm: float = 500.0, along: float = 100.0) -> tuple:
    """A defect `length_in` long across the roll, `along` mm into yard `yard`."""
    y0 = yard * YD + along
    return (x0_mm, y0, x0_mm + length_in * IN, y0 + 10.0, length_in * IN)


def test_points_by_length_and_points_per_100_square_yards() -> None:
    defects = [_defect(2, 0), _defect(5, 10), _defect(8, 20), _defect(12, 30)]
    r = grade_roll(defects, ROLL_100YD, WIDTH_60IN)
    assert r.per_defect_points == [1, 2, 3, 4]
    assert r.points == 10
    assert r.yards == pytest.approx(100.0)
    assert r.width_in == pytest.approx(58.0)  # 60 in less two 1-in selvage margins
    assert r.points_per_100yd2 == pytest.approx(10 * 3600 / (100 * 58))  # 6.2069
    assert r.points_per_100yd2 == pytest.approx(6.2069, abs=1e-4)
    assert r.grade == "A"
    assert r.details["yards_capped"] == [] and r.details["defects_ignored_at_selvage"] == []
    json.dumps(r.details)  # stored as JSONB


def test_at_most_four_points_per_yard() -> None:
    r = grade_roll(
        [_defect(12, 7, x0_mm=200.0 + 300 * i) for i in range(4)], ROLL_100YD, WIDTH_60IN
    )
    assert r.per_defect_points == [4, 4, 4, 4]
    assert r.points == 4
    assert r.details["points_before_cap"] == 16
    assert r.details["yards_capped"] == [{"yard": 7, "points": 16, "counted": 4}]
    assert r.points_per_100yd2 == pytest.approx(4 * 3600 / (100 * 58))


def test_yard_is_that_of_the_bbox_centre_and_a_partial_last_yard_counts() -> None:
    # centres at 905 mm (yard 0) and 925 mm (yard 1): two yards, no cap between them
    a = (500.0, 900.0, 800.0, 910.0, 300.0)
    b = (500.0, 920.0, 800.0, 930.0, 300.0)
    # a bbox from yard 0 into yard 1 whose centre lies in yard 0: counted with `a`
    c = (900.0, 800.0, 1150.0, 1000.0, 250.0)
    r = grade_roll([a, b, c], 10.5 * YD, WIDTH_60IN)
    assert r.per_defect_points == [4, 4, 4]
    assert r.points == 8  # yard 0: 4 + 4 capped at 4; yard 1: 4
    assert r.details["yards_capped"] == [{"yard": 0, "points": 8, "counted": 4}]
    last = grade_roll(
        [_defect(12, 10, along=300.0), _defect(12, 10, along=400.0)], 10.5 * YD, WIDTH_60IN
    )
    assert last.points == 4 and last.yards == pytest.approx(10.5)


def test_a_defect_longer_than_a_yard_is_charged_in_every_yard_it_touches() -> None:
    # a broken end from 0.5 yd to exactly 3 yd: yards 0, 1 and 2 (3 yd is yard 3's start)
    running = (500.0, 0.5 * YD, 520.0, 3.0 * YD, 2.5 * YD)
    # 20 in long, across the boundary of yards 5 and 6: once, in its centre's yard 5
    short = (500.0, 6 * YD - 300.0, 520.0, 6 * YD + 208.0, 508.0)
    # a hole in yard 1 beside the broken end: that yard stays capped at 4
    hole = (900.0, 1.5 * YD, 910.0, 1.5 * YD + 10.0, 10.0)
    r = grade_roll([running, short, hole], 10 * YD, WIDTH_60IN)
    assert r.per_defect_points == [12, 4, 1]
    assert r.points == 4 + 4 + 4 + 4  # yards 0, 1 (4 + 1 capped), 2 and 5
    assert r.details["defects_across_yards"] == [{"defect": 0, "yards": [0, 2]}]
    assert r.details["yards_capped"] == [{"yard": 1, "points": 5, "counted": 4}]
    exactly_a_yard = (500.0, 0.5 * YD, 520.0, 1.5 * YD, YD)  # not longer than a yard: once
    assert grade_roll([exactly_a_yard], 10 * YD, WIDTH_60IN).per_defect_points == [4]


def test_defects_within_the_selvage_margin_are_ignored() -> None:
    left = (0.0, 1000.0, 25.4, 1010.0, 25.4)  # ends exactly 1 in from the left edge
    right = (WIDTH_60IN - 20.0, 2000.0, WIDTH_60IN, 2200.0, 200.0)
    straddling = (20.0, 3000.0, 30.0, 3010.0, 10.0)  # reaches past the margin: counted
    r = grade_roll([left, right, straddling], ROLL_100YD, WIDTH_60IN)
    assert r.per_defect_points == [None, None, 1]
    assert r.points == 1
    assert r.details["defects_ignored_at_selvage"] == [0, 1]
    wider = grade_roll([left], ROLL_100YD, WIDTH_60IN, GradingRules(selvage_margin_in=0.5))
    assert wider.per_defect_points == [1] and wider.width_in == pytest.approx(59.0)


def test_the_selvage_margins_lie_inside_the_measured_edges_whatever_width_is_graded() -> None:
    # the manifest says 1,600 mm; measured 100–1,660 mm (1,560: within 5 %, so the manifest's
    # width is the cuttable one) — the right selvage is at 1,660 mm, not at 100 + 1,600
    beside_the_right_edge = (1640.0, 1000.0, 1655.0, 1010.0, 15.0)  # 5–20 mm inside it
    inside = (1600.0, 2000.0, 1615.0, 2010.0, 15.0)  # 45–60 mm inside it
    r = grade_roll([beside_the_right_edge, inside], ROLL_100YD, 1600.0, None, 100.0, 1660.0)
    assert r.per_defect_points == [None, 1]
    assert r.width_in == pytest.approx(1600.0 / IN - 2)
    assert (r.details["fabric_left_mm"], r.details["fabric_right_mm"]) == (100.0, 1660.0)
    # measured wider (100–1,740 mm): a flaw 45–60 mm inside the right edge is charged
    wider = grade_roll([(1680.0, 0.0, 1695.0, 10.0, 15.0)], ROLL_100YD, 1600.0, None, 100.0, 1740.0)
    assert wider.per_defect_points == [1]
    # no measured right edge: the fabric ends at left + width, as before
    assert grade_roll(
        [beside_the_right_edge], ROLL_100YD, 1600.0, None, 60.0
    ).per_defect_points == [None]


def test_the_selvage_follows_the_fabric_where_it_wanders() -> None:
    """The left edge lies at 50 mm for the first half of a 100-yard roll and at 90 mm for the
    second (median 50 mm). A mark 2–20 mm inside the edge beside it is in the selvage wherever
    it lies; one 30–45 mm inside it is charged — measured from the edge beside it, not from
    the roll's median (which charged the first and, beside a fabric moved the other way,
    ignored real flaws)."""
    half = ROLL_100YD / 2
    along = [
        (y, y + 25.6, 50.0 if y < half else 90.0, 1574.0) for y in range(0, int(ROLL_100YD), 25)
    ]
    along = [(float(y0), min(y1, ROLL_100YD), left, right) for y0, y1, left, right in along]
    in_the_selvage = [(92.0, 0.9 * ROLL_100YD, 110.0, 0.9 * ROLL_100YD + 10, 18.0),
                      (52.0, 0.1 * ROLL_100YD, 70.0, 0.1 * ROLL_100YD + 10, 18.0)]  # fmt: skip
    inside = [(120.0, 0.8 * ROLL_100YD, 135.0, 0.8 * ROLL_100YD + 10, 15.0),
              (80.0, 0.2 * ROLL_100YD, 95.0, 0.2 * ROLL_100YD + 10, 15.0)]  # fmt: skip
    r = grade_roll(in_the_selvage + inside, ROLL_100YD, 1524.0, None, 50.0, 1574.0, along)
    assert r.per_defect_points == [None, None, 1, 1]
    # a defect across the step: in the selvage if within the margin of any edge beside it
    step = (60.0, half - 100.0, 100.0, half + 100.0, 200.0)
    assert grade_roll([step], ROLL_100YD, 1524.0, None, 50.0, 1574.0, along).per_defect_points == [
        None
    ]
    # a defect whose box ends where a block starts (its end is exclusive: its last row lies in
    # the block before) is judged by the blocks its rows lie in, not by the next one's edge
    step_y = min(b[0] for b in along if b[2] == 90.0)
    ends_at_the_step = (80.0, step_y - 24.0, 95.0, step_y, 15.0)
    starts_at_the_step = (80.0, step_y, 95.0, step_y + 24.0, 15.0)
    r = grade_roll([ends_at_the_step, starts_at_the_step], ROLL_100YD, 1524.0, None, 50.0, 1574.0,
                   along)  # fmt: skip
    assert r.per_defect_points == [1, None]
    # the roll's median alone (no edges along): the wandering half's selvage mark is charged
    assert grade_roll(in_the_selvage, ROLL_100YD, 1524.0, None, 50.0, 1574.0).per_defect_points == [
        1, None
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("length_in", "points"),
    [(0.1, 1), (3.0, 1), (3.01, 2), (6.0, 2), (6.01, 3), (9.0, 3), (9.01, 4), (40.0, 4)],
)
def test_band_boundaries_are_inclusive_on_the_upper_edge(length_in: float, points: int) -> None:
    assert grade_roll([_defect(length_in, 0)], ROLL_100YD, WIDTH_60IN).per_defect_points == [points]


def test_acceptance_limits() -> None:
    rules = GradingRules()
    assert [rules.grade_for(v) for v in (0.0, 20.0, 20.001, 40.0, 40.001)] == [
        "A", "A", "B", "B", "reject",
    ]  # fmt: skip
    # 70 yards with a 4-point defect each: 280 × 3600 / (100 × 58) = 173.79
    r = grade_roll([_defect(12, y) for y in range(70)], ROLL_100YD, WIDTH_60IN)
    assert r.points == 280 and r.points_per_100yd2 == pytest.approx(173.7931, abs=1e-4)
    assert r.grade == "reject"
    assert grade_roll([], ROLL_100YD, WIDTH_60IN).grade == "A"


def test_metric_roll_converts_exactly() -> None:
    # 91.44 m × 1524 mm is exactly 100 yd × 60 in: the numbers of the first test
    r = grade_roll([_defect(12, 30)], 91_440.0, 1_524.0)
    assert (r.yards, r.width_in) == (pytest.approx(100.0), pytest.approx(58.0))
    assert r.points_per_100yd2 == pytest.approx(4 * 3600 / 5800)
    # 100 m × 1.5 m, defects of 50, 100, 200, 250 mm = 1.97, 3.94, 7.87, 9.84 in
    defects = [
        (500.0, y, 500.0 + n, y + 5, n) for y, n in ((0, 50), (5e3, 100), (9e3, 200), (2e4, 250))
    ]
    m = grade_roll(defects, 100_000.0, 1_500.0)
    assert m.per_defect_points == [1, 2, 3, 4]
    assert m.yards == pytest.approx(109.36133, abs=1e-5)
    assert m.width_in == pytest.approx(57.05512, abs=1e-5)  # 1500 / 25.4 − 2
    assert m.points_per_100yd2 == pytest.approx(5.76958, abs=1e-5)


def test_impossible_geometry_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        grade_roll([], 0.0, WIDTH_60IN)
    with pytest.raises(ValueError, match="no cuttable width"):
        grade_roll([], ROLL_100YD, 2 * IN)
    with pytest.raises(ValueError, match="defect 2's box or length is not finite"):
        grade_roll([_defect(2, 1), (500.0, 100.0, 510.0, float("inf"), 10.0)], ROLL_100YD, 1524)


CONFIG = {
    "default": {"max_points_per_yard": 3},
    "fabric_types": {
        "denim": {"acceptance": [["first", 15], ["second", 30]], "reject_name": "third"},
        "silk": {"point_bands": [[1, 1], [2, 2], [4, 3]], "max_points_per_yard": 4},
    },
}


def test_rules_per_fabric_type_from_configuration() -> None:
    assert load_rules("denim", None) == GradingRules()
    denim = load_rules("denim", CONFIG)
    assert denim.acceptance == (("first", 15.0), ("second", 30.0))
    assert denim.reject_name == "third" and denim.max_points_per_yard == 3  # from default
    other = load_rules("twill", CONFIG)  # not configured: the config's default
    assert other.acceptance == GradingRules().acceptance and other.max_points_per_yard == 3
    silk = load_rules("silk", CONFIG)
    assert silk.points_for(1.5) == 2 and silk.points_for(4.5) == 4

    defects = [_defect(2, 0), _defect(5, 10), _defect(8, 20), _defect(12, 30)]
    assert grade_roll(defects, ROLL_100YD, WIDTH_60IN, denim).grade == "first"  # 6.2
    heavy = [_defect(12, y) for y in range(20)]  # 20 × 3 (capped) = 60 → 37.24 per 100 yd²
    r = grade_roll(heavy, ROLL_100YD, WIDTH_60IN, denim)
    assert (r.points, r.grade) == (60, "third")
    assert grade_roll(heavy, ROLL_100YD, WIDTH_60IN, load_rules("x", None)).grade == "reject"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"defaults": {}}, r"unknown key\(s\) \['defaults'\]"),
        (
            {"fabric_types": {"denim": {"acceptence": []}}},
            r"fabric_types\.denim: acceptence: unknown key",
        ),
        ({"default": {"acceptance": [["A", 40], ["B", 20]]}}, "ascending"),
        ({"default": {"acceptance": [["A", 20]], "reject_name": "A"}}, "distinct"),
        ({"default": {"points_above": 5}}, "1..4"),
        ({"default": {"point_bands": [[6, 1], [3, 2]]}}, "ascending"),
        ({"default": {"selvage_margin_in": -1}}, r"0\.\.12 in, got -1"),
        # every roll failed to grade with an infinite margin
        ({"default": {"selvage_margin_in": float("inf")}}, r"0\.\.12 in, got inf"),
        # strict types: JSON's true was the number 1, "4" the number 4
        ({"default": {"max_points_per_yard": True}}, "max_points_per_yard: Input should be"),
        ({"default": {"points_above": True}}, "points_above: Input should be"),
        ({"default": {"selvage_margin_in": "1"}}, "selvage_margin_in: Input should be"),
        ({"default": {"acceptance": [["A", "20"]]}}, r"acceptance\.0\.1: Input should be"),
        # points that fall as defects grow longer: a 1-in slub 4 points, a 20-in tear 1
        ({"default": {"point_bands": [[3, 4], [6, 3], [9, 2]], "points_above": 1}}, "not fall"),
        ({"default": {"points_above": 1}}, "points_above .* less than the longest band"),
        ({"default": {"point_bands": []}}, "at least one"),
        # NaN compares false with everything: a grade, or a band, that is never given
        ({"default": {"acceptance": [["A", 20], ["B", float("nan")]]}}, "ascending"),
        ({"default": {"acceptance": [["A", float("inf")]]}}, "ascending"),
        ({"default": {"point_bands": [[3, 1], [float("nan"), 2]]}}, "ascending"),
        ({"default": {"max_points_per_yard": "many"}}, "max_points_per_yard"),
        ({"fabric_types": ["denim"]}, "fabric_types: expected a table"),
        ({"fabric_types": {"denim": 3}}, r"fabric_types\.denim: expected a table"),
    ],
)
def test_bad_configuration_is_a_clear_value_error(config: dict, message: str) -> None:
    # another fabric type's mistake is found too, not only the asked one's
    with pytest.raises(ValueError, match=message):
        load_rules("twill", config)


def test_rules_files_json_and_toml(tmp_path) -> None:
    from results.grading_rules import read_rules_file

    (tmp_path / "r.json").write_text(json.dumps(CONFIG))
    (tmp_path / "r.toml").write_text(
        "[default]\nmax_points_per_yard = 3\n\n[fabric_types.denim]\n"
        'acceptance = [["first", 15], ["second", 30]]\nreject_name = "third"\n'
    )
    for name in ("r.json", "r.toml"):
        assert load_rules("denim", read_rules_file(tmp_path / name)) == load_rules("denim", CONFIG)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        read_rules_file(tmp_path / "bad.json")
    # json.loads kept the last of two equal keys: the first section of a fabric written twice
    # was lost without a word (TOML refuses it itself)
    (tmp_path / "twice.json").write_text(
        '{"fabric_types": {"denim": {"acceptance": [["first", 5]]}, "denim": {"reject_name": "x"}}}'
    )
    with pytest.raises(ValueError, match=r"twice\.json: key 'denim' appears twice"):
        read_rules_file(tmp_path / "twice.json")
    # a file truncated by a deploy meant the built-in rules
    for name, text in (("empty.toml", ""), ("empty.json", "{}")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: empty; expected 'default'"):
            read_rules_file(tmp_path / name)


def test_numbers_written_as_decimals_are_the_numbers_they_say(tmp_path) -> None:
    """4.0 where the rules want a whole number was read as 4 before types became strict, and
    a site's file that said so must not stop its nightly grading after an upgrade."""
    from results.grading_rules import read_rules_file

    (tmp_path / "r.toml").write_text(
        "[default]\nmax_points_per_yard = 4.0\npoints_above = 4.0\n"
        'point_bands = [[3, 1.0], [6, 2.0], [9.0, 3]]\nacceptance = [["A", 20], ["B", 40]]\n'
    )
    assert load_rules("x", read_rules_file(tmp_path / "r.toml")) == GradingRules()
    with pytest.raises(ValueError, match="max_points_per_yard"):
        load_rules("x", {"default": {"max_points_per_yard": 4.5}})


def test_the_section_that_grades_a_fabric_and_one_that_looks_meant_for_it() -> None:
    book = RuleBook(CONFIG)
    assert book.section("denim") == "fabric_types.denim" and book("denim") == load_rules(
        "denim", CONFIG
    )
    assert book.section("twill") == "default" and book("twill") == book.default
    assert book.near_miss("Denim") == "denim" and book.near_miss(" de-nim ") == "denim"
    assert book.near_miss("denim") is None and book.near_miss("twill") is None


def test_points_per_100yd2_never_read_as_the_limit_they_exceed() -> None:
    """40.0022 is graded above "B ≤ 40": shown as 40.00 beside the limit it looked accepted."""
    limits = GradingRules().acceptance
    assert GradingRules().grade_for(40.0022) == "reject"
    assert decisive_text(40.0022, [x for _, x in limits]) == "40.002"
    assert decisive_text(39.9999, [20.0, 40.0]) == "39.9999"
    assert decisive_text(40.0, [20.0, 40.0]) == "40.00"  # on the limit: accepted, and shown so
    assert decisive_text(12.3456, [20.0, 40.0]) == "12.35"


def _found(q_rows: int, rows: slice, col: int, px_mm_x: float, px_mm_y: float) -> tuple:
    """The one defect `DefectFinder` finds in a column of ¼-res rows, as `grade_roll` takes it."""
    q = np.zeros((q_rows, 200), np.float32)
    q[rows, col] = 1.0
    finder = DefectFinder(0.5, px_mm_x, px_mm_y)
    finder.add_band(q, 0)
    d = finder.finish()[0]
    return (d.x0_mm, d.y0_mm, d.x1_mm, d.y1_mm, d.length_mm)


def test_positions_on_a_first_row_keep_their_block_and_yard_and_no_yard_lies_past_the_end() -> None:
    """Where the finder's row × mm and a stored row ÷ px/mm mean the same row, they may differ
    by a rounding step: a defect starting on a block's or a yard's first row belongs to it."""
    # 3 px/mm: block 5 starts at row 1280; block 4's left edge is 5 mm in, block 5's at 0
    edges = [(k * 256 / 3.0, (k + 1) * 256 / 3.0, 5.0 if k == 4 else 0.0, 1500.0)
             for k in range(8)]  # fmt: skip
    defect = _found(512, slice(320, 325), 20, 3.0, 3.0)  # rows 1280–1299, x 26.7–28 mm
    assert defect[1] != edges[5][0]  # the two products do differ here
    assert grade_roll([defect], 2048 / 3.0, 1500.0, edges_along=edges).per_defect_points == [1]
    # 2.6 px/mm along: row 59436 is yard 25's first; a running defect from there to 26.5 yd
    rows = round(27 * YD * 2.6)
    first, stop = round(25 * YD * 2.6) // 4, round(26.5 * YD * 2.6) // 4
    running = grade_roll([_found(-(-rows // 4), slice(first, stop), 100, 0.5, 2.6)],
                         rows / 2.6, WIDTH_60IN)  # fmt: skip
    assert running.details["defects_across_yards"] == [{"defect": 0, "yards": [25, 26]}]
    assert running.points == 8
    # at 7.87401575 px/mm (200 dpi to 8 decimals) ¼-res row 1800 starts 0.23 µm before yard 1:
    # in yard 0 it stays (a tolerance wider than rounding moved it, 4 points less)
    early = 1800 * 4 / 7.87401575
    charged = grade_roll([(100.0, early, 110.0, early + 1000.0, 1000.0)], 5000.0, WIDTH_60IN)
    assert charged.details["defects_across_yards"] == [{"defect": 0, "yards": [0, 2]}]
    # one yard of roll, a running defect whose last ¼-res row reaches 0.8 mm past its end
    whole = grade_roll([(100.0, 0.0, 110.0, YD + 0.8, YD + 0.8)], YD, WIDTH_60IN)
    assert (whole.points, whole.per_defect_yards) == (4, [1])


def test_a_stretch_without_fabric_leaves_the_yards_seen_and_the_defects_where_they_are():
    """A 10.24 m roll whose first 4.096 m were dark: the points are spread over the 6.144 m seen,
    and a defect 7.0–9.5 m along is charged in the 4 yards it touches there (the roll had been
    cut short at the length seen: one yard, and its selvage read off the roll's median edges)."""
    defects = [(300.0, 7000.0, 330.0, 9500.0, 2500.0)]
    result = grade_roll(defects, 10240.0, 1000.0, unseen_mm=4096.0)
    assert result.yards == pytest.approx(6144.0 / 914.4)
    assert (result.per_defect_points, result.per_defect_yards) == ([16], [4])
    with pytest.raises(ValueError, match=r"no fabric seen over 10240\.0 mm"):
        grade_roll(defects, 10240.0, 1000.0, unseen_mm=10240.0)
