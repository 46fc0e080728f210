"""S3 over HTTP for tests: moto's server in a subprocess, spoken to through real sockets.

No in-process patching (no `mock_aws`): boto3, obstore (Rust, which patching cannot reach)
and s3fs all talk HTTP to the same server, as they would to MinIO or AWS. Starting and
stopping the server is `rollscan_testing.services`' (the benchmarks use it too).

Fixtures: `s3_server` (session: the endpoint URL), `s3_store` (a fresh bucket per test),
`local_store` (a directory under tmp_path) and `object_store`, parametrised over
local, S3 with obstore's zarr store and S3 with s3fs's, so one test covers every backend.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollscan_testing.services import start_moto_server, stop_moto_server
from storage.objectstore import LocalStore, ObjectStore, S3Store

FAKE_ACCESS_KEY_ID = "testing"
FAKE_SECRET_ACCESS_KEY = "testing-secret-do-not-log"
REGION = "us-east-1"
OBJECT_STORE_KINDS = ["local", "s3-obstore", "s3-s3fs"]


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
