"""The object store contract, against a local directory and S3 (moto's server over HTTP)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import re
import socket
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
from fixtures_s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, make_s3_store

from storage.objectstore import (
    InvalidKeyError,
    LocalStore,
    ObjectChanged,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    is_transient_store_error,
    open_object_store,
    validate_key,
)
from storage.settings import Settings

BAD_KEYS = [
    "",
    "..",
    ".",
    "../outside",
    "a/../../outside",
    "a/./b",
    "/etc/passwd",
    "a\\b",
    "..\\outside",
    "a//b",
    "a/",
    "with space",
    "semi;colon",
    "question?",
    "star*",
    "tilde~",
    "percent%2e",
    "ümlaut",
    "nul\x00byte",
    "new\nline",
    "x" * 1025,
]


def test_put_get_head_exists_delete(object_store: ObjectStore) -> None:
    data = b"frame bytes \x00\xff" * 100
    etag = object_store.put("incoming/R1/frames/000001.tif", data)
    assert object_store.get("incoming/R1/frames/000001.tif") == data
    info = object_store.head("incoming/R1/frames/000001.tif")
    assert (info.key, info.size, info.etag) == ("incoming/R1/frames/000001.tif", len(data), etag)
    assert info.modified.tzinfo is not None
    assert object_store.exists("incoming/R1/frames/000001.tif")
    assert not object_store.exists("incoming/R1/frames/000002.tif")
    assert not object_store.exists("incoming/R1")  # a 'directory' is not an object
    object_store.delete("incoming/R1/frames/000001.tif")
    object_store.delete("incoming/R1/frames/000001.tif")  # idempotent
    assert not object_store.exists("incoming/R1/frames/000001.tif")
    with pytest.raises(ObjectNotFound, match="000001"):
        object_store.get("incoming/R1/frames/000001.tif")
    with pytest.raises(ObjectNotFound):
        object_store.head("incoming/R1/frames/000001.tif")
    with pytest.raises(ObjectNotFound):
        object_store.open("incoming/R1/frames/000001.tif")


def test_put_from_file_object(object_store: ObjectStore) -> None:
    data = os.urandom(100_000)
    etag = object_store.put("a/stream.bin", io.BytesIO(data))
    assert etag == hashlib.md5(data).hexdigest()
    assert object_store.get("a/stream.bin") == data


def test_open_streams_a_multi_megabyte_object(object_store: ObjectStore) -> None:
    data = os.urandom(6 * 1024 * 1024 + 123)
    object_store.put("big/frame.tif", data)
    with object_store.open("big/frame.tif") as f:
        assert f.read(10) == data[:10]
        assert f.seekable()
        f.seek(5_000_000)
        assert f.tell() == 5_000_000
        assert f.read(1000) == data[5_000_000:5_001_000]
        f.seek(-100, io.SEEK_END)
        assert f.read() == data[-100:]
        f.seek(0)
        chunks = list(iter(lambda: f.read(1 << 20), b""))
    assert len(chunks) == 7
    assert b"".join(chunks) == data


def test_open_of_a_version_never_mixes_it_with_a_replacement(object_store: ObjectStore) -> None:
    """What ingest relies on: the bytes read are those of the ETag it recorded."""
    old, new = os.urandom(3 << 20), os.urandom(3 << 20)
    object_store.put("frames/000001.tif", old)
    version = object_store.head("frames/000001.tif")
    with object_store.open("frames/000001.tif", version=version) as reader:
        assert reader.read() == old
    object_store.put("frames/000001.tif", new)
    with (
        pytest.raises(ObjectChanged, match="replaced"),
        object_store.open("frames/000001.tif", version=version) as reader,
    ):
        reader.read(1)
    fresh = object_store.head("frames/000001.tif")
    with object_store.open("frames/000001.tif", version=fresh) as reader:
        assert reader.read() == new
    # deleted between its head and its read: the same (a raw NoSuchKey left the roll waiting)
    object_store.delete("frames/000001.tif")
    with (  # S3 finds it gone at the read, the local store at the open
        pytest.raises((ObjectChanged, ObjectNotFound), match=r"replaced or deleted|no object"),
        object_store.open("frames/000001.tif", version=fresh) as reader,
    ):
        reader.read(1)


def test_etag_is_md5_stable_and_changes_with_content(object_store: ObjectStore) -> None:
    first = object_store.put("e/k", b"one")
    assert first == hashlib.md5(b"one").hexdigest()
    assert object_store.put("e/k", b"one") == first
    assert object_store.head("e/k").etag == first
    second = object_store.put("e/k", b"two")
    assert second != first
    assert object_store.head("e/k").etag == second
    assert [o.etag for o in object_store.list("e/").items] == [second]


def test_list_pages_with_a_resumable_cursor(object_store: ObjectStore) -> None:
    keys = [f"incoming/R1/frames/{i:06d}.tif" for i in range(25)]
    for key in reversed(keys):
        object_store.put(key, key.encode())
    object_store.put("incoming/R10/manifest.json", b"{}")  # same prefix string, other roll
    object_store.put("other/x", b"")

    pages, cursor = [], None
    while True:
        page = object_store.list("incoming/R1/", cursor=cursor, limit=10)
        pages.append(page)
        if page.cursor is None:
            break
        assert page.cursor == page.items[-1].key
        cursor = page.cursor
    assert [len(p.items) for p in pages] == [10, 10, 5]
    listed = [o.key for p in pages for o in p.items]
    assert listed == keys  # ordered, no repeats, none missed
    assert all(o.size == len(o.key) for p in pages for o in p.items)

    # a cursor persisted as a plain string resumes exactly where it stopped
    stored = str(pages[0].cursor)
    resumed = object_store.list("incoming/R1/", cursor=stored, limit=10)
    assert [o.key for o in resumed.items] == keys[10:20]
    assert object_store.list("incoming/R1/", cursor=keys[-1]).items == []

    everything = [o.key for o in object_store.iter_objects()]
    assert everything == sorted(everything)
    assert len(everything) == 27
    assert [o.key for o in object_store.list("incoming/R1").items][
        -1
    ] == "incoming/R10/manifest.json"


def test_list_orders_by_key_not_by_directory(object_store: ObjectStore) -> None:
    for key in ["p/a/b", "p/a-b", "p/a.c", "p/a0", "p/a/a"]:
        object_store.put(key, b"")
    keys = [o.key for o in object_store.list("p/").items]
    assert keys == sorted(keys) == ["p/a-b", "p/a.c", "p/a/a", "p/a/b", "p/a0"]
    page = object_store.list("p/", limit=2)
    assert [o.key for o in object_store.list("p/", cursor=page.cursor).items] == keys[2:]


def test_list_limit_is_bounded(object_store: ObjectStore) -> None:
    for limit in (0, 1001):
        with pytest.raises(ValueError, match="limit"):
            object_store.list(limit=limit)


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k)[:20])
def test_unsafe_keys_are_rejected_and_nothing_is_written(
    object_store: ObjectStore, key: str, tmp_path: Path
) -> None:
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(InvalidKeyError):
        object_store.put(key, b"payload")
    for operation in (
        object_store.get,
        object_store.head,
        object_store.delete,
        object_store.exists,
    ):
        with pytest.raises(InvalidKeyError):
            operation(key)
    assert object_store.list().items == []
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not (tmp_path.parent / "outside").exists()


def test_valid_keys_and_prefix_arguments_are_checked() -> None:
    for key in ["incoming/R1/frames/000001.tif", "a=b/c_d-e.f", "...x", "x..", ".hidden"]:
        assert validate_key(key) == key
    with pytest.raises(InvalidKeyError, match="backslash"):
        validate_key("a\\b")
    with pytest.raises(InvalidKeyError, match=r"'\.\.'"):
        validate_key("a/../b")
    with pytest.raises(InvalidKeyError, match="1024"):
        validate_key("a/" * 600)


def test_bad_prefix_and_cursor_are_rejected(object_store: ObjectStore) -> None:
    for prefix in ("../", "/abs/", "a//"):
        with pytest.raises(InvalidKeyError):
            object_store.list(prefix)
    with pytest.raises(InvalidKeyError):  # a cursor is only compared with keys: bounded, no more
        object_store.list("", cursor="x" * 2000)
    with pytest.raises(InvalidKeyError):
        object_store.zarr_store("../escape")


def test_local_store_cannot_leave_its_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not yours")
    store = LocalStore(tmp_path / "root")
    (tmp_path / "root" / "link").symlink_to(outside, target_is_directory=True)
    (tmp_path / "root" / "file-link").symlink_to(outside / "secret")

    with pytest.raises(InvalidKeyError, match="outside"):
        store.put("link/planted", b"x")
    with pytest.raises(InvalidKeyError, match="outside"):
        store.put("link/new-dir/planted", b"x")
    with pytest.raises(InvalidKeyError):
        store.get("link/secret")
    with pytest.raises(InvalidKeyError):
        store.get("file-link")
    with pytest.raises(InvalidKeyError):
        store.delete("link/secret")
    with pytest.raises(InvalidKeyError):
        store.zarr_store("link")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"not yours"
    assert store.list().items == []  # symlinks out of the root are not objects
    store.put("inside/ok", b"fine")
    assert store.uri("inside/ok") == (tmp_path / "root" / "inside" / "ok").as_uri()


def test_local_put_is_atomic_and_leaves_no_temp_files(local_store: LocalStore) -> None:
    class Exploding(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:
            raise OSError("scanner link dropped")

    local_store.put("k/frame", b"old")
    with pytest.raises(OSError, match="dropped"):
        local_store.put("k/frame", Exploding())  # type: ignore[arg-type]
    assert local_store.get("k/frame") == b"old"
    assert sorted(p.name for p in (local_store.root / "k").iterdir()) == ["frame"]


def test_local_etag_survives_a_new_store_and_notices_changes(local_store: LocalStore) -> None:
    etag = local_store.put("x/y", b"abc")
    again = LocalStore(local_store.root)
    assert again.head("x/y").etag == etag
    path = local_store.root / "x" / "y"
    path.write_bytes(b"abcd")  # a change behind the store's back
    assert again.head("x/y").etag == hashlib.md5(b"abcd").hexdigest()


def test_delete_prefix(object_store: ObjectStore) -> None:
    for key in ["rolls/A.zarr/zarr.json", "rolls/A.zarr/image/c/0/0/0", "rolls/A.zarr2/keep"]:
        object_store.put(key, b"1")
    assert object_store.delete_prefix("rolls/A.zarr") == 2
    assert [o.key for o in object_store.list("rolls/").items] == ["rolls/A.zarr2/keep"]
    assert object_store.delete_prefix("rolls/missing.zarr/") == 0


def test_list_prefixes_names_the_directories_directly_under(object_store: ObjectStore) -> None:
    for key in ("in/R-2/frames/000001.tif", "in/R-1/manifest.json", "in/R-1/frames/000001.tif",
                "in/loose.txt", "out/x"):  # fmt: skip
        object_store.put(key, b"x")
    assert object_store.list_prefixes("in/") == ["R-1", "R-2"]
    assert object_store.list_prefixes("in") == ["R-1", "R-2"]
    assert object_store.list_prefixes("in/R-1/") == ["frames"]
    assert object_store.list_prefixes("") == ["in", "out"]
    assert object_store.list_prefixes("nothing/") == []
    with pytest.raises(InvalidKeyError):
        object_store.list_prefixes("../in/")
    generic = ObjectStore.list_prefixes  # the fallback for backends without a native listing
    assert generic(object_store, "in/") == object_store.list_prefixes("in/")
    assert generic(object_store, "") == ["in", "out"]


def test_uri(object_store: ObjectStore) -> None:
    uri = object_store.uri("incoming/R1/manifest.json")
    assert uri.endswith("/incoming/R1/manifest.json")
    assert uri.startswith("file://" if isinstance(object_store, LocalStore) else "s3://")


def test_s3_store_never_shows_its_secret(s3_server: str) -> None:
    store = make_s3_store(s3_server)
    texts = [repr(store), str(store), repr(vars(store)), repr(store.zarr_store("rolls/x.zarr"))]
    texts.append(repr(make_s3_store(s3_server, "s3fs", store.bucket).zarr_store("rolls/x.zarr")))
    missing_bucket = S3Store(
        s3_server, "no-such-bucket", "us-east-1", FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY
    )
    with pytest.raises(Exception) as failure:
        missing_bucket.get("a/b")
    texts += [str(failure.value), repr(failure.value)]
    with_userinfo = S3Store("http://user:hunter2@127.0.0.1:1", "b", secret_access_key="s")
    texts.append(repr(with_userinfo))
    assert all(FAKE_SECRET_ACCESS_KEY not in text for text in texts)
    assert "hunter2" not in repr(with_userinfo)
    clone = pickle.loads(pickle.dumps(store))  # for worker pools: the client is rebuilt
    clone.put("k", b"v")
    assert store.get("k") == b"v"
    assert FAKE_SECRET_ACCESS_KEY not in repr(vars(clone))


def test_a_missing_bucket_is_named_not_taken_for_a_missing_object(s3_server: str) -> None:
    """A HEAD's 404 has no body: `submit s3://…` said "no object …/manifest.json", and a worker
    configured with a bucket that does not exist failed rolls as "frame not found"."""
    from cli.connect import service_error

    store = make_s3_store(s3_server)
    with pytest.raises(ObjectNotFound):  # in a bucket that exists, a missing object is one
        store.head("incoming/R-1/manifest.json")
    missing = S3Store(
        s3_server, "no-such-bucket", "us-east-1", FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY
    )
    for read in (missing.head, missing.get):  # GET's 404 has a body that says so itself
        with pytest.raises(Exception, match="NoSuchBucket") as failure:
            read("incoming/R-1/manifest.json")
        assert not isinstance(failure.value, ObjectNotFound)
        message, code = service_error(failure.value)
        assert message.startswith("the object store refused: ") and code == 2
    with pytest.raises(Exception, match="no bucket 'no-such-bucket' on this S3 endpoint"):
        missing.head("incoming/R-1/manifest.json")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket closes


def test_transient_errors_are_recognised(s3_server: str) -> None:
    from botocore.exceptions import ClientError

    unreachable = S3Store(
        f"http://127.0.0.1:{_closed_port()}", "b", "us-east-1", "k", "s", connect_timeout=1
    )
    with pytest.raises(Exception) as refused:
        unreachable.head("a/b")
    assert is_transient_store_error(refused.value)

    def client_error(code: str, status: int) -> ClientError:
        response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "GetObject")  # type: ignore[arg-type]

    assert is_transient_store_error(client_error("SlowDown", 503))
    assert is_transient_store_error(client_error("InternalError", 500))
    assert not is_transient_store_error(client_error("AccessDenied", 403))
    assert not is_transient_store_error(client_error("NoSuchKey", 404))
    assert is_transient_store_error(ConnectionResetError())
    assert is_transient_store_error(TimeoutError())
    assert not is_transient_store_error(ObjectNotFound("x"))
    assert not is_transient_store_error(InvalidKeyError("x"))
    assert not is_transient_store_error(FileNotFoundError("x"))
    try:  # wrapped, as zarr or a task would
        try:
            raise ConnectionRefusedError("refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("ingest failed") from inner
    except RuntimeError as outer:
        assert is_transient_store_error(outer)
    with pytest.raises(ObjectNotFound) as missing:
        make_s3_store(s3_server).get("no/such")
    assert not is_transient_store_error(missing.value)


def test_transient_obstore_errors_are_recognised() -> None:
    from datetime import timedelta

    import obstore
    import obstore.exceptions
    import obstore.store

    store = obstore.store.S3Store(
        "b",
        endpoint=f"http://127.0.0.1:{_closed_port()}",
        region="us-east-1",
        access_key_id=FAKE_ACCESS_KEY_ID,
        secret_access_key=FAKE_SECRET_ACCESS_KEY,
        client_options={"allow_http": True},
        retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)},
    )
    with pytest.raises(Exception) as refused:
        obstore.get(store, "a/b")
    assert is_transient_store_error(refused.value)
    assert FAKE_SECRET_ACCESS_KEY not in str(refused.value)
    # the words of a body cut or stalled, in a key (a valid roll id), are no such fault
    expired = obstore.exceptions.GenericError(
        "Generic S3 error: Error performing GET http://s3/rolls/R-TimedOut-UnexpectedEof-7.zarr "
        "in 12ms - Server returned non-2xx status code: 400 Bad Request: ExpiredToken"
    )
    assert not is_transient_store_error(expired)


def _zarr_get_failure(handler: type, backend: str) -> BaseException:
    """What reading one object through `backend`'s zarr store raises when the S3 endpoint is an
    HTTP server of `handler` (1 s timeouts)."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        store = S3Store(endpoint, "b", "us-east-1", "k", "s", backend, connect_timeout=1,
                        read_timeout=1)  # fmt: skip
        with pytest.raises(Exception) as failed:
            asyncio.run(store.zarr_store("p").get("obj", default_buffer_prototype()))
    finally:
        server.shutdown()
        server.server_close()
    return failed.value


class _CutBody(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the headers of a 64 kB object, then sends 1 kB of it and closes
    (`stall`: then waits instead) — a link or balancer that drops or stalls mid-transfer."""

    stall = False

    def _headers(self, status: int, ranged: bool = False) -> None:
        self.send_response(status)
        for name, value in (("Content-Length", "65536"), ("ETag", '"e"'),
                            ("Last-Modified", "Wed, 02 Dec 2026 10:00:00 GMT")):  # fmt: skip
            self.send_header(name, value)
        if ranged:
            self.send_header("Content-Range", "bytes 0-65535/65536")
        self.end_headers()

    def do_HEAD(self) -> None:  # s3fs heads the object first
        self._headers(200)

    def do_GET(self) -> None:
        ranged = "Range" in self.headers  # obstore asks for a range, and wants one back
        self._headers(206 if ranged else 200, ranged)
        self.wfile.write(bytes(1024))
        self.wfile.flush()
        if self.stall:
            time.sleep(5)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("fault", ["cut", "stall"])
@pytest.mark.parametrize("backend", ["obstore", "s3fs"])
def test_a_body_cut_or_stalled_mid_transfer_is_transient(backend: str, fault: str) -> None:
    """obstore says so only in its debug text ("kind: Interrupted … IncompleteBody", "kind:
    Timeout … TimedOut"), s3fs as aiohttp's ClientPayloadError: both were taken for permanent,
    the task failed for good and its roll waited for a manual resume."""
    if fault == "stall" and backend == "s3fs":
        pytest.skip("botocore's read timeout: test_transient_errors_are_recognised")
    error = _zarr_get_failure(type("Handler", (_CutBody,), {"stall": fault == "stall"}), backend)
    assert is_transient_store_error(error), repr(error)
    chain, item = [], error
    while item is not None and len(chain) < 10:
        chain.append(type(item).__name__ + ": " + str(item))
        item = item.__cause__ or item.__context__
    # the cut or stall itself, not an earlier refusal (a HEAD answered 501 is transient too)
    said = {"obstore": r"kind: (Interrupted|Timeout)", "s3fs": r"ClientPayloadError"}[backend]
    assert re.search(said, "\n".join(chain)), chain


class _Silent(http.server.BaseHTTPRequestHandler):
    """Takes every request and never answers (a hung store), counting them."""

    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        time.sleep(3)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


def test_a_hung_store_costs_the_s3fs_path_a_few_requests_not_a_hundred() -> None:
    """s3fs retried 5 × 5 times around botocore's own 5 attempts: 125 requests, ~2 h at the
    default read timeout, past the broker's visibility timeout. The task's back-off retries."""
    handler = type("Handler", (_Silent,), {"requests": []})
    assert is_transient_store_error(_zarr_get_failure(handler, "s3fs"))
    assert 1 <= len(handler.requests) <= 3, handler.requests


def test_open_object_store_follows_the_settings(tmp_path: Path, s3_server: str) -> None:
    local = open_object_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalStore)
    assert local.root == (tmp_path / "objects").resolve()
    remote = open_object_store(
        Settings(
            s3_endpoint=s3_server,
            s3_bucket="from-settings",
            s3_access_key_id=FAKE_ACCESS_KEY_ID,
            s3_secret_access_key=FAKE_SECRET_ACCESS_KEY,  # type: ignore[arg-type]
            zarr_s3_backend="s3fs",
            data_dir=tmp_path,
        )
    )
    assert isinstance(remote, S3Store)
    assert (remote.bucket, remote.zarr_backend) == ("from-settings", "s3fs")
    assert FAKE_SECRET_ACCESS_KEY not in repr(remote)
    remote.ensure_bucket()
    remote.put("k", b"v")
    assert remote.get("k") == b"v"


def _put_foreign(store: ObjectStore, key: str, data: bytes) -> None:
    """An object under a key this store's own rules refuse (a scanner's partial upload)."""
    if isinstance(store, LocalStore):
        path = store.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        store._client.put_object(Bucket=store.bucket, Key=key, Body=data)


def test_a_foreign_key_at_a_page_boundary_neither_shows_nor_stops_the_listing(
    object_store: ObjectStore,
) -> None:
    """The page's last key was passed back as the next page's cursor and checked as a key:
    a `000002.tif~upload` there stopped every listing of its roll."""
    for name in ("000001.tif", "000003.tif"):
        object_store.put(f"incoming/R1/frames/{name}", b"x")
    _put_foreign(object_store, "incoming/R1/frames/000002.tif~upload", b"partial")
    keys, cursor = [], None
    while True:
        page = object_store.list("incoming/R1/frames/", cursor=cursor, limit=2)
        keys += [info.key for info in page.items]
        if page.cursor is None:
            break
        cursor = page.cursor
    assert keys == ["incoming/R1/frames/000001.tif", "incoming/R1/frames/000003.tif"]


@pytest.mark.parametrize("prefix", ["../x", "in coming/", "/abs"])
def test_an_incoming_prefix_that_is_no_key_prefix_is_refused_at_start_up(prefix: str) -> None:
    """It was taken, and every discovery pass then failed on it."""
    with pytest.raises(ValueError, match="object key"):
        Settings(incoming_prefix=prefix)
    assert Settings(incoming_prefix="scanner/in").incoming_prefix == "scanner/in"
