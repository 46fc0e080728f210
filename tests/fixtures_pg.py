"""PostgreSQL fixtures: a real server, a fresh database per test session.

The server: ``ROLLSCAN_TEST_PG_ADMIN_URL`` when set (a superuser URL to any database
of the server); else the one on 127.0.0.1:5432 (trust authentication, as user
``postgres`` or the current OS user) when it answers; else an embedded server in a
temporary directory, stopped at the end.

- `pg_url` (session): a new database ``rollscan_test_<random>``, dropped at the end.
- `migrated_url` (session): the same, upgraded to head.
- `db_engine`, `db_session` (function): on the migrated database; every table is
  emptied after each test, so tests may commit.
- `make_database` (session): a factory of further empty databases, for tests that
  migrate up and down and must not disturb `migrated_url`.

Creating and dropping a database is `rollscan_testing.services`' (bench/load.py uses it too).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import URL, Engine, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from rollscan_testing.services import create_database, drop_database, postgres_answers
from storage.database import make_engine, start_embedded, stop_embedded, upgrade
from storage.schema import Base


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[URL]:
    configured = os.environ.get("ROLLSCAN_TEST_PG_ADMIN_URL")
    if configured:
        yield make_url(configured).set(drivername="postgresql+psycopg2")
        return
    for user in dict.fromkeys(["postgres", getpass.getuser()]):
        local = URL.create(
            "postgresql+psycopg2", username=user, host="127.0.0.1", port=5432, database="postgres"
        )
        if postgres_answers(local):
            yield local
            return
    data_dir = tmp_path_factory.mktemp("embedded-pg")
    server = start_embedded(data_dir)
    try:
        yield make_url(server.url_for("postgres"))
    finally:
        stop_embedded(data_dir)


@pytest.fixture(scope="session")
def make_database(pg_admin_url: URL) -> Iterator[Callable[[], str]]:
    created: list[str] = []

    def make() -> str:
        url = create_database(pg_admin_url, "rollscan_test")
        created.append(make_url(url).database)
        return url

    yield make
    for name in created:
        drop_database(pg_admin_url, name)


@pytest.fixture(scope="session")
def pg_url(make_database: Callable[[], str]) -> str:
    return make_database()


@pytest.fixture(scope="session")
def migrated_url(pg_url: str) -> str:
    upgrade(pg_url, "head")
    return pg_url


@pytest.fixture(scope="session")
def _session_engine(migrated_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_url)
    yield engine
    engine.dispose()


def empty_tables(engine: Engine, lock_timeout: str = "60s") -> None:
    """Empty every table. A connection left idle in a transaction (a test's leaked session, a
    worker not stopped) held TRUNCATE's lock wait, and the run with it, for ever: it gives up
    after a minute, naming the sessions of this database that hold it."""
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT set_config('lock_timeout', :t, true)"), {"t": lock_timeout})
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    except OperationalError as exc:
        with engine.connect() as conn:
            holders = conn.execute(text(
                "SELECT pid, application_name, state, left(query, 200) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )).all()  # fmt: skip
        raise RuntimeError(f"the tables could not be emptied; sessions: {holders}") from exc


def alter_database(engine: Engine, url: str, clause: str) -> None:
    """`ALTER DATABASE <the database of url> <clause>` (`SET x = y`, `RESET x`), through
    `engine`'s server: a site's setting, which every new session of that database meets."""
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text(f'ALTER DATABASE "{make_url(url).database}" {clause}')
        )


@pytest.fixture
def db_engine(_session_engine: Engine) -> Iterator[Engine]:
    yield _session_engine
    empty_tables(_session_engine)


@pytest.fixture
def db_session(db_engine: Engine) -> Iterator[Session]:
    session = Session(db_engine)
    try:
        yield session
    finally:
        session.rollback()
        session.close()
