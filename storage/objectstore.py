"""Object store: one interface over S3 (any S3-compatible endpoint) and a local directory.

Keys are relative, '/'-separated and drawn from a safe alphabet (`validate_key`), so a key
can never leave its bucket or directory. Both backends list in key order with a
`StartAfter` cursor (the last key returned): a caller can persist it and resume without
missing or repeating keys. `zarr_store(prefix)` is a zarr v3 store over the same objects.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from pydantic import SecretStr

if TYPE_CHECKING:
    from zarr.abc.store import Store

    from storage.settings import Settings

MAX_KEY_BYTES = 1024
MAX_LIST_LIMIT = 1000  # S3's MaxKeys ceiling; the local backend keeps the same contract
_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")
_CHUNK = 1 << 20


class InvalidKeyError(ValueError):
    """A key (or prefix) that is not a safe, relative object key."""


class ObjectNotFound(KeyError):
    """No object under this key."""

    def __str__(self) -> str:  # KeyError prints the repr of its argument
        return str(self.args[0]) if self.args else "object not found"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # md5 hex of the content for single-part objects, without quotes
    modified: datetime


@dataclass(frozen=True)
class ListPage:
    items: list[ObjectInfo]
    cursor: str | None  # the last key returned when more may follow; None when exhausted


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise InvalidKeyError."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"object key must be a str, not {type(key).__name__}")
    shown = key if len(key) <= 80 else key[:77] + "..."
    if not key:
        raise InvalidKeyError("object key is empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"object key {shown!r} is longer than {MAX_KEY_BYTES} bytes")
    if "\\" in key:
        raise InvalidKeyError(f"object key {shown!r} contains a backslash; separate with '/'")
    if key.startswith("/"):
        raise InvalidKeyError(f"object key {shown!r} is absolute; keys are relative")
    for segment in key.split("/"):
        if not segment:
            raise InvalidKeyError(f"object key {shown!r} has an empty segment ('//' or an end '/')")
        if segment in (".", ".."):
            raise InvalidKeyError(f"object key {shown!r} has a {segment!r} segment")
        if not _SAFE_SEGMENT.fullmatch(segment):
            bad = "".join(sorted({c for c in segment if not _SAFE_SEGMENT.fullmatch(c)}))
            raise InvalidKeyError(f"object key {shown!r} contains {bad!r}; allowed: A-Za-z0-9._-=")
    return key


def _validate_prefix(prefix: str) -> str:
    """A list or zarr prefix: '' or a key, optionally ending with one '/'."""
    if prefix:
        validate_key(prefix.removesuffix("/"))
    return prefix


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"list limit must be between 1 and {MAX_LIST_LIMIT}, not {limit}")


class ObjectStore(abc.ABC):
    """Objects by key. A put replaces the whole object (last writer wins)."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes | BinaryIO) -> str:
        """Store `data` (bytes, or a file object: seekable for S3) under `key`; return the ETag."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; ObjectNotFound if absent."""

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A buffered, seekable reader that fetches on demand, not the whole object at once."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size, ETag and modification time; ObjectNotFound if absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "", cursor: str | None = None, limit: int = 1000) -> ListPage:
        """Objects whose key starts with `prefix` and sorts after `cursor`, in key order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error (deletes are idempotent)."""

    @abc.abstractmethod
    def uri(self, key: str) -> str:
        """The object's address for people and other tools (s3://…, file://…)."""

    @abc.abstractmethod
    def zarr_store(self, prefix: str, *, read_only: bool = False) -> Store:
        """A zarr v3 store whose keys live under `prefix` of this object store."""

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def iter_objects(self, prefix: str = "", cursor: str | None = None) -> Iterator[ObjectInfo]:
        """Every object under `prefix` after `cursor`, page by page."""
        while True:
            page = self.list(prefix, cursor)
            yield from page.items
            if page.cursor is None:
                return
            cursor = page.cursor

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the 'directory' `prefix` ('/' implied); return the count."""
        keys = [o.key for o in self.iter_objects(_validate_prefix(prefix.rstrip("/") + "/"))]
        for key in keys:
            self.delete(key)
        return len(keys)


# --------------------------------------------------------------------------- S3


class _S3RangeReader(io.RawIOBase):
    """Streams one GET; a seek drops it and the next read starts a ranged GET there.

    Every GET carries If-Match with the ETag seen at open: an object replaced mid-read
    fails (412 PreconditionFailed) instead of mixing two versions.
    """

    def __init__(self, client: Any, bucket: str, key: str, size: int, etag: str) -> None:
        super().__init__()
        self._client, self._bucket, self._key, self._size, self._etag = (
            client,
            bucket,
            key,
            size,
            etag,
        )
        self._pos, self._body = 0, None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        pos = offset + {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        if pos != self._pos:
            self._drop_body()
            self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size:
            return 0
        if self._body is None:
            rng, match = f"bytes={self._pos}-", f'"{self._etag}"'
            kw = {"Bucket": self._bucket, "Key": self._key, "Range": rng, "IfMatch": match}
            self._body = self._client.get_object(**kw)["Body"]
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def _error_code(exc: BaseException) -> str:
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))


class S3Store(ObjectStore):
    """Objects in one bucket of an S3-compatible service (AWS, MinIO, moto), through boto3.

    Objects go up in a single PUT (≤ 5 GiB; the ETag is then the content's md5). The bucket
    is created only by an explicit `ensure_bucket()`. Credentials never appear in repr or
    messages: the secret is held as a SecretStr and revealed only to the clients.
    """

    def __init__(
        self,
        endpoint: str | None,
        bucket: str,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: SecretStr | str | None = None,
        zarr_backend: Literal["obstore", "s3fs"] = "obstore",
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        if zarr_backend not in ("obstore", "s3fs"):
            raise ValueError(f"zarr_backend must be 'obstore' or 's3fs', not {zarr_backend!r}")
        self.endpoint, self.bucket, self.region = endpoint, bucket, region
        self.zarr_backend = zarr_backend
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._key_id = access_key_id
        if isinstance(secret_access_key, str):
            secret_access_key = SecretStr(secret_access_key)
        self._secret = secret_access_key
        self._client_pid: tuple[Any, int] | None = None

    def __repr__(self) -> str:
        # an endpoint written as http://user:secret@host must not leak either
        endpoint = re.sub(r"//[^/@]*@", "//***@", self.endpoint) if self.endpoint else None
        return f"S3Store(endpoint={endpoint!r}, bucket={self.bucket!r}, region={self.region!r}, zarr_backend={self.zarr_backend!r})"

    __str__ = __repr__

    def __getstate__(self) -> dict[str, Any]:  # picklable (for worker pools): drop the client
        return {**self.__dict__, "_client_pid": None}

    def _secret_value(self) -> str | None:
        return self._secret.get_secret_value() if self._secret is not None else None

    @property
    def _client(self) -> Any:
        # one client per process: Celery's prefork children must not share the parent's sockets
        if self._client_pid is None or self._client_pid[1] != os.getpid():
            import boto3
            from botocore.config import Config

            extra: dict[str, Any] = {}
            if self.endpoint:
                # S3-compatible servers want path-style addressing, and some reject the
                # flexible checksums botocore sends by default since 1.36
                extra = {
                    "s3": {"addressing_style": "path"},
                    "request_checksum_calculation": "when_required",
                    "response_checksum_validation": "when_required",
                }
            config = Config(
                region_name=self.region,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                retries={"max_attempts": 3, "mode": "standard"},
                **extra,
            )
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=self._key_id,
                aws_secret_access_key=self._secret_value(),
                config=config,
            )
            self._client_pid = (client, os.getpid())
        return self._client_pid[0]

    @contextlib.contextmanager
    def _not_found_as(self, key: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise ObjectNotFound(f"no object {self.uri(key)}") from None
            raise

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except Exception as exc:
            if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except Exception as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put(self, key: str, data: bytes | BinaryIO) -> str:
        response = self._client.put_object(Bucket=self.bucket, Key=validate_key(key), Body=data)
        return str(response["ETag"]).strip('"')

    def get(self, key: str) -> bytes:
        with self._not_found_as(key):
            response = self._client.get_object(Bucket=self.bucket, Key=validate_key(key))
        with contextlib.closing(response["Body"]) as body:
            return body.read()

    def open(self, key: str) -> BinaryIO:
        info = self.head(key)
        raw = _S3RangeReader(self._client, self.bucket, key, info.size, info.etag)
        return io.BufferedReader(raw, buffer_size=_CHUNK)  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        with self._not_found_as(key):
            r = self._client.head_object(Bucket=self.bucket, Key=validate_key(key))
        return ObjectInfo(key, int(r["ContentLength"]), r["ETag"].strip('"'), r["LastModified"])

    def list(self, prefix: str = "", cursor: str | None = None, limit: int = 1000) -> ListPage:
        _check_limit(limit)
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": _validate_prefix(prefix),
            "MaxKeys": limit,
        }
        if cursor is not None:
            kwargs["StartAfter"] = validate_key(cursor)
        response = self._client.list_objects_v2(**kwargs)
        items = [
            ObjectInfo(o["Key"], int(o["Size"]), o["ETag"].strip('"'), o["LastModified"])
            for o in response.get("Contents", [])
        ]
        more = bool(response.get("IsTruncated")) and bool(items)
        return ListPage(items, items[-1].key if more else None)

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=validate_key(key))

    def delete_prefix(self, prefix: str) -> int:
        prefix, count, cursor = _validate_prefix(prefix.rstrip("/") + "/"), 0, None
        while True:  # DeleteObjects takes up to 1000 keys: one request per listed page
            page = self.list(prefix, cursor)
            if page.items:
                batch = {"Objects": [{"Key": o.key} for o in page.items], "Quiet": True}
                self._client.delete_objects(Bucket=self.bucket, Delete=batch)
                count += len(page.items)
            if page.cursor is None:
                return count
            cursor = page.cursor

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{validate_key(key)}"

    def zarr_store(self, prefix: str, *, read_only: bool = False) -> Store:
        import zarr.storage

        prefix = _validate_prefix(prefix).removesuffix("/")
        if self.zarr_backend == "obstore":
            import obstore.store

            given = {"endpoint": self.endpoint, "access_key_id": self._key_id}
            given["secret_access_key"] = self._secret_value()
            config = {"region": self.region, **{k: v for k, v in given.items() if v is not None}}
            options = {
                "connect_timeout": timedelta(seconds=self.connect_timeout),
                "timeout": timedelta(seconds=self.read_timeout),
                "allow_http": bool(self.endpoint and self.endpoint.startswith("http://")),
            }
            store = obstore.store.S3Store(
                self.bucket, prefix=prefix or None, config=config, client_options=options
            )
            return zarr.storage.ObjectStore(store, read_only=read_only)

        import s3fs

        config_kwargs: dict[str, Any] = {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
        }
        if self.endpoint:
            config_kwargs["s3"] = {"addressing_style": "path"}
        fs = s3fs.S3FileSystem(
            key=self._key_id,
            secret=self._secret_value(),
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": self.region},
            config_kwargs=config_kwargs,
            asynchronous=True,  # FsspecStore drives it from zarr's event loop
            use_listings_cache=False,  # other processes write the same prefixes
        )
        path = f"{self.bucket}/{prefix}" if prefix else self.bucket
        return zarr.storage.FsspecStore(fs, path=path, read_only=read_only)


# --------------------------------------------------------------------------- local directory

_ETAG_XATTR = "user.rollscan.md5"
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


class LocalStore(ObjectStore):
    """Objects as files under `root` (the embedded default).

    Puts are atomic (temp file, fsync, os.replace). The ETag is the content's md5, cached in
    an xattr stamped with size and mtime so head/list need not re-read files (recomputed
    where xattrs are unsupported). Temp names contain '~', outside the key alphabet, so
    they never show up as objects.
    """

    def __init__(self, root: Path | str) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        # validate_key rules out '..'; resolving also stops symlinks that lead out of the root
        if not path.resolve().is_relative_to(self.root):
            raise InvalidKeyError(f"object key {key!r} resolves outside the store's root")
        return path

    def put(self, key: str, data: bytes | BinaryIO) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path(key)  # check again: the tree may have changed under us
        digest = hashlib.md5(usedforsecurity=False)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}~", suffix="~tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                is_bytes = isinstance(data, bytes | bytearray | memoryview)
                for chunk in [data] if is_bytes else iter(lambda: data.read(_CHUNK), b""):
                    f.write(chunk)
                    digest.update(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide objects from other users
            _remember_etag(Path(tmp), digest.hexdigest())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return digest.hexdigest()

    def get(self, key: str) -> bytes:
        with self._not_found_as(key):
            return self._path(key).read_bytes()

    def open(self, key: str) -> BinaryIO:
        with self._not_found_as(key):
            return self._path(key).open("rb")

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with self._not_found_as(key):
            st = path.stat()
            if not path.is_file():
                raise IsADirectoryError(key)
        return self._info(key, path, st)

    @contextlib.contextmanager
    def _not_found_as(self, key: str) -> Iterator[None]:
        try:
            yield
        except _MISSING:
            raise ObjectNotFound(f"no object {key!r} in {self.root}") from None

    @staticmethod
    def _info(key: str, path: Path, st: os.stat_result) -> ObjectInfo:
        stamp, etag = f"{st.st_size}:{st.st_mtime_ns}:", None
        with contextlib.suppress(OSError):
            cached = os.getxattr(path, _ETAG_XATTR).decode()
            etag = cached.removeprefix(stamp) if cached.startswith(stamp) else None
        if etag is None:
            digest = hashlib.md5(usedforsecurity=False)
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            etag = digest.hexdigest()
            _remember_etag(path, etag, st)
        return ObjectInfo(key, st.st_size, etag, datetime.fromtimestamp(st.st_mtime, tz=UTC))

    def _keys_under(self, prefix: str) -> list[str]:
        # walk only the deepest directory the prefix names, then sort globally: directory
        # order is not key order ('a-b' < 'a/b' because '-' < '/')
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.resolve().is_relative_to(self.root) or not start.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            # descend only where keys can still match the prefix
            dirnames[:] = [
                d
                for d in dirnames
                if _SAFE_SEGMENT.fullmatch(d)
                and ((base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/"))
            ]
            keys += [
                base + n
                for n in filenames
                if _SAFE_SEGMENT.fullmatch(n) and (base + n).startswith(prefix)
            ]
        return sorted(keys)

    def list(self, prefix: str = "", cursor: str | None = None, limit: int = 1000) -> ListPage:
        _check_limit(limit)
        after = validate_key(cursor) if cursor is not None else ""
        keys = [k for k in self._keys_under(_validate_prefix(prefix)) if k > after]
        items = []
        for key in keys[:limit]:
            try:
                path = self._path(key)  # skips symlinks that lead out of the root
                items.append(self._info(key, path, path.stat()))
            except (InvalidKeyError, FileNotFoundError):  # or deleted while we listed
                continue
        return ListPage(items, keys[limit - 1] if len(keys) > limit else None)

    def delete(self, key: str) -> None:
        with contextlib.suppress(IsADirectoryError):  # a 'directory' is not an object
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        prefix = _validate_prefix(prefix.rstrip("/") + "/")
        count = len(self._keys_under(prefix))
        # here a prefix is a directory: remove the tree, zarr's '.partial' leftovers too
        directory = self._path(prefix.removesuffix("/"))
        if directory.is_dir() and not directory.is_symlink():
            shutil.rmtree(directory)
        return count

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def zarr_store(self, prefix: str, *, read_only: bool = False) -> Store:
        import zarr.storage

        prefix = _validate_prefix(prefix).removesuffix("/")
        return zarr.storage.LocalStore(
            self._path(prefix) if prefix else self.root, read_only=read_only
        )


def _remember_etag(path: Path, etag: str, st: os.stat_result | None = None) -> None:
    st = st or path.stat()
    with contextlib.suppress(OSError):  # ENOTSUP or a read-only file: recompute next time
        os.setxattr(path, _ETAG_XATTR, f"{st.st_size}:{st.st_mtime_ns}:{etag}".encode())


# --------------------------------------------------------------------------- helpers


def open_object_store(settings: Settings) -> ObjectStore:
    """S3Store when `settings.s3_endpoint` is set, else a LocalStore under the data directory."""
    if settings.s3_endpoint:
        return S3Store(
            settings.s3_endpoint,
            settings.s3_bucket,
            settings.s3_region,
            settings.s3_access_key_id,
            settings.s3_secret_access_key,
            settings.zarr_s3_backend,
        )
    return LocalStore(Path(settings.data_dir) / "objects")


_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}
_TRANSIENT_CODES |= {"InternalError", "ServiceUnavailable", "500", "502", "503", "504"}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT}
_TRANSIENT_ERRNOS |= {errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
# obstore (Rust) errors have no type for these: match the words of their messages
_TRANSIENT_TEXT = re.compile(
    r"error sending request|connection (refused|reset|closed)|timed out|SlowDown|status code: 5\d\d",
    re.IGNORECASE,
)


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, InvalidKeyError | ObjectNotFound | PermissionError | FileNotFoundError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    module = type(exc).__module__
    if module.startswith("botocore"):
        from botocore import exceptions as bex

        if isinstance(exc, bex.ConnectionError | bex.HTTPClientError | bex.ReadTimeoutError):
            return True
        if isinstance(exc, bex.ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return _error_code(exc) in _TRANSIENT_CODES or status >= 500
    if module.startswith("aiohttp"):
        import aiohttp

        return isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ServerTimeoutError)
    if module.startswith("obstore"):
        import obstore.exceptions

        if isinstance(exc, obstore.exceptions.GenericError):
            return bool(_TRANSIENT_TEXT.search(str(exc)))
    return False


def is_transient_store_error(exc: BaseException) -> bool:
    """True for errors worth a retry: connection refused/reset, timeouts, 5xx, SlowDown.

    Follows the cause/context chain: s3fs, zarr and callers wrap the network error.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 10:
        seen.add(id(current))
        if _is_transient_one(current):
            return True
        current = current.__cause__ or current.__context__
    return False
