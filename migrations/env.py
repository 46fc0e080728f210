"""Alembic environment. The configuration is built in code by `storage.database`
(`alembic_config(url)`), which passes the URL in ``config.attributes["url"]``; an
existing connection may be passed in ``config.attributes["connection"]`` instead."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from storage.database import make_engine
from storage.schema import Base

config = context.config
target_metadata = Base.metadata

# Any fixed number: two processes running `upgrade` at once (two workers starting,
# a deploy and a CLI) take turns instead of both applying the same revision.
MIGRATION_LOCK_ID = 0x726F6C6C7363616E & 0x7FFFFFFFFFFFFFFF  # "rollscan"
# A migration waiting for a table another session holds (a quality engineer's open psql
# transaction, a worker) waited for ever, and every query on that table queued behind it: the
# site stopped. It gives up instead, nothing changed (`rollscan db upgrade` names the sessions).
LOCK_TIMEOUT = "15s"


def _url() -> object:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: build the config with storage.database.alembic_config")
    return url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        # transaction-scoped: released at commit; taken before Alembic reads the version
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    # the workers' connection settings: a server that accepts and never answers held
    # `rollscan db upgrade` (and the site's `migrate`) for ever, silent
    engine = make_engine(_url(), poolclass=NullPool)  # type: ignore[arg-type]
    try:
        with engine.connect() as conn:
            _configure(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
