"""What a command needs to reach the system: the worker context, or a database session.

Both bring the embedded database's schema up to date first (an embedded server is this
machine's own, so the command line migrates it; a configured server is migrated by
`rollscan db upgrade`, or the deployment's `migrate` service, and a command refuses to run
against one at another revision: it would fail half-way on a missing table or column).

`service_error` names the service behind an error when one is down, unreachable or refuses the
site's settings, so that the command line says so in one line instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import psycopg2.errorcodes as pgcodes

from storage.database import (
    check_schema_at_head,
    current_revision,
    database_url,
    is_transient_db_error,
    make_engine,
    server_disk_full,
    session_scope,
    upgrade,
)
from storage.objectstore import DISK_FULL_ERRNOS, error_code, is_transient_store_error
from storage.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.context import WorkerContext


def prepare_database(
    settings: Settings, *, migrate: bool = True, migrate_blank: bool = False
) -> None:
    """Migrate the embedded database to head (unless not to `migrate`: a dry run) — a blank
    configured one too with `migrate_blank` (the demo's); check that any other is at head."""
    url = database_url(settings)
    if (settings.embedded_database and migrate) or (
        migrate_blank and current_revision(url) is None
    ):
        upgrade(url)
        return
    check_schema_at_head(url)  # SchemaNotAtHead, a ValueError: one line, exit 2


# a connection the server refused or that never began: psycopg2's words for it
_CONNECT_FAILED = ("connection to server", "could not translate host name", "fatal:")


def service_error(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) when `exc` comes from a service — the database, the broker, the
    object store — that is down or unreachable (3: try again later) or refuses this site's
    settings (2: a host, database, credentials or bucket to correct); None otherwise."""
    found = _service_problem(exc)
    if found is None:
        return None
    message, code = found
    if isinstance(exc, ValueError):  # already a readable message that says what failed
        message = _first_line(exc)
    return message, code


def _service_problem(exc: BaseException) -> tuple[str, int] | None:
    full = next((i for i in _chain(exc) if _disk_full(i)), None)
    if full is not None:  # transient too, but no service is down: a disk is full
        full = getattr(full, "orig", None) or full  # psycopg2's own words, under SQLAlchemy's
        where = "the database's disk" if getattr(full, "pgcode", None) else "the disk"
        return (f"{where} is full: {_first_line(full)}; free space and run it again (a roll's "
                "outstanding work: `rollscan resume`)"), 3  # fmt: skip
    if is_transient_db_error(exc):
        root = _root(exc)
        code = getattr(root, "pgcode", None)
        if code == pgcodes.READ_ONLY_SQL_TRANSACTION:
            return (f"the database is read-only (a standby?): {_first_line(root)}; connect to "
                    "the primary (several hosts: target_session_attrs=read-write)"), 3  # fmt: skip
        if code == pgcodes.QUERY_CANCELED:
            return f"the database cancelled a query: {_first_line(root)}; run it again", 3
        return f"cannot reach the database: {_first_line(root)}", 3
    for item in _chain(exc):
        name, module = type(item).__name__, type(item).__module__
        if name == "OperationalError" and module.startswith(("psycopg2", "sqlalchemy")):
            reason = _first_line(getattr(item, "orig", None) or item)
            if reason.lower().startswith(_CONNECT_FAILED):
                return f"cannot connect to the database: {reason}", 2
        if module.startswith("kombu") and name == "OperationalError":
            return _broker_problem(item), 3
        if module.startswith("amqp") and name in ("AccessRefused", "NotAllowed"):
            return f"the broker refused the connection: {_first_line(item)}", 2
    if is_transient_store_error(exc):
        return f"cannot reach the object store: {_first_line(_root(exc))}", 3
    for item in _chain(exc):
        if _store_refusal(item):
            return f"the object store refused: {_first_line(item)}", 2
    return None


def _broker_problem(item: BaseException) -> str:
    """Why a publish failed: RabbitMQ blocking publishers (its resource alarm) was said as
    "cannot reach the broker: timed out", and an operator looked for a network fault."""
    from worker.broker_options import PRODUCER_TIMEOUT_S, gave_up_while_blocked

    if gave_up_while_blocked():
        return (f"the broker takes no work: it blocks publishing and did not confirm a message "
                f"within {PRODUCER_TIMEOUT_S:.0f} s — a RabbitMQ resource alarm (low memory or "
                "disk: `rabbitmq-diagnostics check_alarms`); what was not sent goes out once it "
                "clears (the scheduler, or `rollscan resume`)")  # fmt: skip
    # kombu's own text may be empty ("cannot reach the broker: "): its cause's says what failed
    said = next((i for i in _chain(item) if str(i).strip()), item)
    return f"cannot reach the broker: {_first_line(said)}"


def _disk_full(item: BaseException) -> bool:
    """A full disk or quota here (ENOSPC, EDQUOT), or PostgreSQL's (SQLSTATE 53100)."""
    if isinstance(item, OSError):
        return item.errno in DISK_FULL_ERRNOS
    return server_disk_full(getattr(item, "orig", None) or item)


_STORE_REFUSALS = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_STORE_REFUSALS |= {"403", "Forbidden"}  # a HEAD refused: no body, no code of its own


def _store_refusal(item: BaseException) -> bool:
    """botocore's and obstore's (the zarr path's) words for a bucket or credentials refused, or
    credentials missing (an endpoint set without its keys); s3fs's PermissionError has
    botocore's refusal as its cause (a PermissionError alone may be a local file's: --out)."""
    name, module = type(item).__name__, type(item).__module__
    if module.startswith("obstore"):
        return name in ("PermissionDeniedError", "UnauthenticatedError")
    if module.startswith("botocore"):
        return error_code(item) in _STORE_REFUSALS or name in (
            "NoCredentialsError",
            "PartialCredentialsError",
        )
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes and contexts, outermost first."""
    seen: list[BaseException] = []
    item: BaseException | None = exc
    while item is not None and all(item is not s for s in seen) and len(seen) < 10:
        seen.append(item)
        item = item.__cause__ or item.__context__
    return seen


def _root(exc: BaseException) -> BaseException:
    """The innermost cause: the service's own words (a wrapper's are often a traceback's)."""
    item = _chain(exc)[-1]
    return getattr(item, "orig", None) or item


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def command_context(*, upgrade_database: bool = True) -> WorkerContext:
    """The process's worker context, its work sent through Celery (to the broker, or run in
    this process when none is configured: the commands that take a context send work), the
    database made ready first (`prepare_database`) unless told not to."""
    from worker.app import app
    from worker.broker_options import use_as_producer
    from worker.tasks import context

    settings = get_settings()
    if upgrade_database:  # first: the context refuses a schema not at head
        prepare_database(settings)
    use_as_producer(app, settings)  # a command consumes nothing: its publishes are bounded
    return context()


@contextmanager
def command_session(
    settings: Settings | None = None, *, upgrade_database: bool = True
) -> Iterator[Session]:
    """A session that commits at the end of the block, on an engine disposed after it."""
    settings = settings if settings is not None else get_settings()
    if upgrade_database:
        prepare_database(settings)
    engine = make_engine(settings)
    try:
        with session_scope(engine) as session:
            yield session
    finally:
        engine.dispose()
