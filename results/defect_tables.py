"""Rolls and defects as plain rows for people: `rollscan rolls`, `rollscan defects`.

Reads go through the SQL views (`current_defects`, `roll_grades`), so these tables always
show each roll's *current* run, exactly as a quality engineer's own SQL would.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from datetime import datetime, tzinfo
from typing import Any, TextIO

from sqlalchemy import Select, case, column, func, or_, select, table
from sqlalchemy.orm import Session

from results.grade_store import SYSTEM
from storage.schema import Frame, Roll, Run, current_run

# the views are not ORM models: lightweight table clauses with the columns used here
DEFECT_COLUMNS = (
    "defect_no",
    "x_mm",
    "y_mm",
    "x0_mm",
    "y0_mm",
    "x1_mm",
    "y1_mm",
    "length_mm",
    "width_mm",
    "area_mm2",
    "max_score",
    "mean_score",
    "points",
    "model_version",
    "run_id",
    "yards_charged",
    "graded",
)
current_defects = table("current_defects", column("roll_id"), *map(column, DEFECT_COLUMNS))
roll_grades = table("roll_grades", column("roll_id"), column("system"), column("grade"))

# (key, header, format spec) — the spec applies to numbers; None shows as "-"
Column = tuple[str, str] | tuple[str, str, str]

ROLL_COLUMNS: list[Column] = [
    ("id", "roll"),
    ("fabric", "fabric"),
    ("status", "status"),
    ("length_m", "length m", ".1f"),
    ("frames", "frames"),
    ("defects", "defects"),
    ("grade", "grade"),
    ("completed_at", "completed"),
    ("failure_reason", "failure"),
]
DEFECT_TABLE_COLUMNS: list[Column] = [
    ("defect_no", "no"),
    ("x_mm", "x mm", ".1f"),
    ("y_mm", "y mm", ".1f"),
    ("length_mm", "length mm", ".1f"),
    ("width_mm", "width mm", ".1f"),
    ("area_mm2", "area mm²", ".1f"),
    ("max_score", "max score", ".3f"),
    ("mean_score", "mean score", ".3f"),
    ("charge", "points"),
]


def _aware(since: datetime) -> datetime:
    return since if since.tzinfo else since.astimezone()  # a naive datetime is local time


def list_rolls(
    session: Session,
    since: datetime | None = None,
    status: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rolls registered or completed at or after `since` (naive: local time) with `status`,
    oldest registered first;
    with `limit`, the `limit` most recent of them.

    `frames` counts the frames ingested; `defects` and `grade` are those of the current run
    (`defects` None while there is none or it failed, `grade` None until it is graded). Each
    count is a subquery of the rolls listed, so the time grows with them, not with the archive."""
    frames = select(func.count()).where(Frame.roll_id == Roll.id).scalar_subquery()
    defects = (
        select(func.count())
        .select_from(current_defects)
        .where(current_defects.c.roll_id == Roll.id)
        .scalar_subquery()
    )
    scored = (
        select(Run.id)
        .where(Run.roll_id == Roll.id, Run.is_current, Run.status != "failed")
        .exists()
    )
    grade = (
        select(roll_grades.c.grade)
        .where(roll_grades.c.roll_id == Roll.id, roll_grades.c.system == SYSTEM)
        .scalar_subquery()
    )
    query = select(
        Roll.id,
        Roll.fabric_type,
        Roll.status,
        Roll.length_m,
        Roll.completed_at,
        Roll.failure_reason,
        frames,
        case((scored, defects)),
        grade,
    ).order_by(Roll.created_at, Roll.id)
    query = _registered(query, since, status)
    keys = (
        "id",
        "fabric",
        "status",
        "length_m",
        "completed_at",
        "failure_reason",
        "frames",
        "defects",
        "grade",
    )
    if limit is not None:  # the most recent, still listed oldest first
        newest = query.order_by(None).order_by(Roll.created_at.desc(), Roll.id.desc()).limit(limit)
        rows = session.execute(newest).all()[::-1]
    else:
        rows = session.execute(query).all()
    return [dict(zip(keys, row, strict=True)) for row in rows]


def count_rolls(session: Session, since: datetime | None = None, status: str | None = None) -> int:
    """How many rolls `list_rolls` would list without a limit."""
    return int(session.scalar(_registered(select(func.count()).select_from(Roll), since, status)))


def _registered(query: Select, since: datetime | None, status: str | None) -> Select:
    """`query` over the rolls registered or completed at or after `since` with `status` (None:
    any). Completed too: the table shows when a roll was completed, not when it was registered,
    and a roll scanned across midnight was missing from its own day's list (which `grade
    --since` and `reprocess --since` took it into)."""
    if since is not None:
        since = _aware(since)
        query = query.where(or_(Roll.created_at >= since, Roll.completed_at >= since))
    if status is not None:
        query = query.where(Roll.status == status)
    return query


def roll_defects(session: Session, roll_id: str) -> list[dict[str, Any]]:
    """The current run's defects of a roll, by defect number; ValueError for an unknown roll.

    Each row also has `charge`, for people: its points, "selvage" where the grading ignored it,
    None before its run is graded (NULL points mean either in SQL; `graded` tells them apart)."""
    if session.get(Roll, roll_id) is None:
        raise ValueError(f"unknown roll {roll_id!r}")
    query = (
        select(*(current_defects.c[name] for name in DEFECT_COLUMNS))
        .where(current_defects.c.roll_id == roll_id)
        .order_by(current_defects.c.defect_no)
    )
    rows = [dict(row._mapping) for row in session.execute(query).all()]
    for row in rows:
        row["charge"] = (
            row["points"] if row["points"] is not None or not row["graded"] else "selvage"
        )
    return rows


def unscored_reason(session: Session, roll_id: str) -> str | None:
    """Why a roll has no defects to show — it failed, or no run of it has finished, or its
    current run failed (its defects may read pixels since replaced) — or None when a finished
    run is current, or one being scored again (its defects, none included, are the answer)."""
    roll = session.get(Roll, roll_id)
    if roll is None:
        raise ValueError(f"unknown roll {roll_id!r}")
    return why_unscored(roll, current_run(session, roll_id))


def why_unscored(roll: Roll, current: Run | None) -> str | None:
    """`unscored_reason` for a roll and its current run already read."""
    if current is not None and current.status != "failed":
        return None
    if current is not None:
        return f"roll {roll.id}: its current run failed: {roll.failure_reason or current.error}"
    if roll.status == "failed":
        return f"roll {roll.id} failed, before any run finished: {roll.failure_reason}"
    return f"roll {roll.id} is not scored yet (status {roll.status})"


def format_value(value: Any, spec: str = "", zone: tzinfo | None = None) -> str:
    """A cell as text: None → "-", datetimes in `zone` (None: the process's) to the minute with
    the zone's name, numbers by `spec`."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
    if spec and isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return " ".join(str(value).split())  # one line per row, whatever the text holds


def format_table(
    rows: Iterable[dict[str, Any]], columns: Sequence[Column], zone: tzinfo | None = None
) -> str:
    """A plain-text table: a header line, then one line per row; numbers right-aligned, dates
    in `zone` (the site's, ROLLSCAN_TIMEZONE, from the CLI)."""
    rows = list(rows)
    cells = [
        [format_value(row.get(c[0]), c[2] if len(c) > 2 else "", zone) for c in columns]
        for row in rows
    ]
    headers = [c[1] for c in columns]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows)
        and all(isinstance(r.get(c[0]), int | float | type(None)) for r in rows)
        and any(r.get(c[0]) is not None for r in rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(c) for c in cells)])


def write_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str], out: TextIO) -> None:
    """Rows as CSV with a header; full precision, None as an empty cell, datetimes in ISO."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(
            [
                ""
                if (v := row.get(name)) is None
                else v.isoformat()
                if isinstance(v, datetime)
                else v
                for name in columns
            ]
        )
