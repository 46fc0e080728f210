"""The schema on a real PostgreSQL: the views show the current run only, the constraints refuse
what they must, and the transient errors are recognised. Migrations and `rollscan db`:
test_db_migrations.py.
"""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest
from fixtures_pg import alter_database, empty_tables
from sqlalchemy import Engine, func, make_url, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError, InternalError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from results.defect_tables import list_rolls
from storage import database
from storage.schema import Defect, Frame, Grade, Model, Roll, Run

UNIQUE, FOREIGN_KEY, CHECK = "23505", "23503", "23514"


# ----------------------------------------------------------------------------- data


def _roll(session: Session, roll_id: str = "R1", fabric: str = "denim") -> Roll:
    roll = Roll(id=roll_id, fabric_type=fabric, width_mm=1600.0, px_per_mm_x=4.0, px_per_mm_y=4.0)
    session.add(roll)
    session.flush()
    return roll


def _model(
    session: Session, version: str, fabric: str | None, *, active: bool = False, n: int = 0
) -> Model:
    model = Model(
        version=version,
        fabric_type=fabric,
        variant="dg" if fabric is None else "residual",
        teacher="resnet34",
        tile=256,
        checkpoint_uri=f"file:///models/{version}.pt",
        sha256=f"{n:064x}",
        threshold=0.5,
        active=active,
    )
    session.add(model)
    session.flush()
    return model


def _run(
    session: Session, roll_id: str, version: str, *, current: bool, purpose: str = "live"
) -> Run:
    run = Run(
        roll_id=roll_id, model_version=version, purpose=purpose, status="done", is_current=current
    )
    session.add(run)
    session.flush()
    return run


def _defect(run: Run, no: int, y_mm: float) -> Defect:
    return Defect(
        run_id=run.id, roll_id=run.roll_id, defect_no=no, x_mm=100.0, y_mm=y_mm,
        x0_mm=95.0, y0_mm=y_mm - 5, x1_mm=105.0, y1_mm=y_mm + 5, length_mm=10.0,
        width_mm=10.0, area_mm2=60.0, max_score=0.9, mean_score=0.7, points=1, yards_charged=1,
    )  # fmt: skip


def _grade(run: Run, grade: str, points: int) -> Grade:
    return Grade(
        roll_id=run.roll_id, run_id=run.id, system="astm_d5430", points=points,
        points_per_100yd2=points * 1.5, grade=grade, yards=100.0, width_in=63.0,
    )  # fmt: skip


def test_views_show_the_current_run_only(db_session: Session) -> None:
    s = db_session
    _roll(s, "R1", "denim")
    _roll(s, "R2", "twill")  # no run yet
    _model(s, "generic-1", None, n=1)
    _model(s, "denim-2", "denim", active=True, n=2)
    old = _run(s, "R1", "generic-1", current=False)
    new = _run(s, "R1", "denim-2", current=True, purpose="reprocess")
    s.add_all([_defect(old, i, 1000.0 * i) for i in (1, 2, 3)])
    s.add_all([_defect(new, i, 500.0 * i) for i in (1, 2)])
    s.add_all([_grade(old, "B", 30), _grade(new, "A", 10)])
    s.commit()

    runs = s.execute(text("SELECT roll_id, run_id, model_version FROM current_runs")).all()
    assert runs == [("R1", new.id, "denim-2")]

    defects = s.execute(
        text(
            "SELECT roll_id, fabric_type, defect_no, y_mm, model_version, run_id "
            "FROM current_defects ORDER BY defect_no"
        )
    ).all()
    assert defects == [
        ("R1", "denim", 1, 500.0, "denim-2", new.id),
        ("R1", "denim", 2, 1000.0, "denim-2", new.id),
    ]

    grades = s.execute(
        text(
            "SELECT roll_id, fabric_type, grade, points, model_version FROM roll_grades ORDER BY roll_id"
        )
    ).all()
    assert grades == [("R1", "denim", "A", 10, "denim-2"), ("R2", "twill", None, None, None)]

    # switching the current run switches every view; the old run's rows come back
    s.execute(text("UPDATE runs SET is_current = false WHERE id = :id"), {"id": new.id})
    s.execute(text("UPDATE runs SET is_current = true WHERE id = :id"), {"id": old.id})
    assert (
        s.scalar(text("SELECT count(*) FROM current_defects WHERE run_id = :id"), {"id": old.id})
        == 3
    )
    assert s.scalar(text("SELECT grade FROM roll_grades WHERE roll_id = 'R1'")) == "B"


def test_a_failed_current_run_shows_no_defects_nor_grade(db_session: Session) -> None:
    """A done run reopened by a changed frame whose band was given up stays current, failed: its
    defects may read replaced pixels. The views and `rollscan rolls` showed them and its grade
    while `rollscan defects` refused them."""
    s = db_session
    _roll(s, "R1", "denim")
    _roll(s, "R2", "denim")
    _model(s, "denim-1", "denim", n=1)
    run = _run(s, "R1", "denim-1", current=True)
    s.add_all([_defect(run, i, 1000.0 * i) for i in (1, 2, 3)] + [_grade(run, "B", 30)])
    s.add(_run(s, "R2", "denim-1", current=True))
    s.commit()
    listed = {r["id"]: (r["defects"], r["grade"]) for r in list_rolls(s)}
    assert listed == {"R1": (3, "B"), "R2": (0, None)}
    run.status = "failed"
    s.commit()
    assert s.scalar(text("SELECT count(*) FROM current_defects WHERE roll_id = 'R1'")) == 0
    grades = s.execute(text("SELECT roll_id, grade, model_version FROM roll_grades ORDER BY 1"))
    assert grades.all() == [("R1", None, "denim-1"), ("R2", None, "denim-1")]
    assert {r["id"]: (r["defects"], r["grade"]) for r in list_rolls(s)} == {
        "R1": (None, None),
        "R2": (0, None),
    }


def test_defects_say_whether_their_run_is_graded(db_session: Session) -> None:
    """NULL points mean "ignored at the selvage" on a graded run, "not graded yet" before."""
    s = db_session
    _roll(s, "R1", "denim")
    _model(s, "denim-1", "denim", n=1)
    run = _run(s, "R1", "denim-1", current=True)
    finalized = _defect(run, 1, 500.0)
    finalized.points = finalized.yards_charged = None  # as finalize stores it
    s.add(finalized)
    s.commit()
    graded = "SELECT points, graded FROM current_defects WHERE roll_id = 'R1'"
    assert s.execute(text(graded)).all() == [(None, False)]
    s.add(_grade(run, "A", 0))  # the grading found it wholly within the selvage margin
    s.commit()
    assert s.execute(text(graded)).all() == [(None, True)]


# ----------------------------------------------------------------------------- constraints


def _violates(session: Session, code: str, statement: object, params: dict | None = None) -> None:
    with pytest.raises(IntegrityError) as caught, session.begin_nested():
        session.execute(statement, params or {})  # type: ignore[call-overload]
    assert caught.value.orig.pgcode == code, caught.value.orig


def test_defect_numbers_are_unique_per_run(db_session: Session) -> None:
    s = db_session
    _roll(s)
    _model(s, "m1", "denim", n=1)
    run = _run(s, "R1", "m1", current=True)
    s.add(_defect(run, 1, 10.0))
    s.flush()
    row = {
        c.name: getattr(_defect(run, 1, 20.0), c.name) for c in Defect.__table__.c if c.name != "id"
    }
    _violates(s, UNIQUE, insert(Defect).values(**row))
    # idempotent re-finalize: the same defect numbers again change nothing
    again = s.execute(
        insert(Defect).values(**row).on_conflict_do_nothing(index_elements=["run_id", "defect_no"])
    )
    assert again.rowcount == 0


def test_defect_roll_must_be_its_runs_roll(db_session: Session) -> None:
    s = db_session
    _roll(s, "R1")
    _roll(s, "R2")
    _model(s, "m1", "denim", n=1)
    run = _run(s, "R1", "m1", current=True)
    row = {
        c.name: getattr(_defect(run, 1, 20.0), c.name) for c in Defect.__table__.c if c.name != "id"
    }
    _violates(s, FOREIGN_KEY, insert(Defect).values(**{**row, "roll_id": "R2"}))


def test_frame_upsert_is_idempotent(db_session: Session) -> None:
    s = db_session
    _roll(s)
    frame = {
        "roll_id": "R1",
        "seq": 0,
        "key": "incoming/R1/frames/000000.tif",
        "etag": "e1",
        "row_start": 0,
        "rows": 512,
    }
    once = insert(Frame).values(**frame).on_conflict_do_nothing(index_elements=["roll_id", "seq"])
    assert s.execute(once).rowcount == 1
    assert s.execute(once).rowcount == 0
    assert s.scalar(select(func.count()).select_from(Frame)) == 1
    _violates(s, UNIQUE, insert(Frame).values(**frame))  # the key, not luck, makes it a no-op

    # re-ingest only when the ETag changed
    def upsert(etag: str) -> int:
        stmt = insert(Frame).values(**{**frame, "etag": etag})
        stmt = stmt.on_conflict_do_update(
            index_elements=["roll_id", "seq"],
            set_={"etag": stmt.excluded.etag, "ingested_at": func.now()},
            where=Frame.etag.is_distinct_from(stmt.excluded.etag),
        )
        return s.execute(stmt).rowcount

    assert upsert("e1") == 0
    assert upsert("e2") == 1
    assert s.scalar(select(Frame.etag)) == "e2"


def test_one_active_model_per_fabric_and_one_generic(db_session: Session) -> None:
    s = db_session
    _model(s, "denim-1", "denim", active=True, n=1)
    _model(s, "twill-1", "twill", active=True, n=2)
    _model(s, "generic-1", None, active=True, n=3)
    _model(s, "denim-0", "denim", active=False, n=4)  # inactive ones are not limited
    _model(s, "generic-0", None, active=False, n=5)
    s.flush()
    _violates(s, UNIQUE, text("UPDATE models SET active = true WHERE version = 'denim-0'"))
    _violates(s, UNIQUE, text("UPDATE models SET active = true WHERE version = 'generic-0'"))
    _violates(s, CHECK, text("UPDATE models SET fabric_type = '' WHERE version = 'generic-0'"))
    _violates(
        s,
        UNIQUE,
        text("UPDATE models SET sha256 = :h WHERE version = 'denim-0'"),
        {"h": f"{1:064x}"},
    )


def test_one_current_run_per_roll(db_session: Session) -> None:
    s = db_session
    _roll(s, "R1")
    _roll(s, "R2")
    _model(s, "m1", "denim", n=1)
    _model(s, "m2", "denim", n=2)
    _run(s, "R1", "m1", current=True)
    _run(s, "R2", "m1", current=True)  # another roll: fine
    _run(s, "R1", "m2", current=False)
    s.flush()
    _violates(
        s,
        UNIQUE,
        text("UPDATE runs SET is_current = true WHERE roll_id = 'R1' AND model_version = 'm2'"),
    )
    _violates(
        s,
        UNIQUE,
        text("INSERT INTO runs (roll_id, model_version, purpose) VALUES ('R1', 'm1', 'reprocess')"),
    )
    _violates(
        s, CHECK, text("UPDATE runs SET bands_total = 3, bands_done = 4 WHERE roll_id = 'R2'")
    )


def test_hostile_roll_id_is_refused_by_the_check(db_session: Session) -> None:
    s = db_session
    insert_roll = text(
        "INSERT INTO rolls (id, fabric_type, width_mm, px_per_mm_x, px_per_mm_y) "
        "VALUES (:id, 'denim', 1600, 4, 4)"
    )
    for bad in ["'; DROP TABLE rolls; --", "../etc", ".hidden", "a/b", "", "x" * 129]:
        _violates(s, CHECK, insert_roll, {"id": bad})
    for good in ["R1", "2024-05-01_loom7.roll-3", "x" * 128]:
        s.execute(insert_roll, {"id": good})
    assert s.scalar(text("SELECT to_regclass('rolls') IS NOT NULL"))
    assert s.scalar(text("SELECT count(*) FROM rolls")) == 3


# ----------------------------------------------------------------------------- errors


def test_transient_errors_are_recognised(db_engine: Engine) -> None:
    refused = database.make_engine(
        "postgresql+psycopg2://postgres@127.0.0.1:1/x", connect_args={"connect_timeout": 2}
    )
    with pytest.raises(OperationalError) as caught:
        refused.connect()
    assert database.is_transient_db_error(caught.value)
    assert database.is_transient_db_error(RuntimeError("task failed")) is False
    try:
        raise RuntimeError("band 3 failed") from caught.value
    except RuntimeError as wrapped:
        assert database.is_transient_db_error(wrapped)

    # a server-side termination (what a restart does to open sessions)
    url = db_engine.url
    victim = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database
    )
    try:
        with victim.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
        with db_engine.begin() as conn:
            assert conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(psycopg2.OperationalError) as terminated, victim.cursor() as cur:
            cur.execute("SELECT 1")
        assert database.is_transient_db_error(terminated.value)
    finally:
        victim.close()

    with db_engine.connect() as conn:
        with pytest.raises(ProgrammingError) as bad_sql:
            conn.execute(text("SELEC 1"))
        assert not database.is_transient_db_error(bad_sql.value)
        conn.rollback()
        with pytest.raises(IntegrityError) as bad_row:
            conn.execute(text("INSERT INTO rolls (id) VALUES ('R1')"))
        assert not database.is_transient_db_error(bad_row.value)


def test_a_connection_whose_server_falls_silent_is_given_up(db_engine: Engine) -> None:
    """A server gone silent mid-query (a partition, a frozen VM) held its worker until the
    broker's own timeout: TCP keepalives and a user timeout now give the connection up."""
    engine = database.make_engine(db_engine.url)
    try:
        with engine.connect() as conn:
            dsn = conn.connection.dbapi_connection.get_dsn_parameters()
    finally:
        engine.dispose()
    assert (dsn["keepalives"], dsn["keepalives_idle"], dsn["tcp_user_timeout"]) == (
        "1",
        "30",
        "60000",
    )


def test_connections_are_named_by_process_unless_the_site_names_them(db_engine: Engine) -> None:
    """`rollscan db stop` names the processes still connected; a name the site's URL gives
    (for its DBA's pg_stat_activity, its pooler's rules) is kept."""
    import os

    def name(url) -> str:
        engine = database.make_engine(url)
        try:
            with engine.connect() as conn:
                return conn.exec_driver_sql("SHOW application_name").scalar()
        finally:
            engine.dispose()

    assert name(db_engine.url) == f"rollscan pid {os.getpid()}"
    assert name(db_engine.url.update_query_dict({"application_name": "line3"})) == "line3"


def test_rolls_since_a_day_lists_those_completed_that_day_as_the_table_shows_them(
    db_session: Session,
) -> None:
    """`rollscan rolls --since` filtered on the registration, which its table never shows: a
    roll scanned across midnight, shown completed today, was missing from today's list (and
    from the list since its completion date, pasted back), while `grade --since` and
    `reprocess --since` took it."""
    from datetime import datetime

    from cli.arg_types import at_site, iso_date
    from results.defect_tables import count_rolls

    s = db_session
    paris = "Europe/Paris"
    times = {  # registered, completed (site time)
        "R-before": ("2027-11-14 08:00", "2027-11-14 09:00"),
        "R-night": ("2027-11-14 23:30", "2027-11-15 00:30"),
        "R-day": ("2027-11-15 10:00", None),
    }
    for roll_id, (created, completed) in times.items():
        roll = _roll(s, roll_id)
        roll.created_at = at_site(iso_date(created), paris)
        roll.completed_at = completed and at_site(iso_date(completed), paris)
    s.commit()
    for since in ("2027-11-15", "2027-11-15 00:30 CET"):
        moment = at_site(iso_date(since), paris)
        assert [r["id"] for r in list_rolls(s, since=moment)] == ["R-night", "R-day"], since
        assert count_rolls(s, moment) == 2
    assert [
        r["id"] for r in list_rolls(s, since=datetime.fromisoformat("2027-11-15T12:00+01:00"))
    ] == []


def test_emptying_the_tables_gives_up_on_a_lock_held_and_names_its_holder(
    db_engine: Engine,
) -> None:
    """The test suite's own teardown: a session left idle in a transaction held TRUNCATE, and
    the whole run with it, for ever."""
    with db_engine.connect() as holder:
        holder.execute(text("SET application_name = 'the-holder'"))
        holder.execute(select(func.count()).select_from(Roll))  # a lock until rolled back
        with pytest.raises(RuntimeError, match=r"the-holder.*idle in transaction"):
            empty_tables(db_engine, lock_timeout="1s")
        holder.rollback()
    empty_tables(db_engine, lock_timeout="1s")


def test_a_database_whose_disk_is_full_is_waited_for_and_said(db_engine: Engine) -> None:
    """PostgreSQL's disk full (SQLSTATE 53100) failed every roll in flight for good."""
    from cli.connect import service_error

    with db_engine.connect() as conn, pytest.raises(OperationalError) as full:
        conn.execute(text(
            "DO $$ BEGIN RAISE EXCEPTION 'could not extend file \"base/1/2\": No space left on "
            "device' USING ERRCODE = 'disk_full'; END $$"
        ))  # fmt: skip
    assert database.is_transient_db_error(full.value)
    message, code = service_error(full.value)
    assert code == 3 and message.startswith("the database's disk is full: could not extend file")
    # the same SQLSTATE for a small /dev/shm: the same big query fails each time, not waited for
    with db_engine.connect() as conn, pytest.raises(OperationalError) as shm:
        conn.execute(text(
            "DO $$ BEGIN RAISE EXCEPTION 'could not resize shared memory segment \"/PostgreSQL.1\" "
            "to 8388608 bytes: No space left on device' USING ERRCODE = 'disk_full'; END $$"
        ))  # fmt: skip
    assert not database.is_transient_db_error(shm.value) and service_error(shm.value) is None


def _limits(conn) -> dict[str, str]:
    return dict(conn.execute(text(
        "SELECT name, setting FROM pg_settings WHERE name = ANY(:names)"
    ), {"names": list(database.SESSION_SETTINGS)}).all())  # fmt: skip


def test_a_sites_session_limits_do_not_reach_rollscans_sessions(db_engine, make_database):
    """A DBA's statement_timeout, idle_in_transaction_session_timeout, idle_session_timeout or
    transaction_timeout on the database: under them a finalize failed its roll for good (a
    statement timeout), one reading a long roll inside its transaction was killed at every try,
    and a delivery's advisory lock went with its idle connection. rollscan's sessions turn them
    off — not those its own URL asks for, nor a read-only role's (the quality engineers')."""
    url = make_database()
    with db_engine.connect() as conn:
        names = list(_limits(conn))  # those this server has (transaction_timeout: 17+)
    assert {"statement_timeout", "idle_in_transaction_session_timeout"} <= set(names)
    for name in names:
        alter_database(db_engine, url, f"SET {name} = '100ms'")
    site = psycopg2.connect(make_url(url).render_as_string(False).replace("+psycopg2", ""))
    with site.cursor() as cursor:  # what any other session of this database gets
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone() == ("100ms",)
    site.close()
    engine = database.make_engine(url)
    try:
        with engine.connect() as conn:
            assert _limits(conn) == dict.fromkeys(names, "0")
            conn.execute(text("SELECT pg_sleep(0.3)"))  # longer than the statement timeout
            time.sleep(0.3)  # idle in its transaction, then idle, longer than the limits
            conn.commit()
            time.sleep(0.3)
            assert conn.scalar(text("SELECT 1")) == 1
    finally:
        engine.dispose()

    asked = make_url(url).update_query_dict({"options": "-c statement_timeout=60s"})
    engine = database.make_engine(asked.render_as_string(False))
    try:
        with engine.connect() as conn:
            assert _limits(conn)["statement_timeout"] == "60000"  # ms
    finally:
        engine.dispose()

    reader = f"reader_{make_url(url).database}"[:63]
    with db_engine.connect() as conn:
        admin = conn.execution_options(isolation_level="AUTOCOMMIT")
        admin.execute(text(f'CREATE ROLE "{reader}" LOGIN'))
        admin.execute(text(f'ALTER ROLE "{reader}" IN DATABASE "{make_url(url).database}" '
                           "SET default_transaction_read_only = on"))  # fmt: skip
    engine = database.make_engine(make_url(url).set(username=reader).render_as_string(False))
    try:
        with engine.connect() as conn:
            assert _limits(conn)["statement_timeout"] == "100"  # the database's, kept
    finally:
        engine.dispose()
        with db_engine.connect() as conn:
            admin = conn.execution_options(isolation_level="AUTOCOMMIT")
            admin.execute(text(f'ALTER ROLE "{reader}" IN DATABASE "{make_url(url).database}" '
                               "RESET ALL"))  # fmt: skip
            admin.execute(text(f'DROP ROLE "{reader}"'))


def test_a_read_only_server_and_a_cancelled_query_are_transient(db_engine, make_database):
    """After a failover a worker may reach a standby (SQLSTATE 25006), and an administrator
    may cancel a query (57014): retried, where each failed its roll for good."""
    url = make_database()
    alter_database(db_engine, url, "SET default_transaction_read_only = on")
    engine = database.make_engine(url)
    try:
        with engine.connect() as conn, pytest.raises(InternalError) as read_only:
            conn.execute(text("CREATE TABLE t (x int)"))
        assert read_only.value.orig.pgcode == "25006"
        assert database.is_transient_db_error(read_only.value)

        with engine.connect() as conn:
            pid = conn.scalar(text("SELECT pg_backend_pid()"))
            cancel = threading.Timer(0.5, _cancel, (db_engine, pid))
            cancel.start()
            with pytest.raises(OperationalError) as cancelled:
                conn.execute(text("SELECT pg_sleep(30)"))
            cancel.join()
        assert cancelled.value.orig.pgcode == "57014"
        assert database.is_transient_db_error(cancelled.value)
    finally:
        engine.dispose()


def _cancel(db_engine: Engine, pid: int) -> None:
    with db_engine.connect() as conn:
        assert conn.scalar(text("SELECT pg_cancel_backend(:pid)"), {"pid": pid})
