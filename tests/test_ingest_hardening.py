"""Ingest and finalize against hostile input and races, on a real PostgreSQL and object store,
without Celery (issue 13): objects far larger than a frame, frame widths the manifest does not
allow, meta that would overwrite the roll's attributes, a frame replaced while it is read, the
run's counters under concurrent ingest and scoring, and a repeated finalize."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fixtures_roll import FABRIC
from sqlalchemy import select, text

from results.grade_store import grade_run
from results.grading import GradingRules
from storage.manifest import parse_manifest
from storage.objectstore import LocalStore, ObjectInfo
from storage.registry import activate_model, register_model
from storage.schema import Band, Defect, Frame, Roll, Run, TaskDelivery
from storage.settings import Settings
from storage.zarr_rolls import open_roll
from worker.context import RetryLater, WorkerContext
from worker.deliveries import Delivery, run_counted
from worker.finalize import finalize_run
from worker.frames import decode_frame
from worker.ingest import frame_source, ingest_frame, roll_updated
from worker.roll_rows import register_roll
from worker.scoring import score_band

PX_PER_MM = 10.0
BAND = 256
WIDTH = 128
RNG = np.random.default_rng(13)


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


# --- items 3, 4, 10: what a frame may be ---------------------------------------------------


def test_an_object_larger_than_any_frame_is_refused_before_it_is_read(make_ctx, tmp_path):
    ctx = make_ctx(max_frame_pixels=1000)  # frames of at most 16 MB and 8 kB with headers
    register(ctx, "R-huge", 1)
    key = put_frame(ctx, "R-huge", 1, bytes(17 << 20))
    assert ingest_frame(ctx, "R-huge", 1, key) == "failed"
    roll, _ = roll_and_run(ctx, "R-huge")
    assert roll.status == "failed"
    assert f"{17 << 20} bytes, more than any frame" in roll.failure_reason
    assert (
        "ROLLSCAN_MAX_FRAME_PIXELS=1000" in roll.failure_reason
        and "not read" in roll.failure_reason
    )


@pytest.mark.parametrize(
    ("width", "settings", "why"),
    [
        (1000, {}, "128 px"),  # the manifest says 12.8 mm at 10 px/mm
        (90, {}, "128 px"),
        (150, {"max_frame_width": 140}, "ROLLSCAN_MAX_FRAME_WIDTH = 140"),
    ],
)
def test_the_first_frame_width_must_agree_with_the_manifest(make_ctx, width, settings, why):
    ctx = make_ctx(**settings)
    register(ctx, "R-wide", 1)
    key = put_frame(ctx, "R-wide", 1, frame_bytes(rows=8, width=width))
    assert ingest_frame(ctx, "R-wide", 1, key) == "failed"
    roll, _ = roll_and_run(ctx, "R-wide")
    assert f"frame is {width} px wide" in roll.failure_reason and why in roll.failure_reason
    assert roll.width_px is None  # nothing was written


def test_a_frame_within_the_tolerance_is_taken(make_ctx):
    ctx = make_ctx()
    register(ctx, "R-ok", 1)
    key = put_frame(ctx, "R-ok", 1, frame_bytes(width=150))  # 17 % wider than 128
    assert ingest_frame(ctx, "R-ok", 1, key) == "ingested"
    assert roll_and_run(ctx, "R-ok")[0].width_px == 150


def test_meta_cannot_replace_the_roll_id_in_the_zarr_attributes(make_ctx):
    ctx = make_ctx()
    register(ctx, "R-meta", 1, meta={"roll_id": "R-other", "fabric_type": "silk", "loom": "L7"})
    key = put_frame(ctx, "R-meta", 1, frame_bytes())
    assert ingest_frame(ctx, "R-meta", 1, key) == "ingested"
    attrs = open_roll(ctx.store, "R-meta").manifest
    assert (attrs["roll_id"], attrs["fabric_type"]) == ("R-meta", FABRIC)
    assert attrs["meta"] == {"roll_id": "R-other", "fabric_type": "silk", "loom": "L7"}


# --- item 6: the bytes ingested are the ETag's ----------------------------------------------


def test_a_frame_is_decoded_from_a_file_on_every_store(object_store) -> None:
    """Local: the store's own file; S3: a temporary copy streamed in, never the bytes whole."""
    data = frame_bytes(seed=3)
    object_store.put("incoming/R/frames/000001.tif", data)
    with frame_source(object_store, object_store.head("incoming/R/frames/000001.tif")) as f:
        pixels = decode_frame(f)
        assert isinstance(f.name, str)  # tifffile takes a handle's name for a path
    np.testing.assert_array_equal(pixels[:, :, 0], tifffile.imread(io.BytesIO(data)))


class ReplacedAfterHead(LocalStore):
    """The store of a scanner that re-uploads a frame the moment after rollscan's HEAD."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.replacements: dict[str, bytes] = {}

    def head(self, key: str) -> ObjectInfo:
        info = super().head(key)
        if key in self.replacements:
            self.put(key, self.replacements.pop(key))
        return info


def test_a_frame_replaced_between_head_and_read_is_read_again(make_ctx, tmp_path):
    store = ReplacedAfterHead(tmp_path / "objects")
    ctx = make_ctx(store)
    register(ctx, "R-etag", 1)
    old, new = frame_bytes(seed=1), frame_bytes(seed=2)
    key = put_frame(ctx, "R-etag", 1, old)
    store.replacements[key] = new
    with pytest.raises(RetryLater, match="replaced"):
        ingest_frame(ctx, "R-etag", 1, key)
    assert roll_and_run(ctx, "R-etag")[0].width_px is None  # nothing written under either
    assert ingest_frame(ctx, "R-etag", 1, key) == "ingested"  # the retry
    with ctx.session() as session:
        frame = session.get(Frame, ("R-etag", 1))
    assert frame.etag == hashlib.md5(new).hexdigest()
    stored = open_roll(ctx.store, "R-etag").read_rows(0, BAND)[:, :, 0]
    np.testing.assert_array_equal(stored, tifffile.imread(io.BytesIO(new)))


# --- item 6: counters under concurrent ingest and scoring -----------------------------------


def wait_for_lock_waits(ctx: WorkerContext, count: int, unless: threading.Thread | None = None,
                        deadline_s: float = 120) -> None:  # fmt: skip
    """Until `count` backends of this database wait for a lock (or `unless` has ended)."""
    deadline = time.monotonic() + deadline_s
    with ctx.engine.connect() as conn:
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


def test_a_band_counted_while_ingest_takes_bands_back_is_not_lost(make_ctx):
    """The review's interleaving, forced: ingest of a replaced frame has read the run and
    waits on a band row; meanwhile another band is counted. Ingest used to write back
    `bands_done - n` from what it had read, losing that count: the run never finalized."""
    ctx = make_ctx()
    register(ctx, "R-race", 3)
    keys = [put_frame(ctx, "R-race", seq, frame_bytes(seed=seq)) for seq in (1, 2, 3)]
    for seq, key in enumerate(keys, start=1):
        assert ingest_frame(ctx, "R-race", seq, key) == "ingested"
    roll_updated(ctx, "R-race")
    _, run = roll_and_run(ctx, "R-race")
    for band in (0, 1):  # band 2 stays pending for now
        score_band(ctx, run.id, band)
    ctx.enqueue.items.clear()

    put_frame(ctx, "R-race", 1, frame_bytes(seed=99))  # frame 1 replaced: band 0 again
    with ctx.engine.connect() as holder:  # a row lock on band 0 stops ingest right there
        holder.execute(
            text("SELECT 1 FROM bands WHERE run_id = :r AND band_index = 0 FOR UPDATE"),
            {"r": run.id},
        )
        ingest = threading.Thread(target=ingest_frame, args=(ctx, "R-race", 1, keys[0]))
        ingest.start()
        wait_for_lock_waits(ctx, 1)  # ingest has read the run and waits on band 0
        scoring = threading.Thread(target=score_band, args=(ctx, run.id, 2))
        scoring.start()
        # band 2 is counted now, unless its count waits for ingest's lock on the run
        wait_for_lock_waits(ctx, 2, unless=scoring)
        holder.rollback()
    ingest.join()
    scoring.join()
    finalized = drain(ctx)
    _, run = roll_and_run(ctx, "R-race")
    assert (run.status, run.bands_done, run.bands_total) == ("done", 3, 3)
    assert finalized == 1


@pytest.fixture
def finalizations(db_engine) -> Iterator[Callable[[int], int]]:
    """How many finalizes took effect on a run (each sets its finished_at), counted by a trigger
    whichever thread ran them: a finalize's return value cannot tell a repeat apart."""
    with db_engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE test_finalizations (run_id bigint);"
            "CREATE FUNCTION test_finalized() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO test_finalizations VALUES (NEW.id); RETURN NEW; END $$;"
            "CREATE TRIGGER test_finalized AFTER UPDATE ON runs FOR EACH ROW WHEN (NEW.status "
            "= 'done' AND NEW.finished_at IS DISTINCT FROM OLD.finished_at) "
            "EXECUTE FUNCTION test_finalized()"
        ))  # fmt: skip

    def count(run_id: int) -> int:
        with db_engine.connect() as conn:
            query = "SELECT count(*) FROM test_finalizations WHERE run_id = :r"
            return conn.scalar(text(query), {"r": run_id})

    yield count
    with db_engine.begin() as conn:
        conn.execute(text("DROP TRIGGER test_finalized ON runs; DROP FUNCTION test_finalized();"
                          "DROP TABLE test_finalizations"))  # fmt: skip


def test_concurrent_ingest_and_scoring_always_finalize_once(make_ctx, finalizations):
    """Many rounds: one thread ingests a streaming roll frame by frame (then re-uploads a
    frame and completes the manifest) while two threads score bands as they are announced
    and two finalize them, as two workers of the finalize queue would, each finalize sent
    twice: a redelivery racing the original."""
    ctx = make_ctx()
    ctx.enqueue.finalize_copies = 2
    for round_ in range(12):
        roll_id = f"R-conc{round_}"
        register(ctx, roll_id, 4, complete=False)
        stop = threading.Event()

        def work(kind: str, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                if (item := ctx.enqueue.take((kind,))) is None:
                    time.sleep(0.005)
                elif kind == "score":
                    score_band(ctx, *item[1])
                else:
                    finalize_run(ctx, *item[1])

        kinds = ("score", "score", "finalize", "finalize")
        threads = [threading.Thread(target=work, args=(kind,)) for kind in kinds]
        for thread in threads:
            thread.start()
        try:
            for seq in range(1, 5):
                key = put_frame(ctx, roll_id, seq, frame_bytes(seed=round_ * 10 + seq))
                assert ingest_frame(ctx, roll_id, seq, key) == "ingested"
            key = put_frame(ctx, roll_id, 2, frame_bytes(seed=round_ * 10 + 7))
            assert ingest_frame(ctx, roll_id, 2, key) == "ingested"  # bands 1 (and 2) again
            register(ctx, roll_id, 4, complete=True)
            roll_updated(ctx, roll_id)
            deadline = time.monotonic() + 120
            while roll_and_run(ctx, roll_id)[1].status != "done" or ctx.enqueue.items:
                if time.monotonic() > deadline:
                    pytest.fail(f"round {round_}: {roll_and_run(ctx, roll_id)[1].__dict__}")
                time.sleep(0.05)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        drain(ctx)
        _, run = roll_and_run(ctx, roll_id)
        assert (run.bands_done, run.bands_total) == (4, 4), round_
        assert finalizations(run.id) == 1, round_
        with ctx.session() as session:
            statuses = session.scalars(select(Band.status).where(Band.run_id == run.id)).all()
        assert statuses == ["done"] * 4


# --- item 2: what counts as a death ----------------------------------------------------------


def test_deliveries_count_deaths_only(make_ctx):
    """A delivery that ends in any way Python sees uncounts itself; one that finds
    max_deliveries deaths gives its roll up; a Celery retry (its sender ended) starts again."""
    ctx = make_ctx(max_deliveries=2)
    register(ctx, "R-dead", 1)
    delivery = Delivery("ingest", "R-dead/1", "frame 1", roll_id="R-dead")

    def boom() -> None:
        raise RuntimeError("a bug, not a death")

    with pytest.raises(RuntimeError):
        run_counted(ctx, delivery, boom)
    with ctx.session() as session:  # two deaths, as a SIGKILL leaves them
        session.execute(text("UPDATE task_deliveries SET unfinished = 2"))
    assert run_counted(ctx, delivery, lambda: "ran", retry=True) == "ran"
    with ctx.session() as session:
        assert session.get(TaskDelivery, ("ingest", "R-dead/1")) is None  # success forgets
        session.add(TaskDelivery(task="ingest", key="R-dead/1", unfinished=2))
    assert run_counted(ctx, delivery, lambda: pytest.fail("must not run")) == "failed"
    roll, _ = roll_and_run(ctx, "R-dead")
    assert roll.status == "failed" and "died during each of 2 deliveries" in roll.failure_reason


# --- item 11: finalize of a done run is a no-op ---------------------------------------------


def test_finalizing_a_done_run_again_keeps_its_defects_and_points(make_ctx):
    ctx = make_ctx()
    register(ctx, "R-fin", 2)
    pixels = np.full((BAND, WIDTH), 100, np.uint8)
    pixels[100:140, 40:90] = 255  # a bright patch: a defect
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels)
    keys = [
        put_frame(ctx, "R-fin", 1, buffer.getvalue()),
        put_frame(ctx, "R-fin", 2, frame_bytes()),
    ]
    for seq, key in enumerate(keys, start=1):
        ingest_frame(ctx, "R-fin", seq, key)
    roll_updated(ctx, "R-fin")
    assert drain(ctx) == 1
    _, run = roll_and_run(ctx, "R-fin")
    with ctx.session() as session:  # a 12.8 mm roll: no selvage margins
        grade_run(session, run.id, GradingRules(selvage_margin_in=0))

    def defects() -> list[tuple]:
        with ctx.session() as session:
            return [tuple(r) for r in session.execute(
                select(Defect.id, Defect.defect_no, Defect.points).where(Defect.run_id == run.id)
                .order_by(Defect.id)
            )]  # fmt: skip

    before = defects()
    assert before and all(points is not None for _, _, points in before)
    assert finalize_run(ctx, run.id) == len(before)
    assert defects() == before
