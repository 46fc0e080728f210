"""SQL views for people who query defects in SQL, shared by the migrations and the tests.

These strings are part of revision 0001: once released, do not edit them in place.
A changed view is a new constant (``CURRENT_DEFECTS_V2``…) created by a new revision,
whose downgrade re-creates the old one; otherwise an old database upgraded today and a
new database created today would hold different views under the same revision.

Each roll's current run is the one with ``runs.is_current`` (at most one per roll, by a
partial unique index). A reprocess run becomes current only when it has finished, so the
views never show a half-scored roll next to a finished one.
"""

from __future__ import annotations

CURRENT_RUNS = """
CREATE VIEW current_runs AS
SELECT r.roll_id,
       r.id AS run_id,
       r.model_version,
       r.status,
       r.bands_done,
       r.bands_total,
       r.finished_at
FROM runs r
WHERE r.is_current
"""

CURRENT_DEFECTS = """
CREATE VIEW current_defects AS
SELECT d.roll_id,
       ro.fabric_type,
       d.defect_no,
       d.x_mm, d.y_mm,
       d.x0_mm, d.y0_mm, d.x1_mm, d.y1_mm,
       d.length_mm, d.width_mm, d.area_mm2,
       d.max_score, d.mean_score,
       d.points,
       r.model_version,
       d.run_id
FROM defects d
JOIN runs r ON r.id = d.run_id AND r.is_current
JOIN rolls ro ON ro.id = d.roll_id
"""

# Revision 0002: a defect longer than a yard is charged in every yard it touches, so a
# defect's `points` are its charge in all and `yards_charged` says over how many yards: the
# view of revision 0001 with that column added last.
CURRENT_DEFECTS_V2 = CURRENT_DEFECTS.replace(
    "d.run_id\nFROM", "d.run_id,\n       d.yards_charged\nFROM"
)

# Every roll appears (grade NULL until graded, or without a current run), once per
# grading system; `system` is there so that a second system does not look like a
# duplicate row.
ROLL_GRADES = """
CREATE VIEW roll_grades AS
SELECT ro.id AS roll_id,
       ro.fabric_type,
       ro.length_m,
       ro.status,
       g.system,
       g.grade,
       g.points,
       g.points_per_100yd2,
       g.graded_at,
       r.model_version
FROM rolls ro
LEFT JOIN runs r ON r.roll_id = ro.id AND r.is_current
LEFT JOIN grades g ON g.run_id = r.id AND g.roll_id = ro.id
"""

# the views of revision 0001, in creation order; drop in reverse
VIEWS: dict[str, str] = {
    "current_runs": CURRENT_RUNS,
    "current_defects": CURRENT_DEFECTS,
    "roll_grades": ROLL_GRADES,
}


def drop_view_sql(name: str) -> str:
    if name not in VIEWS:
        raise ValueError(f"unknown view {name!r}")
    return f"DROP VIEW IF EXISTS {name}"


# Revision 0004: the fabric's measured width along each roll (a mill wants to know when its
# fabric narrows), beside the manifest's width.
_WIDTH_AGGREGATES = """count(e.row_start) AS blocks_measured,
       min(e.width_mm) AS min_width_mm,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY e.width_mm) AS median_width_mm,
       max(e.width_mm) AS max_width_mm,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY e.left_mm) AS median_left_mm,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY e.right_mm) AS median_right_mm"""
ROLL_WIDTHS = f"""
CREATE VIEW roll_widths AS
SELECT ro.id AS roll_id,
       ro.fabric_type,
       ro.width_mm AS manifest_width_mm,
       {_WIDTH_AGGREGATES}
FROM rolls ro
JOIN fabric_extents e ON e.roll_id = ro.id
GROUP BY ro.id, ro.fabric_type, ro.width_mm
"""


# Revision 0005: current_runs also shows the threshold each run applied and the roll's own
# estimate (worker/roll_threshold.py); new columns come last, as CREATE OR REPLACE requires.
CURRENT_RUNS_V2 = CURRENT_RUNS.replace("CREATE VIEW", "CREATE OR REPLACE VIEW").replace(
    "       r.finished_at\n",
    "       r.finished_at,\n       r.threshold,\n       r.roll_threshold\n",
)


# Revision 0007: whether the defect's run has been graded. Finalize stores defects with NULL
# points, which the grading (nightly, or `rollscan grade`) fills in; NULL points on a graded run
# mean "ignored at the selvage", on an ungraded one "not graded yet" — `graded` tells them apart.
CURRENT_DEFECTS_V3 = CURRENT_DEFECTS_V2.replace("CREATE VIEW", "CREATE OR REPLACE VIEW").replace(
    "d.yards_charged\nFROM",
    "d.yards_charged,\n"
    "       EXISTS (SELECT 1 FROM grades g WHERE g.run_id = d.run_id) AS graded\nFROM",
)


# Revision 0009: a current run that failed (a changed frame reopened it and a band was given up,
# with no finished run to take its place) shows no defects and no grade: they may read pixels
# replaced since, and `rollscan defects` and the report refuse them too.
CURRENT_DEFECTS_V4 = CURRENT_DEFECTS_V3.replace(
    "JOIN runs r ON r.id = d.run_id AND r.is_current\n",
    "JOIN runs r ON r.id = d.run_id AND r.is_current AND r.status <> 'failed'\n",
)
ROLL_GRADES_V2 = ROLL_GRADES.replace("CREATE VIEW", "CREATE OR REPLACE VIEW").replace(
    "LEFT JOIN grades g ON g.run_id = r.id AND g.roll_id = ro.id\n",
    "LEFT JOIN grades g ON g.run_id = r.id AND g.roll_id = ro.id AND r.status <> 'failed'\n",
)


# Revision 0011: `roll_widths` aggregates each roll's blocks in a lateral subquery: the grouped
# view was computed over the whole of `fabric_extents` whenever a query filtered it through a
# join ("the widths of last week's rolls": 6.7 s at 5 M blocks, a mill's archive holds tens of
# millions), where only a literal roll_id reached inside; the same rows and columns.
# `roll_grades` also shows the roll's completion date, last: `graded_at` moves with each
# grading (a reprocessed roll is graded again), so "this month's rolls" by it took in old ones.
ROLL_WIDTHS_V2 = f"""
CREATE OR REPLACE VIEW roll_widths AS
SELECT ro.id AS roll_id,
       ro.fabric_type,
       ro.width_mm AS manifest_width_mm,
       w.blocks_measured,
       w.min_width_mm,
       w.median_width_mm,
       w.max_width_mm,
       w.median_left_mm,
       w.median_right_mm
FROM rolls ro
CROSS JOIN LATERAL (
    SELECT {_WIDTH_AGGREGATES}
    FROM fabric_extents e
    WHERE e.roll_id = ro.id
) w
WHERE w.blocks_measured > 0
"""
ROLL_GRADES_V3 = ROLL_GRADES_V2.replace(
    "       r.model_version\n", "       r.model_version,\n       ro.completed_at\n"
)


# Revision 0013: rows where the camera saw no fabric (a dark or saturated frame: the lights off,
# the line running before the fabric's start or past its end) are stored with an empty extent
# (`distill.fabric_region.blank_runs`). The widths and edges are the fabric's, over the extents
# that hold it; `unseen_mm`, added last, is the length along the roll not inspected: those rows,
# and the 64 rows of fabric beside each run of them that finalize masks too
# (`worker.fabric_mask.UNSEEN_REACH`), within the roll.
_FABRIC = "FILTER (WHERE e.width_mm > 0)"
_FABRIC_AGGREGATES = "\n".join(
    line if line.startswith("count(") else line.replace(" AS ", f" {_FABRIC} AS ")
    for line in _WIDTH_AGGREGATES.splitlines()
)
ROLL_WIDTHS_V3 = ROLL_WIDTHS_V2.replace(
    "w.median_right_mm\nFROM", "w.median_right_mm,\n       w.unseen_mm\nFROM"
).replace(
    f"SELECT {_WIDTH_AGGREGATES}",
    f"SELECT {_FABRIC_AGGREGATES},\n       coalesce((SELECT sum(upper(r) - lower(r)) FROM "
    "unnest(range_agg(int8range(greatest(e.row_start - 64, 0), least(e.row_stop + 64, "
    "ro.rows_ingested))) FILTER (WHERE e.width_mm = 0)) AS r), 0) / ro.px_per_mm_y AS unseen_mm",
)
