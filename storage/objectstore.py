"""Object store: one interface over S3 (any S3-compatible endpoint) and a local directory.

Keys are relative, '/'-separated and drawn from a safe alphabet (`validate_key`), so a key
can never leave its bucket or directory. Both backends list in key order with a
`StartAfter` cursor (the last key returned): a caller can persist it and resume without
missing or repeating keys. `zarr_store(prefix)` is a zarr v3 store over the same objects.

This module is the interface; the backends live in `storage.objectstore_s3` (S3Store) and
`storage.objectstore_local` (LocalStore), and are re-exported here.
"""

from __future__ import annotations

import abc
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from zarr.abc.store import Store

    from storage.objectstore_local import LocalStore as LocalStore
    from storage.objectstore_s3 import S3Store as S3Store
    from storage.settings import Settings

MAX_KEY_BYTES = 1024
MAX_LIST_LIMIT = 1000  # S3's MaxKeys ceiling; the local backend keeps the same contract
# the characters a key segment may hold (the backends' validation and the local store's paths)
SAFE_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")
STREAM_CHUNK = 1 << 20  # bytes read or written at a time when an object is streamed


class InvalidKeyError(ValueError):
    """A key (or prefix) that is not a safe, relative object key."""


class ObjectChanged(Exception):
    """The object under a key is no longer the version (ETag) it was asked for: it was
    replaced since it was listed or headed. Read it again from its new `head`."""


class ObjectNotFound(KeyError):
    """No object under this key."""

    def __str__(self) -> str:  # KeyError prints the repr of its argument
        return str(self.args[0]) if self.args else "object not found"


@dataclass(frozen=True)
class ObjectInfo:
    """An object's key, size, ETag and last modification, as a listing or a HEAD gives them."""

    key: str
    size: int
    etag: str  # md5 hex of the content for single-part objects, without quotes
    modified: datetime


@dataclass(frozen=True)
class ListPage:
    """One page of a listing in key order, and the cursor to pass for the next."""

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
        if not SAFE_SEGMENT.fullmatch(segment):
            bad = "".join(sorted({c for c in segment if not SAFE_SEGMENT.fullmatch(c)}))
            raise InvalidKeyError(f"object key {shown!r} contains {bad!r}; allowed: A-Za-z0-9._-=")
    return key


def validate_cursor(cursor: str) -> str:
    """A listing's resume point: the last key a page held — any key the store holds, one this
    store's own rules refuse included (it is compared with keys, never addressed)."""
    if not isinstance(cursor, str) or len(cursor.encode()) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"a list cursor is a key of at most {MAX_KEY_BYTES} bytes")
    return cursor


def is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


def validate_prefix(prefix: str) -> str:
    """A list or zarr prefix: '' or a key, optionally ending with one '/'."""
    if prefix:
        validate_key(prefix.removesuffix("/"))
    return prefix


def dir_prefix(prefix: str) -> str:
    """A 'directory' prefix: '' (the root) or a valid key ending with '/'."""
    return validate_prefix(prefix.rstrip("/") + "/") if prefix.strip("/") else ""


def check_list_limit(limit: int) -> None:
    """Raise ValueError unless 1 ≤ limit ≤ MAX_LIST_LIMIT (a listing page's size)."""
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
    def open(self, key: str, *, version: ObjectInfo | None = None) -> BinaryIO:
        """A buffered, seekable reader that fetches on demand, not the whole object at once.

        With `version` (from `head` or a listing) every byte read is of that version: a
        reader on an object replaced since raises ObjectChanged instead of mixing the two."""

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

    def list_prefixes(self, prefix: str) -> list[str]:
        """Names of the 'directories' directly under `prefix` ('/' implied), sorted. This
        generic version lists every object below; backends ask for the names alone."""
        prefix = dir_prefix(prefix)
        rests = (o.key[len(prefix) :] for o in self.iter_objects(prefix))
        return sorted({rest.split("/")[0] for rest in rests if "/" in rest})

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the 'directory' `prefix` ('/' implied); return the count."""
        keys = [o.key for o in self.iter_objects(validate_prefix(prefix.rstrip("/") + "/"))]
        for key in keys:
            self.delete(key)
        return len(keys)


def error_code(exc: BaseException) -> str:
    """The error code of a botocore-style error (`exc.response["Error"]["Code"]`), or ''."""
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))


def open_object_store(settings: Settings) -> ObjectStore:
    """S3Store when `settings.s3_endpoint` is set, else a LocalStore under the data directory."""
    if settings.s3_endpoint:
        from storage.objectstore_s3 import S3Store

        return S3Store(
            settings.s3_endpoint,
            settings.s3_bucket,
            settings.s3_region,
            settings.s3_access_key_id,
            settings.s3_secret_access_key,
            settings.zarr_s3_backend,
        )
    from storage.objectstore_local import LocalStore

    return LocalStore(Path(settings.data_dir) / "objects")


_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}
_TRANSIENT_CODES |= {"InternalError", "ServiceUnavailable", "500", "502", "503", "504"}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT}
_TRANSIENT_ERRNOS |= {errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
# a full disk or quota: the roll waits, with back-off, for space freed, rather than fail for good
# (every roll in flight would, each to be sent again by hand)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_TRANSIENT_ERRNOS |= DISK_FULL_ERRNOS
# obstore (Rust) errors have no type for these: match the words of their messages, and the
# kinds in their debug text (a body stalled or cut mid-transfer: "kind: Timeout … TimedOut",
# "kind: Interrupted … UnexpectedEof, IncompleteBody")
_TRANSIENT_TEXT = re.compile(
    r"error sending request|connection (refused|reset|closed)|timed out|SlowDown|status code: 5\d\d"
    r"|HttpError \{\s*kind: (Timeout|Interrupted|Connect)\b"
    r"|source: TimedOut\b|kind: UnexpectedEof\b|error: IncompleteBody\b",  # not a key's words
    re.IGNORECASE,
)


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(
        exc, InvalidKeyError | ObjectNotFound | ObjectChanged | PermissionError | FileNotFoundError
    ):
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
            return error_code(exc) in _TRANSIENT_CODES or status >= 500
    if module.startswith("aiohttp"):
        import aiohttp

        # a body cut mid-transfer (ClientPayloadError) as much as a connection that failed
        transient = aiohttp.ClientConnectionError | aiohttp.ServerTimeoutError
        return isinstance(exc, transient | aiohttp.ClientPayloadError)
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


# Re-export the backends lazily (PEP 562) rather than importing them at the bottom: they
# import this module, so an eager re-export would fail whenever a backend module is imported
# first (it would ask that half-run module for a class not yet defined). The TYPE_CHECKING
# imports above give type checkers and IDEs the real classes.
_BACKENDS = {"S3Store": "storage.objectstore_s3", "LocalStore": "storage.objectstore_local"}


def __getattr__(name: str) -> Any:
    if name in _BACKENDS:
        import importlib

        return getattr(importlib.import_module(_BACKENDS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_COPY_CHUNK = 1 << 20


@contextmanager
def version_as_file(store: ObjectStore, info: ObjectInfo) -> Iterator[BinaryIO]:
    """A seekable file holding exactly the version `info` describes (ObjectChanged if the
    object was replaced since): the store's own file where it has one (a local store), else
    a temporary file the object is streamed into a megabyte at a time, so that the object's
    bytes never sit in memory whole."""
    with store.open(info.key, version=info) as reader:
        try:
            reader.fileno()
        except (OSError, ValueError):  # io.UnsupportedOperation: not a file of its own
            pass
        else:
            yield reader
            return
        fd, path = tempfile.mkstemp(prefix="rollscan-object-")
        os.close(fd)
        # opened by name, then unlinked: the file vanishes with its handle, and tifffile, which
        # takes a handle's `name` for a path, gets one (a TemporaryFile's name is its fd)
        with open(path, "w+b") as copy:
            os.unlink(path)
            copied = 0
            while chunk := reader.read(_COPY_CHUNK):
                copied += len(chunk)
                if copied > info.size:  # more than the size the ETag came with
                    raise ObjectChanged(f"{info.key} grew past {info.size} bytes while read")
                copy.write(chunk)
            copy.seek(0)
            yield copy
