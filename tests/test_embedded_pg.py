"""The embedded PostgreSQL server: start on demand, shared between processes, clean stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from storage.database import database_url, is_transient_db_error, make_engine
from storage.embedded_pg import embedded_status, start_embedded, stop_embedded
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

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            assert conn.scalar(text("SELECT 1")) == 1
            assert conn.scalar(text("SELECT inet_server_addr()::text")) == "127.0.0.1/32"
            conn.execute(text("CREATE TABLE kept (v int)"))
            conn.execute(text("INSERT INTO kept VALUES (42)"))
    finally:
        engine.dispose()

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
    engine = make_engine(again.url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT v FROM kept")) == 42
    finally:
        engine.dispose()
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
