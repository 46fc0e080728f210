"""S3 over HTTP for tests: moto's server in a subprocess, spoken to through real sockets.

No in-process patching (no `mock_aws`): boto3, obstore (Rust, which patching cannot reach)
and s3fs all talk HTTP to the same server, as they would to MinIO or AWS.

Fixtures: `s3_server` (session: the endpoint URL), `s3_store` (a fresh bucket per test),
`local_store` (a directory under tmp_path) and `object_store`, parametrised over
local, S3 with obstore's zarr store and S3 with s3fs's, so one test covers every backend.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.objectstore import LocalStore, ObjectStore, S3Store

FAKE_ACCESS_KEY_ID = "testing"
FAKE_SECRET_ACCESS_KEY = "testing-secret-do-not-log"
REGION = "us-east-1"
OBJECT_STORE_KINDS = ["local", "s3-obstore", "s3-s3fs"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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

    Retries with another port if the chosen one was taken between probing and binding.
    """
    log = Path(tempfile.mkstemp(prefix="moto-server-", suffix=".log")[1])
    for _attempt in range(3):
        port = _free_port()
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
    raise RuntimeError(f"moto server did not answer on loopback; its log ({log}):\n{tail}")


def stop_moto_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server running for the whole session."""
    proc, endpoint, log = start_moto_server()
    try:
        yield endpoint
    finally:
        stop_moto_server(proc)
        log.unlink(missing_ok=True)


def make_s3_store(
    endpoint: str, zarr_backend: str = "obstore", bucket: str | None = None
) -> S3Store:
    """An S3Store on the test server, in a new bucket unless `bucket` is given."""
    store = S3Store(
        endpoint,
        bucket or f"test-{uuid.uuid4().hex[:16]}",
        REGION,
        FAKE_ACCESS_KEY_ID,
        FAKE_SECRET_ACCESS_KEY,
        zarr_backend,  # type: ignore[arg-type]
        connect_timeout=5,
        read_timeout=30,
    )
    store.ensure_bucket()
    return store


@pytest.fixture
def s3_store(s3_server: str) -> S3Store:
    """A fresh bucket on the test server (obstore zarr backend)."""
    return make_s3_store(s3_server)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects")


@pytest.fixture(params=OBJECT_STORE_KINDS)
def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """The same test against a local directory and S3 with each zarr backend."""
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    backend = request.param.removeprefix("s3-")
    return make_s3_store(request.getfixturevalue("s3_server"), backend)
