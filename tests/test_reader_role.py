"""`rollscan db reader NAME`: a role that reads the archive and can do nothing else — a quality
engineer's psql as the application's user could delete defects, or hold a row a worker waits
for — in the site's time zone, and still reading after the views are made again by an upgrade."""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable

import psycopg2
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cli.db_commands import add_parser as add_db_commands
from storage import database


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="rollscan")
    add_db_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.handler(args)


@pytest.fixture
def site_database(make_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch):
    url = make_database()
    database.upgrade(url, "head")
    monkeypatch.delenv("ROLLSCAN_CONFIG", raising=False)
    monkeypatch.setenv("ROLLSCAN_DATABASE_URL", url)
    monkeypatch.setenv("ROLLSCAN_TIMEZONE", "Asia/Tokyo")
    name = f"reader_{secrets.token_hex(4)}"
    yield url, name
    engine = create_engine(url)  # roles are the cluster's: dropped with what they were granted
    with engine.begin() as conn:
        if conn.scalar(text("SELECT count(*) FROM pg_roles WHERE rolname = :n"), {"n": name}):
            conn.execute(text(f"DROP OWNED BY {name}"))
            conn.execute(text(f"DROP ROLE {name}"))
    engine.dispose()


def _as(url: str, role: str, password: str | None = None):
    parts = make_url(url)
    return psycopg2.connect(host=parts.host, port=parts.port, dbname=parts.database, user=role,
                            password=password)  # fmt: skip


def test_the_reader_reads_everything_and_changes_nothing(site_database, monkeypatch, capsys):
    url, name = site_database
    monkeypatch.setenv("ROLLSCAN_READER_PASSWORD", "quality-pw")
    assert _cli("db", "reader", name) == 0
    assert f"created read-only role {name}" in capsys.readouterr().out
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO rolls (id, fabric_type, width_mm, px_per_mm_x, px_per_mm_y, status, "
            "created_at) VALUES ('R-1', 'denim', 100, 4, 4, 'registered', "
            "'2026-11-26 16:30+00')"
        ))  # fmt: skip
    engine.dispose()
    reader = _as(url, name, "quality-pw")
    try:
        with reader.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM current_defects")
            assert cursor.fetchone() == (0,)
            # dates in the site's zone: 16:30 UTC is the next day in Tokyo
            cursor.execute("SELECT created_at::date::text, current_setting('TimeZone') FROM rolls")
            assert cursor.fetchone() == ("2026-11-27", "Asia/Tokyo")
            cursor.execute("SHOW idle_in_transaction_session_timeout")
            assert cursor.fetchone() == ("5min",)
        reader.rollback()
        for statement in (
            "DELETE FROM defects",
            "UPDATE rolls SET status = 'failed'",
            "SELECT * FROM rolls FOR UPDATE",  # a lock a worker would wait for
            "SET transaction_read_only = off; DELETE FROM rolls",  # read-only is not all
        ):
            with reader.cursor() as cursor, pytest.raises(psycopg2.Error) as refused:
                cursor.execute(statement)
            reader.rollback()
            assert refused.value.pgcode in ("25006", "42501"), statement  # read-only, privilege
    finally:
        reader.close()

    # migrations drop and create the views again: the reader still reads them
    database.downgrade(url, "0008")
    database.upgrade(url, "head")
    reader = _as(url, name, "quality-pw")
    try:
        with reader.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM current_defects")
            assert cursor.fetchone() == (0,)
    finally:
        reader.close()
    assert _cli("db", "reader", name) == 0  # again: brought up to date, not refused
    assert f"updated read-only role {name}" in capsys.readouterr().out


def test_a_role_that_may_do_more_is_not_made_a_reader(site_database):
    url, name = site_database
    with pytest.raises(ValueError, match=r"may do more than read .*the application's own role"):
        _cli("db", "reader", "postgres")  # the tests' application role: read-only, no site
    engine = create_engine(url)
    with engine.begin() as conn:  # made by hand, with more rights than reading
        conn.execute(text(f"CREATE ROLE {name} LOGIN"))
        conn.execute(text(f"GRANT INSERT, DELETE ON rolls TO {name}"))
        conn.execute(text(f"GRANT CREATE ON SCHEMA public TO {name}"))
    engine.dispose()
    assert _cli("db", "reader", name) == 0
    reader = _as(url, name)
    try:
        for statement in ("BEGIN READ WRITE; DELETE FROM rolls", "CREATE TABLE t (i int)"):
            with reader.cursor() as cursor, pytest.raises(psycopg2.Error) as refused:
                cursor.execute(statement)
            reader.rollback()
            assert refused.value.pgcode in ("25006", "42501"), statement
    finally:
        reader.close()
    engine = create_engine(url)
    with engine.begin() as conn:  # one that inherits another role's rights
        conn.execute(text(f"GRANT pg_write_all_data TO {name}"))
    engine.dispose()
    with pytest.raises(ValueError, match="a member of other roles"):
        _cli("db", "reader", name)
    with pytest.raises(ValueError, match="reader role 'Quality; DROP'"):
        _cli("db", "reader", "Quality; DROP")


def test_the_readers_password_reaches_the_server_hashed(site_database, monkeypatch):
    """`ALTER ROLE … PASSWORD 'clear'` is what a server logs with a failed statement, or with
    every DDL (log_statement = ddl): the password in clear was in the server's log."""
    from sqlalchemy import Engine, event

    url, name = site_database
    monkeypatch.setenv("ROLLSCAN_READER_PASSWORD", "S3CRET-reader-pw")
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        sent.append(cursor.mogrify(statement, parameters).decode())

    event.listen(Engine, "before_cursor_execute", record)
    try:
        assert _cli("db", "reader", name) == 0
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    (alter,) = [s for s in sent if "PASSWORD" in s]
    assert "S3CRET" not in "".join(sent) and "SCRAM-SHA-256$" in alter, alter
    engine = create_engine(url)
    with engine.connect() as conn:
        stored = conn.scalar(
            text("SELECT rolpassword FROM pg_authid WHERE rolname = :n"), {"n": name}
        )
    engine.dispose()
    assert stored.startswith("SCRAM-SHA-256$")


def test_db_psql_passes_the_password_in_the_environment_not_on_a_command_line(migrated_url):
    """`psql "$(rollscan db url --libpq)"`, as the README and the demo said, put the password on
    psql's command line, which any local user reads in `ps`."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("psql") is None:
        pytest.skip("no psql here")
    version = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout
    if int(version.split()[-1].split(".")[0]) < 15:
        pytest.skip(f"psql's \\getenv needs psql 15: {version.strip()}")
    url = make_url(migrated_url).set(password="S3CRETpw")  # trust auth: taken, not checked
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROLLSCAN_", "PG"))}
    env["ROLLSCAN_DATABASE_URL"] = url.render_as_string(hide_password=False)
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "db", "psql", "-At", "-c", r"\getenv pw PGPASSWORD",
         "-c", r"\echo :pw", "-c", r"\! tr '\0' ' ' < /proc/$PPID/cmdline; echo", "-c", "SELECT 7"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    password, command_line, seven = done.stdout.strip().splitlines()
    assert password == "S3CRETpw" and seven == "7"
    assert "S3CRET" not in command_line and f"@{url.host}:{url.port}/" in command_line


def test_ctrl_c_in_db_psql_cancels_the_query_and_keeps_psql(migrated_url):
    """The terminal sends Ctrl-C to rollscan and psql alike: rollscan killed psql with it."""
    import os
    import pty
    import select
    import shutil
    import signal
    import subprocess
    import sys
    import time

    if shutil.which("psql") is None:
        pytest.skip("no psql here")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROLLSCAN_", "PG"))}
    env |= {"ROLLSCAN_DATABASE_URL": migrated_url, "TERM": "dumb"}
    master, slave = pty.openpty()
    shell = subprocess.Popen([sys.executable, "-m", "cli.main", "db", "psql"], env=env,
                             stdin=slave, stdout=slave, stderr=slave, start_new_session=True)  # fmt: skip
    seen = b""

    def until(*words: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while not any(w in seen for w in words) and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 65536)
        assert any(w in seen for w in words), seen[-500:]

    try:
        until(b"=#", b"=>")  # psql's prompt (a superuser's, another role's)
        os.write(master, b"SELECT pg_sleep(60);\n")
        time.sleep(1)
        os.killpg(shell.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        until(b"canceling statement due to user request")
        assert shell.poll() is None  # still in psql
        os.write(master, b"\\q\n")
        assert shell.wait(timeout=60) == 0
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
        os.close(master)
        os.close(slave)
