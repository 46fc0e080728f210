"""What a command needs to reach the system: the worker context, or a database session.

Both bring the embedded database's schema up to date first (an embedded server is this
machine's own, so the command line migrates it; a configured server is migrated by
`rollscan db upgrade`, or the deployment's `migrate` service, and a command refuses to run
against one at another revision: it would fail half-way on a missing table or column).

`unreachable_service` names the service behind an error when one is down or unreachable, so
that the command line says so in one line instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from storage.database import (
    current_revision,
    database_url,
    head_revision,
    is_transient_db_error,
    make_engine,
    mask_url,
    session_scope,
    upgrade,
)
from storage.objectstore import is_transient_store_error
from storage.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.context import WorkerContext


def prepare_database(settings: Settings) -> None:
    """Migrate the embedded database to head; check that a configured server is at head."""
    url = database_url(settings)
    if settings.embedded_database:
        upgrade(url)
        return
    current, head = current_revision(url), head_revision()
    if current != head:
        raise ValueError(
            f"the database {mask_url(url)} is at schema revision {current or 'none (empty)'}; "
            f"this rollscan needs revision {head}: run `rollscan db upgrade` (if the database "
            "is newer, upgrade rollscan instead)"
        )


def unreachable_service(exc: BaseException) -> str | None:
    """The one-line reason when `exc` says a service is down or unreachable, else None."""
    if is_transient_db_error(exc):
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return f"cannot reach the database: {reason[0] if reason else type(exc).__name__}"
    if type(exc).__module__.startswith("kombu") and type(exc).__name__ == "OperationalError":
        return f"cannot reach the broker: {exc}"
    if is_transient_store_error(exc):
        return f"cannot reach the object store: {exc}"
    return None


def command_context(*, upgrade_database: bool = True) -> WorkerContext:
    """The process's worker context, its work sent through Celery (to the broker, or run in
    this process when none is configured: the commands that take a context send work), the
    database made ready first (`prepare_database`) unless told not to."""
    from worker.tasks import context

    ctx = context()
    if upgrade_database:
        prepare_database(ctx.settings)
    return ctx


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
