"""Ingest, scoring and finalize run by hand, without Celery (a pytest plugin): `make_ctx` gives a
worker context on the test's database and a local store (or the one given), with the session's
twill model active and a thread-safe queue (`QueueEnqueuer`) that the test drains, in its own
threads if it likes (`drain`); `register`, `put_frame` and `frame_bytes` make the roll.
Used by test_ingest_hardening.py, test_ingest_races.py and test_repeated_work.py.
"""

from __future__ import annotations

import io
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fixtures_roll import FABRIC
from sqlalchemy import select

from storage.manifest import parse_manifest
from storage.objectstore import LocalStore
from storage.registry import activate_model, register_model
from storage.schema import Roll, Run
from storage.settings import Settings
from worker.context import WorkerContext
from worker.finalize import finalize_run
from worker.ingest import ingest_frame
from worker.roll_rows import register_roll
from worker.scoring import score_band

PX_PER_MM = 10.0
BAND = 256
WIDTH = 128


def frame_bytes(rows: int = BAND, width: int = WIDTH, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(90, 110, (rows, width), dtype=np.uint8)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, compression="zlib")
    return buffer.getvalue()


@dataclass
class QueueEnqueuer:
    """Thread-safe: work goes into a queue that the test's threads take from."""

    items: deque = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    finalize_copies: int = 1  # 2: each finalize is also redelivered at once, racing itself

    def ingest(self, roll_id: str, seq: int, key: str) -> None:
        with self.lock:
            self.items.append(("ingest", (roll_id, seq, key)))

    def score(self, run_id: int, band_index: int, reprocess: bool = False) -> None:
        with self.lock:
            self.items.append(("score", (run_id, band_index)))

    def finalize(self, run_id: int) -> None:
        with self.lock:
            self.items.extend([("finalize", (run_id,))] * self.finalize_copies)

    def take(self, kinds: tuple[str, ...]) -> tuple[str, tuple] | None:
        with self.lock:
            for i, item in enumerate(self.items):
                if item[0] in kinds:
                    del self.items[i]
                    return item
        return None


@pytest.fixture
def make_ctx(db_engine, twill_model: Path, tmp_path: Path):
    def make(store=None, **overrides) -> WorkerContext:
        settings = Settings(band_height=BAND, data_dir=tmp_path / "data", device="cpu",
                            batch_size=8, **overrides)  # fmt: skip
        store = store if store is not None else LocalStore(tmp_path / "objects")
        ctx = WorkerContext(settings, db_engine, store, QueueEnqueuer(), device="cpu",
                            batch_size=8)  # fmt: skip
        with ctx.session() as session:
            model, _ = register_model(session, store, twill_model, fabric_type=FABRIC)
            activate_model(session, model.version)
        return ctx

    return make


def register(ctx: WorkerContext, roll_id: str, frames: int, *, complete: bool = True,
             width_mm: float = WIDTH / PX_PER_MM, **extra) -> None:  # fmt: skip
    manifest = parse_manifest({"roll_id": roll_id, "fabric_type": FABRIC, "width_mm": width_mm,
                               "px_per_mm": PX_PER_MM, "frames": frames, "complete": complete,
                               **extra})  # fmt: skip
    with ctx.session() as session:
        register_roll(session, manifest, f"incoming/{roll_id}")


def put_frame(ctx: WorkerContext, roll_id: str, seq: int, data: bytes) -> str:
    key = f"incoming/{roll_id}/frames/{seq:06d}.tif"
    ctx.store.put(key, data)
    return key


def roll_and_run(ctx: WorkerContext, roll_id: str) -> tuple[Roll, Run | None]:
    with ctx.session() as session:
        return session.get(Roll, roll_id), session.scalar(select(Run).where(Run.roll_id == roll_id))


def drain(ctx: WorkerContext, kinds=("ingest", "score", "finalize")) -> int:
    """Run queued work in this thread; returns the finalizes that turned their run done."""
    finalized = 0
    while (item := ctx.enqueue.take(kinds)) is not None:
        name, args = item
        if name == "ingest":
            ingest_frame(ctx, *args)
        elif name == "score":
            score_band(ctx, *args)
        else:
            with ctx.session() as session:
                was_done = session.get(Run, args[0]).status == "done"
            if finalize_run(ctx, *args) is not None and not was_done:
                finalized += 1
    return finalized
