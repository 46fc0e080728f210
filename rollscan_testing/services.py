"""The services the tests and the benchmarks start and stop, in one place for both.

- `free_port()`: a free TCP port on loopback;
- PostgreSQL: `postgres_answers()`, `create_database()` and `drop_database()` on a server
  reached through a superuser ("admin") URL;
- `celery worker` processes: `Worker` (a process group of its own, logging to a file, always
  stopped) and `settings_env()`, the environment that hands it rollscan's settings;
  `purge_queues()` empties the pipeline's queues on an AMQP broker;
- moto's S3 server: `start_moto_server()` and `stop_moto_server()`, a real HTTP server in a
  subprocess on loopback.

tests/fixtures_*.py wrap these in pytest fixtures; bench/load.py and bench/zarr_store_read.py
call them directly. What does not come up raises `ServiceError`: a test fails on it, a
benchmark prints it and exits 1.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

import psycopg2
from sqlalchemy import URL

from storage.database import mask_url

ROOT = Path(__file__).resolve().parents[1]
CELERY = Path(sys.executable).with_name("celery")  # the one installed beside this Python
PIPELINE_QUEUES = ("ingest", "score", "finalize")
READY_TIMEOUT_S = 90
CONNECT_TIMEOUT_S = 5


class ServiceError(RuntimeError):
    """A service that did not start, answer or become ready in time."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- PostgreSQL ------------------------------------------------------------------------------


def _connect(url: URL) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, password=url.password,
        dbname=url.database, connect_timeout=CONNECT_TIMEOUT_S,
    )  # fmt: skip
    conn.autocommit = True  # CREATE / DROP DATABASE refuse to run in a transaction
    return conn


def postgres_answers(url: URL) -> bool:
    """Whether the server at `url` accepts a connection to its database as its user."""
    try:
        _connect(url).close()
    except psycopg2.OperationalError:
        return False
    return True


def create_database(admin: URL, prefix: str) -> str:
    """A new, empty database `<prefix>_<random>` on the admin URL's server; its URL (with the
    admin URL's user, password and driver)."""
    try:
        conn = _connect(admin)
    except psycopg2.OperationalError as exc:
        raise ServiceError(f"PostgreSQL {mask_url(admin)} does not answer: {exc}".strip()) from None
    name = f"{prefix}_{secrets.token_hex(4)}"
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return admin.set(database=name).render_as_string(hide_password=False)


def drop_database(admin: URL, name: str) -> None:
    """Drop the database, ending the connections still open to it first (a leaked connection,
    a pool not disposed, would block DROP DATABASE)."""
    conn = _connect(admin)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        conn.close()


# --- brokers and Celery workers --------------------------------------------------------------


def purge_queues(url: str, queues: Iterable[str] = PIPELINE_QUEUES) -> None:
    """Empty the queues on the AMQP broker at `url`; a queue that does not exist is fine."""
    from kombu import Connection

    with Connection(url, connect_timeout=3) as conn:
        for queue in queues:
            with suppress(Exception), conn.channel() as channel:
                channel.queue_purge(queue)


def settings_env(values: dict[str, str]) -> dict[str, str]:
    """This process's environment without its ROLLSCAN_* variables, with `values` as
    ROLLSCAN_<NAME> instead (the settings of a process we start) and unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLSCAN_")}
    env |= {f"ROLLSCAN_{k.upper()}": v for k, v in values.items()}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Worker:
    """`celery -A worker.app worker` on the pipeline's queues, one prefork child (or `command`:
    another of our processes, such as the scheduler), in a process group of its own, logging
    to a file."""

    def __init__(
        self, name: str, env: dict[str, str], log_path: Path, command: list[str] | None = None
    ) -> None:
        self.name, self.log_path = name, log_path
        self._out = log_path.open("wb")
        command = command or [
            str(CELERY), "-A", "worker.app", "worker", "-Q", ",".join(PIPELINE_QUEUES),
            "-c", "1", "-P", "prefork", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "info", "-n", f"{name}@%h",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        log = self.log()
        connected = log.find("] Connected to")  # the banner before it is the same every time
        if connected > 0:
            log = log[log.rfind("\n", 0, connected) + 1 :]
        text = "\n".join(log.splitlines()[-lines:])
        return f"--- worker {self.name} (pid {self.proc.pid}, exit {self.proc.poll()}) ---\n{text}"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(r"@\S+ ready\.", self.log()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"the worker did not become ready in {timeout}s\n{self.tail()}")
            time.sleep(0.2)

    def wait_for_log(self, pattern: str, timeout: float = 180) -> re.Match[str]:
        """The first match of `pattern` in the log, once it is there; raises if the worker
        exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.log())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(
                    f"no {pattern!r} in the worker's log after {timeout}s\n{self.tail()}"
                )
            time.sleep(0.05)
        return match

    def kill(self) -> None:
        """SIGKILL the whole worker: the main process and its pool child, no warm shutdown."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # warm shutdown: the current task ends, reserved ones go back
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        with suppress(ProcessLookupError):  # a pool child orphaned by a crashed main process
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._out.close()


# --- S3: moto's server -----------------------------------------------------------------------


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except OSError:
        return False


def start_moto_server(timeout: float = 60.0) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start `python -m moto.server` on a free loopback port; return (process, endpoint, log).

    Retries with another port if the chosen one was taken between probing and binding. The
    caller stops it (`stop_moto_server`) and removes the log.
    """
    log = Path(tempfile.mkstemp(prefix="moto-server-", suffix=".log")[1])
    for _attempt in range(3):
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers_http(f"{endpoint}/moto-api/"):
                return proc, endpoint, log
            time.sleep(0.1)
        stop_moto_server(proc)
    tail = log.read_text(errors="replace")[-2000:]
    raise ServiceError(f"moto server did not answer on loopback; its log ({log}):\n{tail}")


def stop_moto_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
