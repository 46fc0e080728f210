"""Grading on a real PostgreSQL: points per defect, one grade row per (roll, run, system)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from results.grade_store import SYSTEM, grade_rolls, grade_run
from results.grading_rules import GradingRules
from storage.fabric_extents import store_extents
from storage.schema import Defect, Grade, Model, Roll, Run

IN, YD = 25.4, 914.4  # mm
NOW = datetime.now(UTC)


def _roll(s: Session, roll_id: str, fabric: str = "denim", length_m: float | None = 91.44) -> Roll:
    # 60 in wide (1524 mm), 100 yd long (91.44 m) unless told otherwise
    roll = Roll(id=roll_id, fabric_type=fabric, width_mm=60 * IN, px_per_mm_x=4.0,
                px_per_mm_y=4.0, length_m=length_m, status="done")  # fmt: skip
    s.add(roll)
    s.flush()
    return roll


def _model(s: Session, version: str = "m1", n: int = 1) -> Model:
    model = Model(version=version, fabric_type="denim", variant="residual", teacher="resnet34",
                  tile=256, checkpoint_uri=f"file:///models/{version}.pt", sha256=f"{n:064x}",
                  threshold=0.5)  # fmt: skip
    s.add(model)
    s.flush()
    return model


def _run(
    s: Session, roll_id: str, version: str = "m1", *, status: str = "done",
    current: bool = True, finished: datetime | None = NOW,
) -> Run:  # fmt: skip
    run = Run(roll_id=roll_id, model_version=version, purpose="live", status=status,
              is_current=current, finished_at=finished if status == "done" else None)  # fmt: skip
    s.add(run)
    s.flush()
    return run


def _defects(s: Session, run: Run, lengths_in: list[float], selvage: bool = True) -> None:
    """One defect per length, each in its own yard (10, 20, …); then one at the selvage."""
    rows = [(500.0, 10 * (i + 1) * YD, 500.0 + n * IN, n * IN) for i, n in enumerate(lengths_in)]
    if selvage:
        rows.append((0.0, 95 * YD, 20.0, 20.0))
    for no, (x0, y0, x1, length) in enumerate(rows, start=1):
        s.add(
            Defect(run_id=run.id, roll_id=run.roll_id, defect_no=no, x_mm=(x0 + x1) / 2,
                   y_mm=y0 + 5, x0_mm=x0, y0_mm=y0, x1_mm=x1, y1_mm=y0 + 10, length_mm=length,
                   width_mm=10.0, area_mm2=10.0 * length, max_score=0.9, mean_score=0.7)
        )  # fmt: skip
    s.flush()


def _points(s: Session, run_id: int) -> list[int | None]:
    return list(
        s.scalars(select(Defect.points).where(Defect.run_id == run_id).order_by(Defect.defect_no))
    )


def test_grade_writes_points_and_one_grade_row_that_a_regrade_replaces(db_session: Session) -> None:
    s = db_session
    _roll(s, "R1")
    _model(s)
    run = _run(s, "R1")
    _defects(s, run, [2, 5, 8, 12])

    row = grade_run(s, run.id)
    assert (row.roll_id, row.run_id, row.points, row.grade) == ("R1", run.id, 10, "A")
    assert row.points_per_100yd2 == pytest.approx(10 * 3600 / (100 * 58))
    assert (row.defects, row.ignored) == (5, 1)
    assert _points(s, run.id) == [1, 2, 3, 4, None]
    grade = s.scalars(select(Grade)).one()
    assert (grade.system, grade.points, grade.grade) == (SYSTEM, 10, "A")
    assert (grade.yards, grade.width_in) == (pytest.approx(100.0), pytest.approx(58.0))
    assert grade.details["defects_ignored_at_selvage"] == [4]
    assert grade.details["model_version"] == "m1"
    s.commit()
    first_graded_at = grade.graded_at

    # stricter rules: the same row is replaced, with a new grade and a new time
    strict = GradingRules(acceptance=(("A", 5.0), ("B", 6.0)), reject_name="R")
    assert grade_run(s, run.id, strict).grade == "R"
    s.commit()
    s.expire_all()
    assert s.scalar(select(func.count()).select_from(Grade)) == 1
    grade = s.scalars(select(Grade)).one()
    assert grade.grade == "R" and grade.details["acceptance"] == [["A", 5.0], ["B", 6.0]]
    assert grade.graded_at > first_graded_at

    view = s.execute(
        text(
            "SELECT roll_id, system, grade, points, points_per_100yd2, model_version FROM roll_grades"
        )
    ).all()
    assert view == [("R1", SYSTEM, "R", 10, pytest.approx(6.2069, abs=1e-4), "m1")]

    # a wider margin now counts the selvage defect: its stale NULL becomes a point value
    grade_run(s, run.id, GradingRules(selvage_margin_in=0.5))
    assert _points(s, run.id) == [1, 2, 3, 4, 1]


def test_only_finished_current_runs_are_graded(db_session: Session) -> None:
    s = db_session
    _model(s, "m1", 1)
    _model(s, "m2", 2)
    for roll_id in ("R1", "R2", "R3", "R4"):
        _roll(s, roll_id)
    _defects(s, _run(s, "R1"), [12])
    _run(s, "R2", status="scoring", current=False)  # a live run not yet finalized
    _run(s, "R3", status="finalizing")  # current but not done (odd, but not gradeable)
    live = _run(s, "R4", "m1")  # stays current while its reprocess is still scoring
    _run(s, "R4", "m2", status="scoring", current=False)
    s.commit()

    rows = grade_rolls(s)
    assert [r.roll_id for r in rows] == ["R1", "R4"]
    assert rows[1].run_id == live.id
    assert s.scalars(select(Grade.roll_id).order_by(Grade.roll_id)).all() == ["R1", "R4"]
    assert grade_rolls(s, roll_id="R2") == []
    with pytest.raises(ValueError, match="not done"):
        grade_run(s, s.scalar(select(Run.id).where(Run.roll_id == "R3")))
    with pytest.raises(ValueError, match="unknown roll 'nope'"):
        grade_rolls(s, roll_id="nope")
    grades = dict(s.execute(text("SELECT roll_id, grade FROM roll_grades")).all())
    assert grades == {"R1": "A", "R2": None, "R3": None, "R4": "A"}


def test_since_rules_per_fabric_and_rolls_without_a_length(db_session: Session) -> None:
    s = db_session
    _model(s)
    _roll(s, "OLD")
    _roll(s, "NEW", fabric="twill")
    _roll(s, "NOLEN", length_m=None)
    _defects(s, _run(s, "OLD", finished=NOW - timedelta(days=3)), [12])
    _defects(s, _run(s, "NEW"), [12] * 3)
    _run(s, "NOLEN")

    asked: list[str] = []

    def rules_for(fabric: str) -> GradingRules:
        asked.append(fabric)
        return GradingRules(acceptance=((f"{fabric}-ok", 2.0),), reject_name=f"{fabric}-no")

    rows = grade_rolls(s, since=NOW - timedelta(days=1), rules_for=rules_for)
    # NOLEN is skipped (logged), not fatal; OLD finished before `since`
    assert [(r.roll_id, r.points, r.grade) for r in rows] == [("NEW", 12, "twill-no")]
    rows = grade_rolls(s, rules_for=rules_for)
    assert [(r.roll_id, r.grade) for r in rows] == [("NEW", "twill-no"), ("OLD", "denim-no")]
    assert sorted(asked) == ["denim", "denim", "twill", "twill"]  # once per call and fabric
    assert s.scalar(select(func.count()).select_from(Grade)) == 2


def test_cli_grades_and_prints_a_table(
    db_session: Session, monkeypatch: pytest.MonkeyPatch, migrated_url: str, tmp_path, capsys
) -> None:
    from cli.main import main

    s = db_session
    _model(s)
    _roll(s, "R1")
    _defects(s, _run(s, "R1"), [2, 5, 8, 12])
    s.commit()
    monkeypatch.setenv("ROLLSCAN_DATABASE_URL", migrated_url)
    monkeypatch.setenv("ROLLSCAN_DATA_DIR", str(tmp_path / "data"))
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"fabric_types": {"denim": {"acceptance": [["first", 15]],
                                                            "reject_name": "second"}}}))  # fmt: skip

    assert main(["grade", "--roll", "R1", "--rules", str(rules)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["roll", "length", "m", "points", "points/100", "yd²", "grade"]
    assert out[1].split() == ["R1", "91.4", "10", "6.21", "first"]
    assert s.scalar(select(Grade.details["rules_section"].astext)) == "fabric_types.denim"
    assert main(["grade", "--since", "2000-01-01"]) == 0
    assert "R1" in capsys.readouterr().out
    assert s.scalar(select(Grade.details["rules_section"].astext)) == "default"  # no --rules
    assert s.scalar(select(func.count()).select_from(Grade)) == 1

    # a section spelt otherwise than the rolls' fabric type graded them on the default limits
    # without a word: the grade says which section applied, and the log names the near miss
    near = tmp_path / "near.json"
    near.write_text(json.dumps({"fabric_types": {"Denim ": {"acceptance": [["first", 5]]}}}))
    env = {**os.environ, "ROLLSCAN_DATABASE_URL": migrated_url,
           "ROLLSCAN_DATA_DIR": str(tmp_path / "data")}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "cli", "grade", "--rules", str(near)],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        "fabric type 'denim' has no section in the grading rules but 'Denim ' looks like it"
        in done.stderr
    )
    assert done.stdout.splitlines()[1].split()[-1] == "A"
    s.expire_all()
    assert s.scalar(select(Grade.details["rules_section"].astext)) == "default"

    # the same rules from ROLLSCAN_GRADING_RULES; --rules wins over it
    strict = tmp_path / "strict.toml"
    strict.write_text('[fabric_types.denim]\nacceptance = [["first", 5]]\nreject_name = "out"\n')
    monkeypatch.setenv("ROLLSCAN_GRADING_RULES", str(strict))
    assert main(["grade", "--roll", "R1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "out"
    assert main(["grade", "--roll", "R1", "--rules", str(rules)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "first"
    monkeypatch.setenv("ROLLSCAN_GRADING_RULES", str(tmp_path / "missing.toml"))
    assert main(["grade", "--roll", "R1"]) == 2
    assert "grading rules file" in capsys.readouterr().err
    monkeypatch.delenv("ROLLSCAN_GRADING_RULES")

    rules.write_text(json.dumps({"fabric_type": {}}))
    assert main(["grade", "--rules", str(rules)]) == 2
    assert "unknown key(s) ['fabric_type']" in capsys.readouterr().err
    # the scheduler that grades nightly says so when it starts, not by failing every night
    monkeypatch.setenv("ROLLSCAN_GRADING_RULES", str(rules))
    assert main(["scheduler", "--once", "--beat"]) == 2
    assert "unknown key(s) ['fabric_type']" in capsys.readouterr().err
    monkeypatch.delenv("ROLLSCAN_GRADING_RULES")

    # a roll that cannot be graded is named and fails the command (it said the opposite: "roll
    # R2 has a finished current run to grade", and exited 0)
    _roll(s, "R2", length_m=None)
    _run(s, "R2")
    _roll(s, "R3")
    _run(s, "R3", status="scoring")
    s.commit()
    assert main(["grade", "--roll", "R2"]) == 1
    assert "not graded: roll R2: roll R2 has no length yet" in capsys.readouterr().err
    _roll(s, "R4", length_m=0.0)
    _run(s, "R4")
    s.commit()
    assert main(["grade", "--roll", "R4"]) == 1  # not "no length yet": it has one, and it is 0
    assert "not graded: roll R4: roll R4 has a length of 0.0 m" in capsys.readouterr().err
    assert main(["grade", "--roll", "R3"]) == 1
    assert "roll R3 has no finished current run" in capsys.readouterr().err
    assert main(["grade"]) == 1  # R1 graded, R2 not: the table and the failure
    captured = capsys.readouterr()
    assert "R1" in captured.out and "not graded: roll R2" in captured.err


def _defect_along(s: Session, run: Run, no: int, y0_yd: float, y1_yd: float) -> None:
    """A defect 1 in wide from `y0_yd` to `y1_yd` along the roll (its length is that extent)."""
    y0, y1 = y0_yd * YD, y1_yd * YD
    s.add(
        Defect(run_id=run.id, roll_id=run.roll_id, defect_no=no, x_mm=500.0, y_mm=(y0 + y1) / 2,
               x0_mm=490.0, y0_mm=y0, x1_mm=490.0 + IN, y1_mm=y1, length_mm=y1 - y0,
               width_mm=IN, area_mm2=IN * (y1 - y0), max_score=0.9, mean_score=0.7)
    )  # fmt: skip
    s.flush()


def test_defects_over_one_two_and_many_yards_are_charged_and_stored_per_yard(
    db_session: Session,
) -> None:
    """Through PostgreSQL: a defect longer than a yard is charged 4 points in each yard it
    touches, and the nightly grading stores that charge (it once broke `points` 1..4)."""
    from scheduler.beat import grade_since_last

    s = db_session
    _model(s)
    _roll(s, "R1")
    run = _run(s, "R1")
    _defect_along(s, run, 1, 20.1, 20.4)  # 10.8 in, inside yard 20: 4 points once
    _defect_along(s, run, 2, 0.5, 1.7)  # 1.2 yd over yards 0 and 1: 4 + 4
    _defect_along(s, run, 3, 10.2, 15.5)  # yards 10 … 15: 6 × 4
    _defect_along(s, run, 4, 11.1, 11.2)  # a 3.6 in hole in yard 11 beside it: capped away
    s.commit()

    rows = grade_since_last(s)
    s.commit()
    assert [(r.roll_id, r.points) for r in rows] == [("R1", 4 + 8 + 24)]
    stored = s.execute(
        select(Defect.points, Defect.yards_charged).where(Defect.run_id == run.id)
        .order_by(Defect.defect_no)
    ).all()  # fmt: skip
    assert [tuple(r) for r in stored] == [(4, 1), (8, 2), (24, 6), (2, 1)]
    view = s.execute(
        text("SELECT defect_no, points, yards_charged FROM current_defects ORDER BY defect_no")
    ).all()
    assert [tuple(r) for r in view] == [(1, 4, 1), (2, 8, 2), (3, 24, 6), (4, 2, 1)]
    grade = s.scalars(select(Grade)).one()
    assert grade.points == 36 and grade.details["points_before_cap"] == 38
    assert grade.details["yards_capped"] == [{"yard": 11, "points": 6, "counted": 4}]

    # the database itself refuses a charge above 4 points per yard
    with pytest.raises(Exception, match="ck_defects_points_per_yard"):
        s.execute(text("UPDATE defects SET points = 9 WHERE defect_no = 2"))
    s.rollback()


def test_one_bad_roll_does_not_fail_the_nightly_grading(db_session: Session) -> None:
    """A roll whose numbers break grading (an infinite defect end, as an absurd px_per_mm_y
    once produced) is skipped with its writes undone; the other rolls are graded and the
    grading mark moves on, so the next night does not fail on it again."""
    from scheduler.beat import grade_since_last
    from storage.schema import DiscoveryCursor

    s = db_session
    _model(s)
    for roll_id in ("A1", "BAD", "Z9"):
        _roll(s, roll_id)
    _defects(s, _run(s, "A1"), [12], selvage=False)
    bad = _run(s, "BAD")
    _defect_along(s, bad, 1, 3.0, 5.0)
    s.execute(text("UPDATE defects SET y1_mm = 'Infinity' WHERE run_id = :r"), {"r": bad.id})
    _defects(s, _run(s, "Z9"), [2], selvage=False)
    s.commit()

    rows = grade_since_last(s)
    s.commit()
    assert [r.roll_id for r in rows] == ["A1", "Z9"]
    assert s.scalars(select(Grade.roll_id).order_by(Grade.roll_id)).all() == ["A1", "Z9"]
    assert _points(s, bad.id) == [None]  # nothing of the failed roll was written
    assert s.get(DiscoveryCursor, "grading").cursor is not None


def test_grading_places_each_defects_selvage_by_the_edges_measured_beside_it(
    db_session: Session,
) -> None:
    """The stored extents, block by block: the fabric's left edge at 50 mm for 50 yards, then
    at 90 mm. A mark 2–20 mm inside the edge beside it, at yard 80, lies in the selvage: the
    roll's median edge (50 mm) charged it a point."""
    s = db_session
    _model(s)
    _roll(s, "R-wander")
    run = _run(s, "R-wander")
    rows, block = int(91.44 * 1000 * 4), 1024  # 4 px/mm
    store_extents(s, "R-wander", (4.0, 4.0), [
        SimpleNamespace(row_start=r, row_stop=min(r + block, rows),
                        left=200 if r < rows // 2 else 360, right=6296)
        for r in range(0, rows, block)
    ])  # fmt: skip
    for no, (x0, y) in enumerate([(92.0, 80 * YD), (120.0, 81 * YD)], start=1):
        s.add(Defect(run_id=run.id, roll_id="R-wander", defect_no=no, x_mm=x0 + 9, y_mm=y + 5,
                     x0_mm=x0, y0_mm=y, x1_mm=x0 + 18, y1_mm=y + 10, length_mm=18.0,
                     width_mm=10.0, area_mm2=180.0, max_score=0.9, mean_score=0.7))  # fmt: skip
    s.flush()
    grade_run(s, run.id)
    assert _points(s, run.id) == [None, 1]


def test_the_nightly_grading_takes_a_current_run_without_a_grade_whenever_it_finished(
    db_session: Session,
) -> None:
    """A failed reprocess run hands its roll back to the run before it (`worker.deliveries`),
    whose grade a re-finalize had deleted and which does not finish again: the next night
    grades it, though it finished before the mark; a graded run that old is left alone."""
    from scheduler.beat import grade_since_last
    from storage.schema import DiscoveryCursor

    s = db_session
    _model(s)
    for roll_id in ("BACK", "DONE"):
        _roll(s, roll_id)
    _defects(s, _run(s, "BACK", finished=NOW - timedelta(days=3)), [12], selvage=False)
    done = _run(s, "DONE", finished=NOW - timedelta(days=3))
    _defects(s, done, [2], selvage=False)
    grade_rolls(s, roll_id="DONE")
    s.add(DiscoveryCursor(name="grading", cursor=(NOW - timedelta(days=1)).isoformat()))
    s.commit()

    assert [r.roll_id for r in grade_since_last(s)] == ["BACK"]
    s.commit()
    assert grade_since_last(s) == []  # graded now: not again
    # `rollscan grade --since` keeps its meaning: the runs finished since then, no others
    assert grade_rolls(s, since=NOW - timedelta(days=1)) == []


def test_a_long_grading_holds_no_graded_roll_until_its_end(db_session: Session, db_engine) -> None:
    """The whole archive graded in one transaction held each graded run `FOR SHARE` to its end:
    a finalize making another run current waited minutes (20,000 rolls: 4). Each roll's grade
    commits as it is made now; the batch still asks the rules once per fabric type, which is
    where this test, between the two rolls, makes the finalize's write."""
    from scheduler.beat import grade_since_last

    s = db_session
    _model(s)
    _roll(s, "A")
    _roll(s, "B", fabric="twill")
    first = _run(s, "A")
    _defects(s, first, [2])
    _defects(s, _run(s, "B"), [5])
    s.commit()
    written: list[str] = []

    def rules_for(fabric: str) -> GradingRules:
        if fabric == "twill":  # roll A is graded; B is next
            with db_engine.connect() as other:
                other.execute(text("SET lock_timeout = '2s'"))
                other.execute(text("UPDATE runs SET is_current = false WHERE id = :id"),
                              {"id": first.id})  # fmt: skip
                other.rollback()
                written.append(fabric)
        return GradingRules()

    for grade in (lambda: grade_rolls(s, rules_for=rules_for, commit_each=True),
                  lambda: grade_since_last(s, rules_for)):  # fmt: skip
        written.clear()
        assert [r.roll_id for r in grade()] == ["A", "B"]
        assert written == ["twill"]  # not "canceling statement due to lock timeout"
