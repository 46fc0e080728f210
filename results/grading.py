"""The four-point system (ASTM D5430) for grading a roll from its defects: pure logic, no I/O.

A defect's points come from its length (longest extent) in inches; points are summed per
linear yard of the roll and each yard's sum is capped; the total is normalised to points
per 100 square yards of *cuttable* fabric and compared with the acceptance limits of the
roll's fabric type.

Decisions where the standard leaves room (each one is recorded in `GradeResult.details`):

- Cuttable width = roll width − 2 × `selvage_margin_in`: the strips along the selvages in
  which defects are ignored are not inspected fabric either, so they do not count as area.
- A defect belongs to the yard of the centre of its bounding box along the roll
  (``floor(((y0 + y1) / 2) / 914.4 mm)``, y from the roll start). A last, partial yard is a
  yard of its own for the cap; the yards inspected in the formula are fractional
  (roll length / 914.4 mm).
- A continuous defect longer along the roll than a yard (a broken end, a running stain) is
  charged its points in every yard its bbox touches, as the standard charges continuous
  defects per yard; a short defect across a yard boundary counts once, in its centre's yard.
  Its `per_defect_points` are the points charged in all, before the per-yard cap, over
  `per_defect_yards` yards (stored as `defects.points` and `defects.yards_charged`).
- A defect is ignored at the selvage when its whole bbox lies within the margin of one
  edge: ``x1 ≤ left + margin`` or ``x0 ≥ left + width − margin`` (boundaries inclusive),
  where `left` is the fabric's left edge in the image (0 unless measured) and `width` the
  width graded: the manifest's, or the measured one where they disagree beyond
  `width_tolerance` (the caller decides, see `choose_width`).
- Point bands are inclusive on their upper edge (exactly 3 in is 1 point), and a roll is
  in the first grade whose limit its points per 100 yd² do not exceed (limits inclusive).
- Conversions are exact: 1 in = 25.4 mm, 1 yd = 914.4 mm = 36 in.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from results.grading_rules import FLOAT_NOISE, GradingRules

MM_PER_INCH = 25.4
MM_PER_YARD = 914.4
SQ_IN_PER_100_SQ_YD = 3600.0  # 100 yd² = 100 × 36 in × 36 in = 129 600 in²; ÷ 36 in per yd
_EPS = FLOAT_NOISE


def _rounding(y_mm: float) -> float:
    """A few rounding steps at `y_mm`: positions along the roll come from two products (a
    defect's row × mm per ¼-res row, a block's row ÷ px per mm) that may disagree by that much
    where they mean the same row — a defect starting on a block's or a yard's first row stays
    in it, and one a fraction of a micrometre before stays before."""
    return 1e-12 * max(1.0, abs(y_mm))


Defect = tuple[float, float, float, float, float]  # x0_mm, y0_mm, x1_mm, y1_mm, length_mm


def decisive_text(points_per_100yd2: float, limits: Sequence[float], decimals: int = 2) -> str:
    """Points per 100 yd² as text with enough decimals that a value just over (or under) a grade
    limit never reads as the limit itself: 40.0022 against "B ≤ 40" is "40.002", not "40.00"."""
    value = float(points_per_100yd2)
    close = [float(x) for x in limits if abs(value - float(x)) > _EPS]
    while decimals < 9 and any(f"{value:.{decimals}f}" == f"{x:.{decimals}f}" for x in close):
        decimals += 1
    return f"{value:.{decimals}f}"


@dataclass(frozen=True)
class GradeResult:
    """A roll's grade with everything needed to check it: points, points per 100 yd², yards and
    width inspected, each defect's points and yards, and the decisions taken (`details`)."""

    points: int
    points_per_100yd2: float
    grade: str
    yards: float  # inspected, fractional
    width_in: float  # cuttable width
    per_defect_points: list[int | None]  # None: ignored at the selvage
    per_defect_yards: list[int | None]  # yards each defect is charged in; None at the selvage
    details: dict[str, Any] = field(default_factory=dict)  # JSON-ready explanation


def grade_roll(
    defects: Sequence[Defect],
    roll_length_mm: float,
    roll_width_mm: float,
    rules: GradingRules | None = None,
    fabric_left_mm: float = 0.0,
    fabric_right_mm: float | None = None,
    edges_along: Sequence[tuple[float, float, float, float]] = (),
    unseen_mm: float = 0.0,
) -> GradeResult:
    """Grade one roll; `defects` are (x0_mm, y0_mm, x1_mm, y1_mm, length_mm), x across from
    the image's left edge, y along from the roll start; the fabric spans
    [fabric_left_mm, fabric_right_mm] across (by default fabric_left_mm + roll_width_mm).

    `roll_width_mm` gives the cuttable width the points are spread over; the selvage margins
    lie inside the fabric's edges, which a measured extent places even where the manifest's
    width is kept (`choose_width`). `edges_along`, the measured edges block by block —
    (y0_mm, y1_mm, left_mm, right_mm) in order along the roll — places each defect's margins
    by the edges beside it, so a fabric that wanders keeps its selvage where it is.
    `unseen_mm`: the length along the roll where no fabric was seen; the yards inspected, the
    points' denominator, are the rest (defects keep their places along the whole roll)."""
    rules = rules if rules is not None else GradingRules()
    # inf passes `> 0` and would grade every roll "A" (or overflow): refuse it here
    if not (math.isfinite(roll_length_mm) and math.isfinite(roll_width_mm)):
        raise ValueError(
            f"roll length and width must be finite, got {roll_length_mm} × {roll_width_mm} mm"
        )
    if not roll_length_mm > 0 or not roll_width_mm > 0:
        raise ValueError(
            f"roll length and width must be positive, got {roll_length_mm} × {roll_width_mm} mm"
        )
    margin_mm = rules.selvage_margin_in * MM_PER_INCH
    width_in = roll_width_mm / MM_PER_INCH - 2 * rules.selvage_margin_in
    if width_in <= 0:
        raise ValueError(
            f"roll width {roll_width_mm} mm leaves no cuttable width inside two selvage "
            f"margins of {rules.selvage_margin_in} in"
        )
    if not (math.isfinite(unseen_mm) and 0 <= unseen_mm < roll_length_mm):
        raise ValueError(
            f"no fabric seen over {unseen_mm} mm of a {roll_length_mm} mm roll: nothing to grade"
        )
    yards = (roll_length_mm - unseen_mm) / MM_PER_YARD
    if fabric_right_mm is None:
        fabric_right_mm = fabric_left_mm + roll_width_mm

    per_defect: list[int | None] = []
    per_defect_yards: list[int | None] = []
    ignored: list[int] = []
    per_yard: dict[int, int] = {}
    across: list[dict[str, Any]] = []
    starts = [e[0] for e in edges_along]
    for i, (x0, y0, x1, y1, length_mm) in enumerate(defects):
        if not all(map(math.isfinite, (x0, y0, x1, y1, length_mm))):
            raise ValueError(f"defect {i + 1}'s box or length is not finite")
        # a box in the roll's last ¼-res row may reach a few pixels past its end: no yard there
        y1 = min(y1, roll_length_mm)
        left, right = _edges_beside(edges_along, starts, y0, y1) or (
            fabric_left_mm,
            fabric_right_mm,
        )
        if x1 <= left + margin_mm + _EPS or x0 >= right - margin_mm - _EPS:
            per_defect.append(None)
            per_defect_yards.append(None)
            ignored.append(i)
            continue
        pts = rules.points_for(length_mm / MM_PER_INCH)
        if y1 - y0 > MM_PER_YARD + _EPS:  # continuous: every yard it touches
            touched = range(max(0, math.floor((y0 + _rounding(y0)) / MM_PER_YARD)),
                            max(0, math.ceil(y1 / MM_PER_YARD - _EPS)))  # fmt: skip
            across.append({"defect": i, "yards": [touched.start, touched.stop - 1]})
        else:
            touched = range(m := max(0, math.floor((y0 + y1) / 2 / MM_PER_YARD)), m + 1)
        per_defect.append(pts * len(touched))
        per_defect_yards.append(len(touched))
        for yard in touched:
            per_yard[yard] = per_yard.get(yard, 0) + pts

    capped = {
        yard: raw for yard, raw in sorted(per_yard.items()) if raw > rules.max_points_per_yard
    }
    points = sum(min(raw, rules.max_points_per_yard) for raw in per_yard.values())
    per_100 = points * SQ_IN_PER_100_SQ_YD / (yards * width_in)
    grade = rules.grade_for(per_100)
    details = {
        "formula": "points × 3600 / (yards × cuttable width in)",
        "yards": yards,
        "roll_width_in": roll_width_mm / MM_PER_INCH,
        "cuttable_width_in": width_in,
        "fabric_left_mm": fabric_left_mm,
        "fabric_right_mm": fabric_right_mm,
        "selvage_margin_in": rules.selvage_margin_in,
        "defects": len(defects),
        "defects_ignored_at_selvage": ignored,
        "defects_across_yards": across,
        "points_before_cap": sum(per_yard.values()),
        "max_points_per_yard": rules.max_points_per_yard,
        "yards_capped": [
            {"yard": yard, "points": raw, "counted": rules.max_points_per_yard}
            for yard, raw in capped.items()
        ],
        "point_bands_in": [list(band) for band in rules.point_bands],
        "points_above": rules.points_above,
        "acceptance": [list(a) for a in rules.acceptance],
        "reject_name": rules.reject_name,
    }
    return GradeResult(
        points, per_100, grade, yards, width_in, per_defect, per_defect_yards, details
    )


def choose_width(
    manifest_mm: float, measured: tuple[float, float, float] | None, tolerance: float
) -> tuple[float, float, float, str]:
    """(width_mm, fabric_left_mm, fabric_right_mm, source) to grade with: the cuttable width is
    the manifest's unless the measured width differs from it by more than `tolerance` of it,
    then the measured one; the selvages are the measured edges either way (a width within
    tolerance may still be 5 % off, three selvage margins on a wide roll). `measured`: the
    median left and right edges and the median width, mm. Unmeasured: the manifest's width,
    from 0."""
    if measured is None:
        return manifest_mm, 0.0, manifest_mm, "manifest"
    left, right, width = measured
    # a width exactly `tolerance` off stays the manifest's ("more than"), whatever the rounding
    if abs(width - manifest_mm) > tolerance * manifest_mm + _rounding(manifest_mm):
        return width, left, right, "measured"
    return manifest_mm, left, right, "manifest"


def _edges_beside(
    edges_along: Sequence[tuple[float, float, float, float]],
    starts: list[float],
    y0: float,
    y1: float,
) -> tuple[float, float] | None:
    """The fabric's edges beside rows [y0, y1) mm: the innermost of the blocks they overlap (a
    defect within the margin of any of them lies in the selvage), None where none was measured.
    `y1` is exclusive (a defect's box ends after its last row), so a block starting there holds
    none of its rows."""
    y0, y1 = y0 + _rounding(y0), y1 - _rounding(y1)
    first = max(0, bisect.bisect_right(starts, y0) - 1)
    beside = [
        e for e in edges_along[first : bisect.bisect_left(starts, y1)] if e[1] > y0 or e[0] >= y0
    ]
    if not beside:
        return None
    return max(e[2] for e in beside), min(e[3] for e in beside)
