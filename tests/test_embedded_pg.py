"""The embedded PostgreSQL server: start on demand, shared between processes, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from storage.database import database_url, is_transient_db_error, make_engine
from storage.embedded_pg import embedded_status, start_embedded, stop_embedded
from storage.pg_processes import EmbeddedPostgresError
from storage.settings import Settings

START = (
    "import json, sys; from storage.embedded_pg import start_embedded; "
    "s = start_embedded(sys.argv[1]); print(json.dumps([s.url, s.pid]))"
)


@pytest.fixture
def data_dir(tmp_path: Path):
    path = tmp_path / "rollscan"
    yield path
    stop_embedded(path)  # whatever the test left running


def _sql(url: str, *statements: str):
    """Run `statements` in one transaction on a connection of their own; the last one's first
    value (None when it returns no rows)."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                result = conn.execute(text(statement))
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def _gone(pid: int, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_two_processes_share_one_server_and_stop_is_clean(data_dir: Path) -> None:
    # two processes race to initialise and start the same, not yet existing, server
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", START, str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    url, pid = results[0]
    assert "@127.0.0.1:" in url

    # this process finds it running and reuses it: same server, not a restart
    server = start_embedded(data_dir)
    assert (server.url, server.pid) == (url, pid)
    assert embedded_status(data_dir) == server
    assert database_url(Settings(data_dir=data_dir)) == url
    state = data_dir / "postgres.json"
    assert json.loads(state.read_text())["url"] == url
    assert state.stat().st_mode & 0o077 == 0  # holds the password

    if os.geteuid() == 0:  # PostgreSQL must not run as root: check who it runs as
        uid = next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
        assert uid != 0
        assert (data_dir / "postgres").stat().st_uid == uid

    assert _sql(url, "SELECT inet_server_addr()::text") == "127.0.0.1/32"
    _sql(url, "CREATE TABLE kept (v int)", "INSERT INTO kept VALUES (42)")

    assert stop_embedded(data_dir) is True
    assert _gone(pid)
    assert embedded_status(data_dir) is None
    assert stop_embedded(data_dir) is False
    refused = make_engine(url, connect_args={"connect_timeout": 2})
    with pytest.raises(OperationalError) as caught:
        refused.connect()
    assert is_transient_db_error(caught.value)

    # started again on demand: same password, data kept
    again = start_embedded(data_dir)
    assert again.pid != pid
    assert again.password == server.password
    assert _sql(again.url, "SELECT v FROM kept") == 42
    assert stop_embedded(data_dir) is True
    assert _gone(again.pid)


def test_a_command_says_it_leaves_the_server_running_and_db_stop_stops_it(
    data_dir: Path,
) -> None:
    """`rollscan` on the embedded default starts a server that outlives it: the command says
    so, and `rollscan db stop` is the way to stop it. Its password is in no repr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLSCAN_")}
    env["ROLLSCAN_DATA_DIR"] = str(data_dir)
    rollscan = [sys.executable, "-m", "cli", "db"]
    done = subprocess.run([*rollscan, "upgrade"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "keeps running after this command" in done.stderr
    assert "`rollscan db stop` stops it" in done.stderr
    server = embedded_status(data_dir)
    assert server is not None
    assert server.password not in repr(server) and "password" not in repr(server)

    again = subprocess.run([*rollscan, "current"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "keeps running" not in again.stderr  # reused, not started
    stopped = subprocess.run([*rollscan, "stop"], env=env, capture_output=True, text=True)
    assert stopped.returncode == 0 and "stopped the embedded" in stopped.stdout
    assert embedded_status(data_dir) is None and _gone(server.pid)
    twice = subprocess.run([*rollscan, "stop"], env=env, capture_output=True, text=True)
    assert twice.returncode == 0 and "is running" in twice.stdout


def _start_in_process(data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", START, str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def test_a_copied_data_dir_gets_a_server_of_its_own(tmp_path: Path) -> None:
    """The postmaster was recognised by its pid and name alone: a copy of a running data dir
    used the original's server (a `db downgrade base` there dropped the original's tables) and
    `db stop` on the copy stopped the original's."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    try:
        server = start_embedded(original)
        _sql(server.url, "CREATE TABLE kept (v int)", "CHECKPOINT")
        subprocess.run(["cp", "-a", str(original), str(copy)], check=True)
        assert (copy / "postgres" / "postmaster.pid").exists()  # naming the original's pid
        copied = start_embedded(copy)
        assert copied.pid != server.pid and copied.port != server.port
        _sql(copied.url, "DROP TABLE kept")  # the copy's own
        assert stop_embedded(copy) is True and _gone(copied.pid)
        assert embedded_status(original) == server  # still running
        assert _sql(server.url, "SELECT count(*) FROM kept") == 0
    finally:
        stop_embedded(copy)
        stop_embedded(original)


def test_a_first_start_interrupted_in_initdb_leaves_a_data_dir_the_next_command_uses(
    data_dir: Path,
) -> None:
    """Ctrl-C while initdb ran left a PGDATA that looked initialised (PG_VERSION) without the
    password or the settings: every later command failed. The cluster is now made beside it."""
    proc = _start_in_process(data_dir)
    deadline = time.monotonic() + 60
    while not (data_dir / "postgres.init" / "PG_VERSION").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert proc.poll() is None, "the first start ended before initdb could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
    proc.communicate(timeout=60)
    assert _sql(start_embedded(data_dir).url, "SELECT 1") == 1
    assert not (data_dir / "postgres.init").exists()


def test_a_damaged_or_loosened_state_file_and_a_shell_path(data_dir: Path, tmp_path: Path) -> None:
    server = start_embedded(data_dir)
    state = data_dir / "postgres.json"
    state.chmod(0o644)
    assert start_embedded(data_dir) == server
    assert state.stat().st_mode & 0o077 == 0  # it holds a superuser's password
    kept = state.read_bytes()
    for damaged in (b"", b"[]", b"\xff\xfe"):
        state.write_bytes(damaged)
        with pytest.raises(EmbeddedPostgresError, match=r"postgres\.json .* is damaged"):
            start_embedded(data_dir)
    assert stop_embedded(data_dir) is True and _gone(server.pid)  # stopped all the same
    state.write_bytes(kept)
    with pytest.raises(EmbeddedPostgresError, match=r"a shell would expand"):
        start_embedded(tmp_path / "we$ird")
    assert not (tmp_path / "we$ird").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the service account exists only under root")
def test_under_root_a_cluster_of_another_user_is_refused_not_reowned(data_dir: Path) -> None:
    server = start_embedded(data_dir)
    assert stop_embedded(data_dir) and _gone(server.pid)
    subprocess.run(["chown", "-R", "nobody", str(data_dir / "postgres")], check=True)
    with pytest.raises(EmbeddedPostgresError, match="belongs to nobody"):
        start_embedded(data_dir)
    assert {p.stat().st_uid for p in (data_dir / "postgres").rglob("*")} == {
        (data_dir / "postgres").stat().st_uid
    }  # nothing re-owned
    owner = int(subprocess.run(["id", "-u", "embedded_postgres"], capture_output=True,
                               text=True, check=True).stdout)  # fmt: skip
    subprocess.run(["chown", "-R", str(owner), str(data_dir / "postgres")], check=True)


def test_db_stop_refuses_while_others_are_connected(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLSCAN_")}
    env["ROLLSCAN_DATA_DIR"] = str(data_dir)
    stop = [sys.executable, "-m", "cli", "db", "stop"]
    engine = make_engine(start_embedded(data_dir).url)  # a scheduler's pool, say
    try:
        with engine.connect() as conn:
            conn.scalar(text("SELECT 1"))
            refused = subprocess.run(stop, env=env, capture_output=True, text=True)
            assert refused.returncode == 2, refused.stderr
            assert f"1 connection(s) still use it (rollscan pid {os.getpid()} ×1)" in (
                refused.stderr
            )
            assert len(refused.stderr.strip().splitlines()) == 1
            assert embedded_status(data_dir) is not None
        # the pool keeps the connection open
        forced = subprocess.run([*stop, "--force"], env=env, capture_output=True, text=True)
        assert forced.returncode == 0 and "stopped the embedded" in forced.stdout
    finally:
        engine.dispose()
    assert embedded_status(data_dir) is None


def test_a_data_dir_whose_postgres_folder_links_to_another_disk(tmp_path: Path) -> None:
    """`DATA_DIR/postgres` a link to an empty folder on a bigger disk: the cluster is made there
    and the link kept (the staged cluster could not be renamed over a link)."""
    data_dir, disk = tmp_path / "data", tmp_path / "bigger-disk" / "pg"
    disk.mkdir(parents=True)
    data_dir.mkdir()
    (data_dir / "postgres").symlink_to(disk)
    try:
        server = start_embedded(data_dir)
        assert _sql(server.url, "SELECT 1") == 1
        assert (data_dir / "postgres").is_symlink() and (disk / "PG_VERSION").exists()
    finally:
        stop_embedded(data_dir)
