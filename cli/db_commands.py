"""`rollscan db …`: schema migrations, the connection URL, stopping the embedded server.

Handlers return 0 and raise ValueError with a readable message on failure; a message never
carries the password. These commands manage the schema themselves: they do not migrate first.
"""

from __future__ import annotations

import argparse
from typing import Any

from alembic.util.exc import CommandError
from psycopg2.errorcodes import LOCK_NOT_AVAILABLE
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from storage import database
from storage.settings import Settings, get_settings


def _settings(args: argparse.Namespace) -> Settings:
    # the main CLI may have built settings already (e.g. from --config)
    settings = getattr(args, "settings", None)
    return settings if isinstance(settings, Settings) else get_settings()


def _call(url: str, action: str, func: Any, *call_args: Any) -> Any:
    try:
        return func(url, *call_args)
    except CommandError as exc:
        raise ValueError(f"db {action}: {exc}") from None
    except DBAPIError as exc:
        code = getattr(exc.orig, "pgcode", None)
        # the psycopg2 message names host and port, never the password
        reason = str(exc.orig).strip() if exc.orig is not None else str(exc)
        if isinstance(exc, OperationalError) and code is None:
            raise ValueError(
                f"db {action}: cannot reach {database.mask_url(url)}: {reason}"
            ) from None
        # a migration runs in one transaction: what failed left the schema as it was
        unchanged = f"nothing was changed (revision {database.current_revision(url) or 'none'})"
        if code == LOCK_NOT_AVAILABLE:
            others = ", ".join(database.other_sessions(url)) or "none left now"
            raise ValueError(
                f"db {action}: gave up waiting for a table other sessions hold ({others}): "
                f"stop the workers and close open sessions, then run it again; {unchanged}"
            ) from None
        raise ValueError(f"db {action}: {reason.splitlines()[0]}; {unchanged}") from None


def _upgrade(args: argparse.Namespace) -> int:
    url = database.database_url(_settings(args))
    _call(url, "upgrade", database.upgrade, args.revision)
    print(f"database at revision {_call(url, 'upgrade', database.current_revision)}")
    return 0


def _downgrade(args: argparse.Namespace) -> int:
    url = database.database_url(_settings(args))
    # a downgrade drops the columns and tables later revisions added, with their data, and
    # 'base' drops the archive: a typo must not cost a mill its defect history
    rolls = _call(url, "downgrade", database.roll_count)
    if rolls and not args.yes:
        raise ValueError(
            f"db downgrade: not done, the database holds {rolls} roll(s) and reverting to "
            f"{args.revision} drops what later revisions added, with its data"
            f"{' (every table)' if args.revision == 'base' else ''}: take a pg_dump first, "
            "then run it again with --yes"
        )
    _call(url, "downgrade", database.downgrade, args.revision)
    print(f"database at revision {_call(url, 'downgrade', database.current_revision) or 'base'}")
    return 0


def _current(args: argparse.Namespace) -> int:
    url = database.database_url(_settings(args))
    revision = _call(url, "current", database.current_revision)
    head = database.head_revision()
    if revision is None:
        print(f"none (empty database; head is {head}: run `rollscan db upgrade`)")
    elif revision == head:
        print(f"{revision} (head)")
    elif not database.known_revision(revision):
        print(f"{revision} (newer than this rollscan's head {head}: upgrade rollscan)")
    else:
        print(f"{revision} (head is {head}: run `rollscan db upgrade`)")
    return 0


def _url(args: argparse.Namespace) -> int:
    url = database.database_url(_settings(args))
    if args.libpq:  # what psql and libpq read: no "+psycopg2" driver, the real password
        print(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
    else:
        print(database.mask_url(url))
    return 0


def _psql(args: argparse.Namespace) -> int:
    """psql on the database, its password in the environment (PGPASSWORD): on psql's command
    line (`psql "$(rollscan db url --libpq)"`) any local user read it in `ps`."""
    import os
    import shutil
    import signal
    import subprocess

    psql = shutil.which("psql")
    if psql is None:
        raise ValueError("psql is not installed here (Debian: apt-get install postgresql-client)")
    url = make_url(database.database_url(_settings(args))).set(drivername="postgresql")
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    target = URL.create(
        url.drivername, url.username, None, url.host, url.port, url.database, url.query
    ).render_as_string(hide_password=False)  # set(password=None) keeps it
    # Ctrl-C is psql's (it cancels the query and keeps its prompt): ignored here while it runs,
    # as Django's dbshell does, since the terminal sends it to both
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.run([psql, target, *args.psql_args], env=env, check=False).returncode
    finally:
        signal.signal(signal.SIGINT, interrupt)


def _reader(args: argparse.Namespace) -> int:
    import os

    from storage.reader_role import grant_reader

    settings = _settings(args)
    url = database.database_url(settings)
    password = os.environ.get("ROLLSCAN_READER_PASSWORD") or None  # never on a command line

    def grant(url: str) -> bool:
        with database.one_connection(url) as conn, conn.begin():
            return grant_reader(conn, args.name, settings.timezone, password)

    created = _call(url, "reader", grant)
    print(
        f"{'created' if created else 'updated'} read-only role {args.name}: reads every table "
        f"and view, in read-only transactions, dates in {settings.timezone}"
        + ("" if password else " (no password set: ROLLSCAN_READER_PASSWORD sets one)")
    )
    return 0


def _stop(args: argparse.Namespace) -> int:
    from storage.embedded_pg import embedded_clients, stop_embedded

    settings = _settings(args)
    if not settings.embedded_database:
        raise ValueError(
            "db stop: ROLLSCAN_DATABASE_URL names a server of its own; rollscan stops only "
            "the embedded one"
        )
    # a scheduler or worker on it would lose its database, retrying against a server that
    # nothing starts again
    clients = [] if args.force else embedded_clients(settings)
    if clients:
        names = ", ".join(f"{name} ×{clients.count(name)}" for name in dict.fromkeys(clients))
        raise ValueError(
            f"db stop: not stopped, {len(clients)} connection(s) still use it ({names}): stop "
            "those processes first, or `rollscan db stop --force` (their work fails or retries)"
        )
    if stop_embedded(settings):
        print(f"stopped the embedded PostgreSQL server of {settings.data_dir}")
    else:
        print(f"no embedded PostgreSQL server of {settings.data_dir} is running")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `db upgrade | downgrade | current | url | reader | stop` to the main parser's
    subparsers."""
    db = subparsers.add_parser(
        "db",
        help="database schema migrations and connection",
        description="Manage the PostgreSQL schema (ROLLSCAN_DATABASE_URL, else the embedded server).",
    )
    commands = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)

    up = commands.add_parser("upgrade", help="apply migrations up to a revision")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(handler=_upgrade)

    down = commands.add_parser(
        "downgrade", help="revert migrations down to REVISION ('base' drops every table)"
    )
    down.add_argument("revision", metavar="REVISION", help="target revision, e.g. 0001, -1 or base")
    down.add_argument(
        "--yes", action="store_true",
        help="downgrade even though the database holds rolls (what is dropped is lost)",
    )  # fmt: skip
    down.set_defaults(handler=_downgrade)

    current = commands.add_parser("current", help="print the database's revision")
    current.set_defaults(handler=_current)

    url = commands.add_parser("url", help="print the database URL, password masked")
    url.add_argument(
        "--libpq", action="store_true",
        help="print it as libpq reads it (postgresql://…, with the password), for a script; "
        "psql: `rollscan db psql`, which keeps the password off psql's command line",
    )  # fmt: skip
    url.set_defaults(handler=_url)

    psql = commands.add_parser(
        "psql", help="run psql on the database (the password passed in PGPASSWORD, never on a "
        "command line): rollscan db psql -c \"SELECT …\"",
    )  # fmt: skip
    psql.add_argument("psql_args", nargs="*", metavar="PSQL_ARG",
                      help="passed to psql as they are (-c, -At, -f FILE …)")  # fmt: skip
    psql.set_defaults(handler=_psql)

    reader = commands.add_parser(
        "reader",
        help="create a read-only role for quality engineers and BI tools (its password from "
        "ROLLSCAN_READER_PASSWORD)",
    )
    reader.add_argument("name", help="the role's name, e.g. quality")
    reader.set_defaults(handler=_reader)

    stop = commands.add_parser(
        "stop", help="stop the embedded PostgreSQL server (it outlives the commands that start it)"
    )
    stop.add_argument(
        "--force", action="store_true",
        help="stop it even while other processes (a scheduler, workers) are connected",
    )  # fmt: skip
    stop.set_defaults(handler=_stop)
    return db
