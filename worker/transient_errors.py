"""The one transient-error predicate: is this an error that waiting may cure?

Used by the Celery tasks (retry with back-off), the scheduler's discovery and loop (try again
next pass), so "transient" means the same everywhere: a database, object-store or broker error
such as a refused or dropped connection, a timeout, a throttled request. A bug, a bad roll or a
missing object is not transient.
"""

from __future__ import annotations

from storage.database import SchemaNotAtHead, is_transient_db_error
from storage.objectstore import is_transient_store_error


def is_transient_error(exc: BaseException) -> bool:
    """A database, object-store or broker error that waiting may cure (causes and contexts of
    the exception included)."""
    from kombu.exceptions import OperationalError  # the broker's; kombu comes with Celery

    if is_transient_db_error(exc) or is_transient_store_error(exc):
        return True
    seen: set[int] = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        # the broker's; and a schema not upgraded yet, which a worker waits for (a command,
        # told it is not a database that cannot be reached, refuses: `storage.database`)
        if isinstance(item, OperationalError | SchemaNotAtHead):
            return True
        item = item.__cause__ or item.__context__
    return False
