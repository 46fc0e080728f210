"""Connections, sessions, migrations and error classification for PostgreSQL.

`database_url(settings)` is the one place that decides which server: the configured
``ROLLSCAN_DATABASE_URL``, else the embedded server of ``settings.data_dir`` (started on
demand, see `storage.embedded_pg`). Alembic runs from code: the `Config` is built here
with ``script_location`` = the installed `migrations` package, so no alembic.ini is needed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errorcodes as pgcodes
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from storage.embedded_pg import EmbeddedServer, start_embedded, stop_embedded
from storage.settings import Settings, get_settings

__all__ = [
    "EmbeddedServer",
    "alembic_config",
    "current_revision",
    "database_url",
    "downgrade",
    "head_revision",
    "is_transient_db_error",
    "known_revision",
    "make_engine",
    "mask_url",
    "roll_count",
    "session_scope",
    "start_embedded",
    "stop_embedded",
    "upgrade",
]

DRIVER = "postgresql+psycopg2"


def database_url(settings: Settings | None = None) -> str:
    """The SQLAlchemy URL to use, password included: reveal it only at the point of use."""
    settings = settings if settings is not None else get_settings()
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return start_embedded(settings).url


def _normalise(url: str | URL) -> URL:
    """The URL on the psycopg2 driver; `postgres://` and `postgresql://` are accepted,
    other backends and drivers refused (without loading them)."""
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in ("postgresql", "postgres"):
        raise ValueError(f"rollscan needs PostgreSQL, not {backend!r}")
    if driver not in ("", "psycopg2"):
        raise ValueError(f"rollscan uses the psycopg2 driver, not {driver!r}: write {DRIVER}://…")
    return parsed.set(drivername=DRIVER)


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ***, for display and logs."""
    return make_url(url).render_as_string(hide_password=True)


# a server that accepts and never answers held a command (or a worker) for ever: libpq's own
# limit on establishing a connection, in seconds; a connection up is not limited by it
CONNECT_TIMEOUT_S = 10
# a connection up whose server went silent (a partition, a frozen VM) held its worker until the
# broker's own timeout (24 h): TCP keepalives give it up after about 60 s of silence, and
# unacknowledged data after 60 s — a long query that is answering is not limited
CONNECT_ARGS = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}  # fmt: skip


# A site's limits on its sessions (postgresql.conf, ALTER DATABASE/ROLE … SET), which rollscan's
# own turn off: finalize reads a whole roll inside its transaction (idle in it meanwhile), the
# delivery and discovery advisory locks live on connections idle while a band is scored, and a
# migration or a nightly grading may take minutes. Under them a roll failed for good (a
# statement timeout), or a finalize was killed at every try (an idle-in-transaction or
# transaction timeout), or a live delivery lost its lock. Set on each new connection, for the
# settings this server has (idle_session_timeout: PostgreSQL 14+, transaction_timeout: 17+);
# left as they are where rollscan's own URL asks for them (`options=-c …`: source "client") and
# on a role made read-only (the quality engineers' reader: `reader_role`, its limits kept).
SESSION_SETTINGS = ("statement_timeout", "idle_in_transaction_session_timeout",
                    "idle_session_timeout", "transaction_timeout")  # fmt: skip
_LIFT_SESSION_LIMITS = """
SELECT set_config(s.name, '0', false) FROM pg_settings s
WHERE s.name = ANY(%s) AND s.source <> 'client' AND NOT EXISTS (
    SELECT FROM pg_settings r WHERE r.name = 'default_transaction_read_only'
    AND r.setting = 'on' AND r.source IN ('user', 'database user'))
"""


def _turn_off_session_limits(dbapi_connection: Any, _record: Any) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute(_LIFT_SESSION_LIMITS, (list(SESSION_SETTINGS),))
    dbapi_connection.commit()


def make_engine(settings_or_url: Settings | str | URL | None = None, **kwargs: object) -> Engine:
    """An engine on the psycopg2 driver. `pool_pre_ping` because the server may restart
    under a long-lived worker; its sessions free of the site's timeouts (`SESSION_SETTINGS`);
    extra keyword arguments go to `create_engine`."""
    if settings_or_url is None or isinstance(settings_or_url, Settings):
        url: str | URL = database_url(settings_or_url)
    else:
        url = settings_or_url
    kwargs.setdefault("pool_pre_ping", True)
    url = _normalise(url)
    connect_args = dict(CONNECT_ARGS)
    if "application_name" not in make_url(url).query:  # the site's own name, when it gives one
        # named by process: `rollscan db stop` tells which processes still use the embedded server
        connect_args["application_name"] = f"rollscan pid {os.getpid()}"
    kwargs.setdefault("connect_args", connect_args)
    engine = create_engine(url, **kwargs)  # type: ignore[arg-type]
    event.listen(engine, "connect", _turn_off_session_limits)
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back when it raises."""
    session = Session(engine, expire_on_commit=False)  # rows stay readable after commit
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# ----------------------------------------------------------------------------- alembic


@contextmanager
def advisory_lock(engine: Engine, key: int) -> Iterator[bool]:
    """Try a session-level advisory lock on `key` (a signed 64-bit integer) on a connection of
    its own, held until the block ends; yields whether it was taken. A process that dies closes
    its connection, and PostgreSQL frees the lock with it."""
    with engine.connect() as lock:
        held = bool(lock.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}))
        lock.commit()  # the lock outlives the transaction; the connection must not sit in one
        try:
            yield held
        finally:
            if held:
                try:
                    lock.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    lock.commit()
                except Exception:  # the database is away: closing the connection frees it
                    lock.invalidate()


def _migrations_dir() -> Path:
    spec = importlib.util.find_spec("migrations")
    if spec is None or spec.origin is None:
        raise RuntimeError("the `migrations` package is not installed alongside `storage`")
    return Path(spec.origin).resolve().parent


def alembic_config(url: str | URL) -> Config:
    """Alembic configuration built in code. The URL travels in `attributes`, not in the
    ini options, where configparser would choke on the '%' of an escaped password."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.attributes["url"] = _normalise(url)
    return cfg


MIGRATION_ATTEMPTS = 3


def upgrade(url: str | URL, revision: str = "head") -> None:
    _migrate(command.upgrade, url, revision)


def downgrade(url: str | URL, revision: str) -> None:
    _migrate(command.downgrade, url, revision)


def _migrate(step: Any, url: str | URL, revision: str) -> None:
    """Run an Alembic step, again (at most `MIGRATION_ATTEMPTS` times in all) when PostgreSQL
    chose it as a deadlock's victim: a worker of the running release writing the tables the
    migration locks, in another order (a finalize deletes a grade, then updates its roll). The
    victim's transaction is undone whole, so running it again is safe; the site's `migrate`
    failed instead, and with it the start of every service behind it."""
    for attempt in range(1, MIGRATION_ATTEMPTS + 1):
        try:
            step(alembic_config(url), revision)
            return
        except sa_exc.DBAPIError as exc:
            deadlock = getattr(exc.orig, "pgcode", None) == pgcodes.DEADLOCK_DETECTED
            if not deadlock or attempt == MIGRATION_ATTEMPTS:
                raise
            logging.getLogger(__name__).warning(
                "the migration deadlocked with another session's writes and was undone; "
                "running it again (attempt %d of %d)", attempt + 1, MIGRATION_ATTEMPTS,
            )  # fmt: skip
            time.sleep(attempt)


@contextmanager
def one_connection(url: str | URL) -> Iterator[Connection]:
    """A connection of its own, closed after: the schema and admin commands' questions, asked
    before (or without) any engine of the process."""
    engine = create_engine(
        _normalise(url), poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}
    )
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def roll_count(url: str | URL) -> int:
    """How many rolls the database holds (0 before the schema exists): what a downgrade would
    take data from."""
    with one_connection(url) as conn:
        if conn.execute(text("SELECT to_regclass('rolls')")).scalar() is None:
            return 0
        return int(conn.execute(text("SELECT count(*) FROM rolls")).scalar_one())


def current_revision(url: str | URL) -> str | None:
    """The database's revision; None for an empty (never migrated) database."""
    log = logging.getLogger("alembic.runtime.migration")
    level = log.level
    log.setLevel(logging.WARNING)  # its "Context impl …" lines, on every command's check
    try:
        with one_connection(url) as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        log.setLevel(level)


def other_sessions(url: str | URL) -> list[str]:
    """The other sessions on the database, "pid N (name, state)": who holds what a migration
    waits for."""
    with one_connection(url) as conn:
        rows = conn.execute(text(
            "SELECT pid, coalesce(nullif(application_name, ''), usename), state "
            "FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend' ORDER BY pid"
        ))  # fmt: skip
        return [f"pid {pid} ({name}, {state})" for pid, name, state in rows]


def known_revision(revision: str) -> bool:
    """Whether this rollscan's migrations hold `revision` (a newer rollscan's do not)."""
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    try:
        script = ScriptDirectory.from_config(alembic_config(f"{DRIVER}://"))
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(f"{DRIVER}://")).get_current_head()


# ----------------------------------------------------------------------------- errors

# Worth retrying: the server is away, restarting or overloaded, or the transaction lost
# a race. Everything else (constraint violations, syntax, permissions) fails the same
# way the second time.
TRANSIENT_PGCODES = frozenset(
    {
        pgcodes.CONNECTION_EXCEPTION,  # 08000
        pgcodes.CONNECTION_DOES_NOT_EXIST,  # 08003
        pgcodes.CONNECTION_FAILURE,  # 08006
        pgcodes.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,  # 08001
        pgcodes.SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,  # 08004
        pgcodes.ADMIN_SHUTDOWN,  # 57P01 (restart, pg_terminate_backend)
        pgcodes.CRASH_SHUTDOWN,  # 57P02
        pgcodes.CANNOT_CONNECT_NOW,  # 57P03 (starting up, recovery)
        pgcodes.TOO_MANY_CONNECTIONS,  # 53300
        pgcodes.SERIALIZATION_FAILURE,  # 40001
        pgcodes.DEADLOCK_DETECTED,  # 40P01
        pgcodes.LOCK_NOT_AVAILABLE,  # 55P03
        # a standby reached after a failover, or a server set read-only when its storage
        # fills: the write succeeds once the primary is back (it failed the roll for good)
        pgcodes.READ_ONLY_SQL_TRANSACTION,  # 25006
        # a query cancelled by an administrator (pg_cancel_backend): rollscan's sessions set no
        # statement_timeout (`SESSION_SETTINGS`), so no query of its own ends here each time
        pgcodes.QUERY_CANCELED,  # 57014
    }
)

# libpq reports connection trouble without a SQLSTATE; recognise it by its words.
TRANSIENT_MESSAGES = (
    "connection refused",
    "could not connect to server",
    "server closed the connection unexpectedly",
    "terminating connection",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "connection timed out",
    "timeout expired",
    "connection already closed",
    "ssl connection has been closed unexpectedly",
    "could not receive data from server",
    "could not send data to server",
    "no connection to the server",
    "temporary failure in name resolution",
)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [getattr(item, "orig", None), item.__cause__, item.__context__]


class SchemaNotAtHead(ValueError):
    """The database's schema is not the one this code needs: a command refuses (exit 2); a
    worker started before `rollscan db upgrade` retries its tasks until it is done
    (`worker.transient_errors`)."""


def check_schema_at_head(url: str | URL) -> None:
    """SchemaNotAtHead unless the database is at this code's head revision (the commands' check
    and the workers')."""
    current, head = current_revision(url), head_revision()
    if current == head:
        return
    where = f"the database {mask_url(url)} is at schema revision {current or 'none (empty)'}"
    if current is not None and not known_revision(current):
        raise SchemaNotAtHead(
            f"{where}, newer than this rollscan's ({head}): upgrade rollscan — or, to go back "
            f"to this release, downgrade the database with the newer one first (`rollscan db "
            f"downgrade {head} --yes`, after a pg_dump)"
        )
    raise SchemaNotAtHead(
        f"{where}; this rollscan needs revision {head}: run `rollscan db upgrade`"
    )


def is_lock_timeout(exc: BaseException) -> bool:
    """A statement that gave up waiting for a lock (`lock_timeout`), through any wrapper."""
    return any(
        getattr(item, "pgcode", None) == pgcodes.LOCK_NOT_AVAILABLE
        for item in _causes(exc)
        if isinstance(item, psycopg2.Error)
    )


def server_disk_full(item: BaseException) -> bool:
    """PostgreSQL's disk full (SQLSTATE 53100), not its shared memory: the same code for a
    small /dev/shm, where the same big query fails each time."""
    return getattr(item, "pgcode", None) == pgcodes.DISK_FULL and "shared memory" not in str(item)


def is_transient_db_error(exc: BaseException) -> bool:
    """True for database errors a retry may cure: connection lost or refused, server
    restarting, serialization failure or deadlock. Looks through SQLAlchemy wrappers and
    exception chains (a task may wrap the error in its own)."""
    for item in _causes(exc):
        if isinstance(item, sa_exc.DBAPIError) and item.connection_invalidated:
            return True
        if isinstance(item, sa_exc.DisconnectionError):
            return True
        if isinstance(item, psycopg2.Error):
            code = getattr(item, "pgcode", None)
            if code in TRANSIENT_PGCODES:
                return True
            if server_disk_full(item):  # the roll waits for space freed, as for a local disk
                return True
            if code is None and isinstance(
                item, psycopg2.OperationalError | psycopg2.InterfaceError
            ):
                message = str(item).lower()
                if any(words in message for words in TRANSIENT_MESSAGES):
                    return True
    return False
