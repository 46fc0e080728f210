"""What a command needs to reach the system: the worker context, or a database session.

Both bring the embedded database's schema up to date first (an embedded server is this
machine's own, so the command line migrates it; a configured server is migrated by
`rollscan db upgrade`, or the deployment's `migrate` service).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from storage.database import database_url, make_engine, session_scope, upgrade
from storage.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.context import WorkerContext


def upgrade_embedded(settings: Settings) -> None:
    """Migrate the embedded database to head; a configured server is left alone."""
    if settings.embedded_database:
        upgrade(database_url(settings))


def command_context(*, upgrade_database: bool = True) -> WorkerContext:
    """The process's worker context, its work sent through Celery (to the broker, or run in
    this process when none is configured: the commands that take a context send work), the
    embedded database migrated first unless told not to."""
    from worker.tasks import context

    ctx = context()
    if upgrade_database:
        upgrade_embedded(ctx.settings)
    return ctx


@contextmanager
def command_session(
    settings: Settings | None = None, *, upgrade_database: bool = True
) -> Iterator[Session]:
    """A session that commits at the end of the block, on an engine disposed after it."""
    settings = settings if settings is not None else get_settings()
    if upgrade_database:
        upgrade_embedded(settings)
    engine = make_engine(settings)
    try:
        with session_scope(engine) as session:
            yield session
    finally:
        engine.dispose()
