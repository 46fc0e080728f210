"""Forcing an interleaving without sleeps: wait until other sessions block on a row lock."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine


def wait_for_lock_waits(
    engine: Engine, count: int = 1, unless: threading.Thread | None = None, deadline_s: float = 120
) -> None:
    """Until `count` backends of this database wait for a lock (or `unless` has ended)."""
    deadline = time.monotonic() + deadline_s
    with engine.connect() as conn:
        while conn.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )) < count:  # fmt: skip
            if unless is not None and not unless.is_alive():
                return
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than {count} backends ever waited for a lock")
            time.sleep(0.02)
            conn.rollback()
