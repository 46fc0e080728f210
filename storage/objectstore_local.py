"""The local-directory backend of the object store: objects as files under one root."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from storage.objectstore import (
    SAFE_SEGMENT,
    STREAM_CHUNK,
    InvalidKeyError,
    ListPage,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    check_list_limit,
    dir_prefix,
    validate_cursor,
    validate_key,
    validate_prefix,
)

if TYPE_CHECKING:
    from zarr.abc.store import Store

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
                for chunk in [data] if is_bytes else iter(lambda: data.read(STREAM_CHUNK), b""):
                    f.write(chunk)
                    digest.update(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide objects from other users
            _remember_etag(Path(tmp), digest.hexdigest())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
                # a write's error names no file ("[Errno 28] No space left on device"): say where
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise
        return digest.hexdigest()

    def get(self, key: str) -> bytes:
        with self._not_found_as(key):
            return self._path(key).read_bytes()

    def open(self, key: str, *, version: ObjectInfo | None = None) -> BinaryIO:
        path = self._path(key)
        with self._not_found_as(key):
            reader = path.open("rb")
        if version is not None:
            # puts replace the file (os.replace), so this descriptor keeps the version it
            # opened: check that one, and it cannot change under the reader afterwards
            try:
                etag = self._etag_of(reader, os.fstat(reader.fileno()))
            except BaseException:
                reader.close()
                raise
            if etag != version.etag:
                reader.close()
                raise ObjectChanged(f"{key!r} was replaced (ETag no longer {version.etag})")
        return reader

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
        with contextlib.suppress(OSError):  # the cached md5, without opening the file
            cached = os.getxattr(path, _ETAG_XATTR).decode()
            etag = cached.removeprefix(stamp) if cached.startswith(stamp) else None
        if etag is None:
            with path.open("rb") as f:
                etag = LocalStore._etag_of(f, st)
        return ObjectInfo(key, st.st_size, etag, datetime.fromtimestamp(st.st_mtime, tz=UTC))

    @staticmethod
    def _etag_of(f: BinaryIO, st: os.stat_result) -> str:
        """The md5 of an open file: cached in its xattr (stamped with size and mtime), else
        read through and cached. The file's position is left at its start."""
        stamp, fd = f"{st.st_size}:{st.st_mtime_ns}:", f.fileno()
        with contextlib.suppress(OSError):
            cached = os.getxattr(fd, _ETAG_XATTR).decode()
            if cached.startswith(stamp):
                return cached.removeprefix(stamp)
        digest = hashlib.md5(usedforsecurity=False)
        while chunk := f.read(STREAM_CHUNK):
            digest.update(chunk)
        f.seek(0)
        etag = digest.hexdigest()
        with contextlib.suppress(OSError):  # ENOTSUP or a read-only file: recompute next time
            os.setxattr(fd, _ETAG_XATTR, f"{stamp}{etag}".encode())
        return etag

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
                if SAFE_SEGMENT.fullmatch(d)
                and ((base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/"))
            ]
            keys += [
                base + n
                for n in filenames
                if SAFE_SEGMENT.fullmatch(n) and (base + n).startswith(prefix)
            ]
        return sorted(keys)

    def list(self, prefix: str = "", cursor: str | None = None, limit: int = 1000) -> ListPage:
        check_list_limit(limit)
        after = validate_cursor(cursor) if cursor is not None else ""
        keys = [k for k in self._keys_under(validate_prefix(prefix)) if k > after]
        items = []
        for key in keys[:limit]:
            try:
                path = self._path(key)  # skips symlinks that lead out of the root
                items.append(self._info(key, path, path.stat()))
            except (InvalidKeyError, FileNotFoundError):  # or deleted while we listed
                continue
        return ListPage(items, keys[limit - 1] if len(keys) > limit else None)

    def list_prefixes(self, prefix: str) -> list[str]:
        prefix = dir_prefix(prefix)
        folder = self._path(prefix.removesuffix("/")) if prefix else self.root
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink())

    def delete(self, key: str) -> None:
        with contextlib.suppress(IsADirectoryError):  # a 'directory' is not an object
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        prefix = validate_prefix(prefix.rstrip("/") + "/")
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

        prefix = validate_prefix(prefix).removesuffix("/")
        return zarr.storage.LocalStore(
            self._path(prefix) if prefix else self.root, read_only=read_only
        )


def _remember_etag(path: Path, etag: str, st: os.stat_result | None = None) -> None:
    st = st or path.stat()
    with contextlib.suppress(OSError):  # ENOTSUP or a read-only file: recompute next time
        os.setxattr(path, _ETAG_XATTR, f"{st.st_size}:{st.st_mtime_ns}:{etag}".encode())
