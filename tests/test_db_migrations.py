"""The migrations on a real PostgreSQL: upgrade, downgrade and upgrade again round-trip, the
migrated schema matches the models (no drift), and the `rollscan db` commands. The schema's
views, constraints and error classes: test_db_schema.py.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from lock_waits import wait_for_lock_waits
from sqlalchemy import CheckConstraint, create_engine, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from cli.db_commands import add_parser as add_db_commands
from storage import database
from storage.schema import Base
from storage.sql_views import VIEWS


def _diff(url: str) -> list:
    """Alembic's comparison, plus what it leaves out: CHECK constraints (by name) and the
    predicates of partial indexes, on which one-active-model and one-current-run rest."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            diff: list = list(compare_metadata(ctx, Base.metadata))
            found = inspect(conn)
            for table in Base.metadata.sorted_tables:
                checks = {c.name for c in table.constraints if isinstance(c, CheckConstraint)}
                in_db = {c["name"] for c in found.get_check_constraints(table.name)}
                if checks != in_db:
                    diff.append(("checks", table.name, sorted(checks ^ in_db)))
                wheres = {
                    i.name: _predicate(i.dialect_options["postgresql"]["where"])
                    for i in table.indexes
                }
                in_db_wheres = {
                    i["name"]: _predicate(i.get("dialect_options", {}).get("postgresql_where"))
                    for i in found.get_indexes(table.name)
                    if "duplicates_constraint" not in i  # backs a UNIQUE constraint
                }
                if wheres != in_db_wheres:
                    diff.append(("index predicates", table.name, wheres, in_db_wheres))
            return diff
    finally:
        engine.dispose()


def _predicate(where: object) -> str | None:
    return None if where is None else str(where).replace("(", "").replace(")", "").strip()


def _relations(url: str) -> dict[str, str]:
    """Every table, view, sequence and composite type in schema public: name -> relkind."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT c.relname, c.relkind FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'S', 'c')"
                )
            )
            return dict(rows.all())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_round_trip(make_database: Callable[[], str]) -> None:
    url = make_database()
    head = database.head_revision()
    assert head == "0013"
    assert database.current_revision(url) is None

    database.upgrade(url)
    assert database.current_revision(url) == head
    made = _relations(url)
    assert {t.name for t in Base.metadata.sorted_tables} | set(VIEWS) | {"alembic_version"} <= set(
        made
    )
    assert all(made[name] == "v" for name in [*VIEWS, "roll_widths"])

    database.downgrade(url, "base")
    assert database.current_revision(url) is None
    # only Alembic's bookkeeping remains: no table, view, identity sequence or type
    assert set(_relations(url)) == {"alembic_version"}

    database.upgrade(url)
    assert database.current_revision(url) == head
    assert _diff(url) == []


def test_schema_matches_models(migrated_url: str) -> None:
    assert _diff(migrated_url) == []


# ----------------------------------------------------------------------------- cli


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="rollscan")
    sub = parser.add_subparsers(dest="command", required=True)
    add_db_commands(sub)
    args = parser.parse_args(list(argv))
    assert args.command == "db"
    return args.handler(args)


def test_0011_keeps_the_widths_and_adds_the_completion_date(
    make_database: Callable[[], str],
) -> None:
    """roll_widths, rewritten so that a join's filter reaches each roll (it aggregated every
    block of the archive first), gives the same rows; roll_grades gains completed_at."""
    url = make_database()
    database.upgrade(url, "0010")
    engine = create_engine(url)
    widths = "SELECT * FROM roll_widths ORDER BY roll_id"
    try:
        with engine.begin() as conn:
            for k, blocks in enumerate([3, 4, 0]):  # the last roll has no block measured
                conn.execute(text(
                    "INSERT INTO rolls (id, fabric_type, width_mm, px_per_mm_x, px_per_mm_y, "
                    "status, completed_at) VALUES (:id, 'denim', 100, 4, 4, 'done', "
                    "'2026-11-01 12:00+00')"
                ), {"id": f"R-{k}"})  # fmt: skip
                for b in range(blocks):
                    left = 10.0 + b * (k + 1)
                    conn.execute(text(
                        "INSERT INTO fabric_extents (roll_id, row_start, row_stop, left_px, "
                        "right_px, y0_mm, y1_mm, left_mm, right_mm, width_mm) VALUES (:r, :s, "
                        ":e, 40, 360, :y0, :y1, :l, :rt, :w)"
                    ), {"r": f"R-{k}", "s": 256 * b, "e": 256 * (b + 1), "y0": 64.0 * b,
                        "y1": 64.0 * (b + 1), "l": left, "rt": 90.0 - b, "w": 80.0 - b * k})  # fmt: skip
            before = conn.execute(text(widths)).all()
        database.upgrade(url, "0011")
        with engine.connect() as conn:
            assert conn.execute(text(widths)).all() == before
            assert [r[0] for r in before] == ["R-0", "R-1"]
            # through a join, as "last week's rolls" asks
            joined = conn.execute(text(
                "SELECT w.roll_id, w.median_width_mm FROM roll_widths w JOIN rolls r "
                "ON r.id = w.roll_id WHERE r.completed_at > '2026-10-01' ORDER BY 1"
            )).all()  # fmt: skip
            assert joined == [(r.roll_id, r.median_width_mm) for r in before]
            done = conn.execute(text("SELECT completed_at FROM roll_grades WHERE roll_id = 'R-2'"))
            assert done.scalar_one().isoformat().startswith("2026-11-01")
        database.downgrade(url, "0010")
        with engine.connect() as conn:
            assert conn.execute(text(widths)).all() == before
            columns = conn.execute(text("SELECT * FROM roll_grades LIMIT 0")).keys()
            assert "completed_at" not in columns
    finally:
        engine.dispose()


def test_0013_keeps_the_widths_and_counts_blocks_without_fabric(
    make_database: Callable[[], str],
) -> None:
    """A block where no fabric was seen is stored with an empty extent (the checks refused one):
    the widths stay the fabric's, `unseen_mm` counts the block's length and the fabric's rows
    beside it that finalize masks (within the roll); a downgrade drops it."""
    url = make_database()
    database.upgrade(url, "0012")
    engine = create_engine(url)
    widths = "SELECT * FROM roll_widths ORDER BY roll_id"
    block = (
        "INSERT INTO fabric_extents (roll_id, row_start, row_stop, left_px, right_px, y0_mm, "
        "y1_mm, left_mm, right_mm, width_mm) VALUES ('R-1', :s, :s + 256, :l, :r, :s / 4.0, "
        "(:s + 256) / 4.0, :l / 4.0, :r / 4.0, (:r - :l) / 4.0)"
    )
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO rolls (id, fabric_type, width_mm, px_per_mm_x, px_per_mm_y, status, "
                "rows_ingested) VALUES ('R-1', 'denim', 100, 4, 4, 'done', 1024)"
            ))  # fmt: skip
            for k, (left, right) in enumerate([(40, 360), (48, 352), (40, 344)]):
                conn.execute(text(block), {"s": 256 * k, "l": left, "r": right})
            before = conn.execute(text(widths)).all()
            with pytest.raises(sa_exc.IntegrityError, match="columns_ordered"), conn.begin_nested():
                conn.execute(text(block), {"s": 768, "l": 0, "r": 0})
        database.upgrade(url, "0013")
        with engine.begin() as conn:
            assert [tuple(r)[:-1] for r in conn.execute(text(widths))] == before
            assert conn.execute(text("SELECT unseen_mm FROM roll_widths")).scalar() == 0
            conn.execute(text(block), {"s": 768, "l": 0, "r": 0})
            after = conn.execute(text(widths)).one()
        assert tuple(after)[:-1] == (*before[0][:3], 4, *before[0][4:])
        assert after.unseen_mm == 80.0  # rows 768–1024, and the 64 rows before them
        database.downgrade(url, "0012")
        with engine.connect() as conn:
            assert conn.execute(text(widths)).all() == before
    finally:
        engine.dispose()


def test_cli_db_commands(
    make_database: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = make_database()
    monkeypatch.delenv("ROLLSCAN_CONFIG", raising=False)
    monkeypatch.setenv("ROLLSCAN_DATABASE_URL", url)
    assert _cli("db", "current") == 0
    assert "none" in capsys.readouterr().out
    assert _cli("db", "upgrade") == 0
    assert _cli("db", "current") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0013 (head)"
    with pytest.raises(ValueError, match="db downgrade"):
        _cli("db", "downgrade", "no-such-revision")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO rolls (id, fabric_type, width_mm, px_per_mm_x, px_per_mm_y) "
            "VALUES ('R-1', 'denim', 1600, 4, 4)"
        ))  # fmt: skip
    engine.dispose()
    # a downgrade drops data with the columns and tables it reverts: not without --yes
    with pytest.raises(ValueError, match=r"holds 1 roll.*pg_dump.*--yes"):
        _cli("db", "downgrade", "base")
    assert database.current_revision(url) == database.head_revision()
    assert _cli("db", "downgrade", "base", "--yes") == 0
    assert database.current_revision(url) is None
    engine = create_engine(url)
    try:
        assert inspect(engine).get_table_names() == ["alembic_version"]
    finally:
        engine.dispose()
    # for psql: a libpq URL (no "+psycopg2", the password), which libpq itself connects with
    assert _cli("db", "url", "--libpq") == 0
    libpq = capsys.readouterr().out.splitlines()[-1]
    assert libpq.startswith("postgresql://")
    import psycopg2

    with psycopg2.connect(libpq) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        assert cursor.fetchone()[0] == make_url(url).database

    monkeypatch.setenv(
        "ROLLSCAN_DATABASE_URL", "postgresql://scanner:s3cret-pw@127.0.0.1:1/rollscan"
    )
    assert _cli("db", "url") == 0
    out = capsys.readouterr().out
    assert "s3cret-pw" not in out and "scanner:***@127.0.0.1:1" in out
    with pytest.raises(ValueError, match=r"cannot reach .*\*\*\*") as caught:
        _cli("db", "current")
    assert "s3cret-pw" not in str(caught.value)


def test_an_upgrade_that_waits_for_a_table_gives_up_naming_who_holds_it(
    make_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quality engineer's open transaction on `runs`: the upgrade waited for ever, and every
    query on `runs` queued behind it. It gives up, names the session, and changes nothing."""
    import psycopg2

    url = make_database()
    database.upgrade(url, "0007")  # 0008 alters `runs`
    monkeypatch.delenv("ROLLSCAN_CONFIG", raising=False)
    monkeypatch.setenv("ROLLSCAN_DATABASE_URL", url)
    libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    reader = psycopg2.connect(libpq, application_name="psql of quality")
    try:
        with reader.cursor() as cursor:  # a transaction left open after a read
            cursor.execute("SELECT count(*) FROM runs")
        with pytest.raises(ValueError, match="db upgrade: gave up waiting") as caught:
            _cli("db", "upgrade")
    finally:
        reader.close()
    assert "(psql of quality, idle in transaction)" in str(caught.value)
    assert "nothing was changed (revision 0007)" in str(caught.value)
    assert database.current_revision(url) == "0007"
    assert _cli("db", "upgrade") == 0  # once it is closed


def test_an_upgrade_chosen_as_a_deadlocks_victim_runs_again(
    make_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finalize of the running release deletes a grade, then updates its roll, while 0010
    locks `rolls`, then `grades`: PostgreSQL undid the migration (`deadlock detected`, exit 3),
    and the site's `migrate` failed with every service behind it. It runs again."""
    import psycopg2

    url = make_database()
    database.upgrade(url, "0009")
    monkeypatch.delenv("ROLLSCAN_CONFIG", raising=False)
    monkeypatch.setenv("ROLLSCAN_DATABASE_URL", url)
    libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    finalize = psycopg2.connect(libpq, application_name="finalize of the running release")
    engine = create_engine(url)
    done: list[object] = []

    def run_upgrade() -> None:
        try:
            done.append(_cli("db", "upgrade", "--revision", "0010"))
        except BaseException as exc:  # what the test reports, not the thread's traceback
            done.append(exc)

    try:
        with finalize.cursor() as cursor:
            # the deadlock is found by the upgrade's session (1 s), never by this one
            cursor.execute("SET deadlock_timeout = '60s'")
            cursor.execute("DELETE FROM grades WHERE false")  # the grade's table, held
            upgrading = threading.Thread(target=run_upgrade)
            upgrading.start()
            wait_for_lock_waits(engine, unless=upgrading)  # 0010 holds `rolls`, waits for `grades`
            cursor.execute("UPDATE rolls SET status = status WHERE false")  # waits for 0010
        finalize.rollback()
        upgrading.join(timeout=120)
    finally:
        finalize.close()
        engine.dispose()
    assert done == [0]
    assert database.current_revision(url) == "0010"


def test_a_migration_that_fails_says_so_in_one_line_and_changes_nothing(
    make_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mill's own view over `current_defects`, which 0002 replaces: a 90-line traceback that
    never said the database was left as it was."""
    url = make_database()
    database.upgrade(url, "0001")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE VIEW mill_defects AS SELECT roll_id FROM current_defects"))
    finally:
        engine.dispose()
    monkeypatch.delenv("ROLLSCAN_CONFIG", raising=False)
    monkeypatch.setenv("ROLLSCAN_DATABASE_URL", url)
    with pytest.raises(ValueError, match=r"^db upgrade: .*nothing was changed \(revision 0001\)$"):
        _cli("db", "upgrade")
    assert database.current_revision(url) == "0001"
