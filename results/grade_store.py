"""Grade runs in PostgreSQL: read a run's defects and roll, write points and the grade.

Idempotent: the per-defect points are overwritten, and the grade is an upsert on the
grades key (roll_id, run_id, system), so grading a run again replaces its grade row
instead of adding one (a nightly job that overlaps a manual regrade is harmless).

The run's row is read ``FOR SHARE``: a re-finalize of the same run (which rewrites its
defects under ``FOR UPDATE``) waits until this transaction ends, so the points written
always belong to the defects that were graded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, func, or_, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from results.grading import choose_width, grade_roll
from results.grading_rules import GradingRules, RuleBook
from storage.database import is_transient_db_error
from storage.fabric_extents import edges_along_mm, measured_fabric_mm, unseen_mm
from storage.schema import Defect, Grade, Roll, Run

log = logging.getLogger(__name__)

SYSTEM = "astm_d5430"
_SET_POINTS = text(
    "UPDATE defects AS d SET points = u.points, yards_charged = u.yards "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:points AS smallint[]), CAST(:yards AS smallint[])) "
    "AS u(id, points, yards) WHERE d.id = u.id"
)
# whether a run has its grade: a clause of queries over `Run`
RUN_GRADED = exists().where(Grade.run_id == Run.id, Grade.system == SYSTEM)


@dataclass(frozen=True)
class GradeRow:
    """What was written to `grades` for one run, plus what a report needs beside it."""

    roll_id: str
    run_id: int
    fabric_type: str
    length_m: float
    points: int
    points_per_100yd2: float
    grade: str
    defects: int
    ignored: int  # at the selvage
    unseen_m: float = 0.0  # of the roll's length, where no fabric was seen (not graded)


def grade_run(
    session: Session, run_id: int, rules: GradingRules | None = None, section: str | None = None
) -> GradeRow:
    """Grade one finished run and write the result; ValueError when it cannot be graded
    (unknown, not done, roll length unknown). Nothing is written before the checks pass.
    `section`: which section of the site's rules `rules` are, recorded with the grade.
    The caller commits."""
    rules = rules if rules is not None else GradingRules()
    run = session.scalar(
        select(Run)
        .where(Run.id == run_id)
        .with_for_update(read=True)
        .execution_options(populate_existing=True)
    )
    if run is None:
        raise ValueError(f"unknown run {run_id}")
    if run.status != "done":
        raise ValueError(f"run {run_id} of roll {run.roll_id} is {run.status}, not done")
    roll = session.get(Roll, run.roll_id)
    assert roll is not None  # the foreign key
    if roll.length_m is None:
        raise ValueError(f"roll {roll.id} has no length yet: it cannot be graded")
    if not roll.length_m > 0:
        raise ValueError(f"roll {roll.id} has a length of {roll.length_m} m: it cannot be graded")

    rows = session.execute(
        select(Defect.id, Defect.x0_mm, Defect.y0_mm, Defect.x1_mm, Defect.y1_mm, Defect.length_mm)
        .where(Defect.run_id == run_id)
        .order_by(Defect.defect_no)
    ).all()
    # rows where no fabric was seen (dark or blank frames) are graded neither way: the points
    # per 100 yd² are over the yards inspected, and the grade says how much was not
    unseen = unseen_mm(session, roll.id)
    # in rows, not mm: a roll seen nowhere came out 1e-13 mm seen by rounding, and graded "A"
    if (roll.length_m * 1000.0 - unseen) * roll.px_per_mm_y < 1:
        raise ValueError(
            f"roll {roll.id}: no fabric was seen over its {roll.length_m:.2f} m (dark or blank "
            "frames: the lights, the lens, the line's start or end?): it cannot be graded"
        )
    measured = measured_fabric_mm(session, roll.id)
    width_mm, left_mm, right_mm, source = choose_width(
        roll.width_mm, measured, rules.width_tolerance
    )
    if source == "measured":
        log.warning("roll %s: measured fabric width %.0f mm, manifest says %.0f mm (beyond "
                    "%.0f %%): grading on the measured width", roll.id, width_mm, roll.width_mm,
                    100 * rules.width_tolerance)  # fmt: skip
    result = grade_roll(
        [tuple(r[1:]) for r in rows], roll.length_m * 1000.0, width_mm, rules, left_mm, right_mm,
        edges_along_mm(session, roll.id), unseen,
    )  # fmt: skip
    result.details.update(
        width_source=source, manifest_width_mm=roll.width_mm,
        measured_width_mm=None if measured is None else measured[2], unseen_m=unseen / 1000.0,
    )  # fmt: skip
    if section is not None:
        result.details["rules_section"] = section

    if rows:
        # one statement over arrays: the ORM's bulk update was an executemany, one round trip
        # a defect (10,000 for a 2,000 m roll); None clears a stale value
        session.execute(
            _SET_POINTS,
            {"ids": [r.id for r in rows], "points": result.per_defect_points,
             "yards": result.per_defect_yards},
        )  # fmt: skip
    values = {
        "points": result.points,
        "points_per_100yd2": result.points_per_100yd2,
        "grade": result.grade,
        "yards": result.yards,
        "width_in": result.width_in,
        "details": {**result.details, "model_version": run.model_version},
    }
    stmt = insert(Grade).values(roll_id=roll.id, run_id=run_id, system=SYSTEM, **values)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[Grade.roll_id, Grade.run_id, Grade.system],
            set_={**{k: stmt.excluded[k] for k in values}, "graded_at": func.now()},
        )
    )
    ignored = len(result.details["defects_ignored_at_selvage"])
    log.info("graded roll %s run %s: %s (%d points, %.2f per 100 yd²)", roll.id, run_id,
             result.grade, result.points, result.points_per_100yd2)  # fmt: skip
    return GradeRow(
        roll_id=roll.id,
        run_id=run_id,
        fabric_type=roll.fabric_type,
        length_m=roll.length_m,
        points=result.points,
        points_per_100yd2=result.points_per_100yd2,
        grade=result.grade,
        defects=len(rows),
        ignored=ignored,
        unseen_m=unseen / 1000.0,
    )


def grade_rolls(
    session: Session,
    *,
    roll_id: str | None = None,
    since: datetime | None = None,
    rules_for: Callable[[str], GradingRules] | None = None,
    skipped: list[str] | None = None,
    ungraded: bool = False,
    commit_each: bool = False,
) -> list[GradeRow]:
    """Grade the current run of each roll whose current run is done: one roll (`roll_id`),
    the rolls whose current run finished at or after `since` (a naive datetime is local
    time) — and, with `ungraded`, those whose current run has no grade whenever it finished —
    or, with neither, every such roll. `rules_for(fabric_type)` gives the rules
    (default: the built-in ones), asked once per fabric type; a `RuleBook` also records with
    each grade which of its sections applied, and logs each fabric type graded on the default
    rules (a warning where a section's name differs from the type only in case or spacing)

    A roll that cannot be graded (no length recorded, absurd numbers, a write the database
    refuses) is logged and skipped, its writes undone by a savepoint, so that one odd roll
    does not roll back a nightly batch and fail it again every night (with `ungraded`, each
    night tries it again, and warns again, until it is fixed); `skipped`, when given,
    receives a line for each ("roll R: why"). Only an error that waiting may cure (the
    database away) ends the batch. An unknown `roll_id` is a ValueError. The caller commits —
    or, with `commit_each`, each roll's grade is committed as it is made: a batch over the whole
    archive held every run it had graded (`FOR SHARE`) until its end, and a finalize or a
    reprocess of one of those rolls waited minutes for it (20,000 rolls: 4 minutes)."""
    if roll_id is not None and session.get(Roll, roll_id) is None:
        raise ValueError(f"unknown roll {roll_id!r}")
    query = (
        select(Run.id, Run.roll_id, Roll.fabric_type)
        .join(Roll, Roll.id == Run.roll_id)
        .where(Run.is_current, Run.status == "done")
        .order_by(Run.roll_id)
    )
    if roll_id is not None:
        query = query.where(Run.roll_id == roll_id)
    if since is not None:
        recent = Run.finished_at >= (since if since.tzinfo else since.astimezone())
        # a run becomes current again without finishing again (a failed reprocess run hands
        # the roll back to the run before it, whose grade a re-finalize had deleted)
        query = query.where(or_(recent, ~RUN_GRADED) if ungraded else recent)
    get_rules = rules_for if rules_for is not None else RuleBook()
    book = get_rules if isinstance(get_rules, RuleBook) else None
    chosen: dict[str, tuple[GradingRules, str | None]] = {}  # fabric → (rules, section)
    graded: list[GradeRow] = []
    for run_id, roll, fabric in session.execute(query).all():
        if fabric not in chosen:
            chosen[fabric] = (get_rules(fabric), book.section(fabric) if book else None)
            if book is not None:
                _say_section(book, fabric)
        try:
            with session.begin_nested():  # a savepoint: a failed roll leaves nothing written
                graded.append(grade_run(session, run_id, *chosen[fabric]))
            if commit_each:
                session.commit()
        except Exception as exc:
            if is_transient_db_error(exc):
                raise
            log.warning("run %s not graded: %s: %s", run_id, type(exc).__name__, exc)
            if skipped is not None:
                skipped.append(f"roll {roll}: {exc}")
    return graded


def _say_section(book: RuleBook, fabric: str) -> None:
    # a section named for a fabric type but spelt otherwise graded its rolls on the default
    # limits without a word
    if (near := book.near_miss(fabric)) is not None:
        log.warning("fabric type %r has no section in the grading rules but %r looks like it: "
                    "its rolls are graded on the default rules", fabric, near)  # fmt: skip
    elif book.fabrics and fabric not in book.fabrics:
        log.info("fabric type %r has no section in the grading rules: its rolls are graded on "
                 "the default rules", fabric)  # fmt: skip
