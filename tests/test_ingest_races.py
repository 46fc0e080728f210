"""The run's counters under concurrent ingest and scoring, without Celery (issue 13 item 6): a
band counted while ingest takes bands back is not lost, and a run is finalized once whatever
the interleaving (tests/fixtures_ingest.py runs the work in the test's threads).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import tifffile
from fixtures_ingest import BAND, WIDTH, drain, frame_bytes, put_frame, register, roll_and_run
from lock_waits import wait_for_lock_waits
from sqlalchemy import select, text

from storage.schema import Band
from storage.zarr_rolls import open_roll
from worker.context import RetryLater, WorkerContext
from worker.finalize import finalize_run
from worker.ingest import ingest_frame, roll_updated
from worker.scoring import score_band

# --- item 6: counters under concurrent ingest and scoring -----------------------------------


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
        wait_for_lock_waits(ctx.engine, 1)  # ingest has read the run and waits on band 0
        scoring = threading.Thread(target=score_band, args=(ctx, run.id, 2))
        scoring.start()
        # band 2 is counted now, unless its count waits for ingest's lock on the run
        wait_for_lock_waits(ctx.engine, 2, unless=scoring)
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


# --- a frame replaced while a band that reads it is scored -----------------------------------


class _PausedModel:
    """The worker's detector, pausing in its first scoring call until the test lets it go on:
    a slow model, so that a frame can change while a band's pixels are being scored."""

    def __init__(self, detector, entered: threading.Event, go_on: threading.Event) -> None:
        self._detector, self._entered, self._go_on = detector, entered, go_on

    def __getattr__(self, name: str):
        attribute = getattr(self._detector, name)
        if name not in ("score_tensor", "predict"):
            return attribute

        def paused(*args, **kwargs):
            if not self._entered.is_set():
                self._entered.set()
                assert self._go_on.wait(120), "the test never let the model go on"
            return attribute(*args, **kwargs)

        return paused


@dataclass
class _SlowModelContext(WorkerContext):
    entered: threading.Event = field(default_factory=threading.Event)
    go_on: threading.Event = field(default_factory=threading.Event)

    def detector(self, model):
        return _PausedModel(super().detector(model), self.entered, self.go_on)


def test_a_band_scored_on_pixels_replaced_meanwhile_leaves_no_stale_map(make_ctx):
    """Its scorer read frame 2's old pixels; the new frame came in before it finished: the
    scorer neither writes its map nor counts the band, the score sent by the change does, and
    the roll ends as one ingested with the new frame from the start."""
    ctx = make_ctx()
    slow = _SlowModelContext(ctx.settings, ctx.engine, ctx.store, ctx.enqueue, device="cpu",
                             batch_size=8)  # fmt: skip
    for roll_id, second in (("R-swap", 2), ("R-new", 99)):
        register(ctx, roll_id, 3)
        for seq in (1, 2, 3):
            key = put_frame(ctx, roll_id, seq, frame_bytes(seed=second if seq == 2 else seq))
            assert ingest_frame(ctx, roll_id, seq, key) == "ingested"
    drain(ctx)  # R-new done; R-swap's bands too — they are sent back below
    _, run = roll_and_run(ctx, "R-swap")
    with ctx.session() as session:  # band 1 to be scored again, as after an earlier change
        session.execute(text("UPDATE bands SET status = 'pending' WHERE run_id = :r AND "
                             "band_index = 1"), {"r": run.id})  # fmt: skip
        session.execute(text("UPDATE runs SET bands_done = 2, status = 'scoring' WHERE id = :r"),
                        {"r": run.id})  # fmt: skip
    result: list[str] = []
    scorer = threading.Thread(target=lambda: result.append(score_band(slow, run.id, 1)))
    scorer.start()
    assert slow.entered.wait(120)  # band 1's pixels read, frame 2's old ones among them
    key = put_frame(ctx, "R-swap", 2, frame_bytes(seed=99))
    assert ingest_frame(ctx, "R-swap", 2, key) == "ingested"
    slow.go_on.set()
    scorer.join()
    assert result == ["stale"]
    assert sorted(args[1] for _, args in ctx.enqueue.items) == [0, 1, 2]
    drain(ctx)
    _, run = roll_and_run(ctx, "R-swap")
    _, fresh = roll_and_run(ctx, "R-new")
    assert (run.status, run.bands_done, run.bands_total) == ("done", 3, 3)
    np.testing.assert_array_equal(
        open_roll(ctx.store, "R-swap").read_scores(run.model_version, 0, 3 * BAND // 4),
        open_roll(ctx.store, "R-new").read_scores(fresh.model_version, 0, 3 * BAND // 4),
    )
    with ctx.session() as session:
        generations = session.scalars(
            select(Band.generation).where(Band.run_id == run.id).order_by(Band.band_index)
        ).all()
    assert generations == [1, 1, 1]


def test_a_frame_replaced_again_while_read_never_writes_the_older_version(make_ctx):
    """Frame 2 is replaced by B; B's delivery has read and decoded it and waits for the roll's
    row when C replaces it. B's delivery must not write B over what C's delivery writes (the
    roll was scored on an outdated frame, silently): it sees the object changed and retries,
    and the roll ends with C. And a late copy of a frame's message, after its object was
    cleaned away, leaves the roll alone (it failed a finished roll)."""
    ctx = make_ctx()
    register(ctx, "R-ver", 2)
    keys = [put_frame(ctx, "R-ver", seq, frame_bytes(seed=seq)) for seq in (1, 2)]
    for seq, key in enumerate(keys, start=1):
        assert ingest_frame(ctx, "R-ver", seq, key) == "ingested"
    put_frame(ctx, "R-ver", 2, frame_bytes(seed=50))  # B
    outcome: list[object] = []

    def deliver_b() -> None:
        try:
            outcome.append(ingest_frame(ctx, "R-ver", 2, keys[1]))
        except RetryLater as exc:
            outcome.append(exc)

    with ctx.engine.connect() as holder:  # the roll's row held: B's delivery waits to write
        holder.execute(text("SELECT 1 FROM rolls WHERE id = 'R-ver' FOR UPDATE"))
        b = threading.Thread(target=deliver_b)
        b.start()
        wait_for_lock_waits(ctx.engine, 1, unless=b)
        c = put_frame(ctx, "R-ver", 2, frame_bytes(seed=60))  # C, while B waits
        holder.rollback()
    b.join()
    assert len(outcome) == 1 and isinstance(outcome[0], RetryLater), outcome
    assert ingest_frame(ctx, "R-ver", 2, c) == "ingested"  # C's delivery
    assert ingest_frame(ctx, "R-ver", 2, c) == "unchanged"  # B's retry reads C
    expected = tifffile.imread(io.BytesIO(frame_bytes(seed=60)))
    rows = open_roll(ctx.store, "R-ver").read_rows(BAND, 2 * BAND)
    np.testing.assert_array_equal(rows.reshape(expected.shape), expected)

    ctx.store.delete(keys[0])  # cleaned away after ingest; then a late copy of its message
    assert ingest_frame(ctx, "R-ver", 1, keys[0]) == "unchanged"
    roll, _ = roll_and_run(ctx, "R-ver")
    assert roll.status != "failed"


def test_a_first_frame_read_before_the_roll_had_its_width_is_checked_again(make_ctx):
    """Frame 1 replaced by one of another width during its first ingest: the delivery that
    read the old version, decoded without the roll's geometry, found the width set by the
    other when it came to write — and failed on a ValueError that left the roll waiting for
    ever. It now retries, and the retry checks the frame against the roll's width."""
    ctx = make_ctx()
    register(ctx, "R-width", 2)
    key = put_frame(ctx, "R-width", 1, frame_bytes(seed=1))
    outcome: list[object] = []

    def deliver() -> None:
        try:
            outcome.append(ingest_frame(ctx, "R-width", 1, key))
        except RetryLater as exc:
            outcome.append(exc)

    with ctx.engine.connect() as holder:
        holder.execute(text("SELECT 1 FROM rolls WHERE id = 'R-width' FOR UPDATE"))
        delivery = threading.Thread(target=deliver)
        delivery.start()
        wait_for_lock_waits(ctx.engine, 1, unless=delivery)
        # what the other delivery, of a frame 64 px wider, committed meanwhile
        holder.execute(text("UPDATE rolls SET width_px = :w, channels = 1 WHERE id = 'R-width'"),
                       {"w": WIDTH + 64})  # fmt: skip
        holder.commit()
    delivery.join()
    assert len(outcome) == 1 and isinstance(outcome[0], RetryLater), outcome
    assert ingest_frame(ctx, "R-width", 1, key) == "failed"
    roll, _ = roll_and_run(ctx, "R-width")
    assert roll.status == "failed" and f"{WIDTH} px wide" in roll.failure_reason


def test_a_copy_of_the_last_band_that_lost_the_race_sends_the_finalize(make_ctx):
    """Two deliveries of a run's last band at once (a redelivery while the first still ran): the
    first stored it and died before it sent the finalize; the copy, finding the band done,
    returned without sending it, and the run stayed all scored and never finalized."""
    ctx = make_ctx()
    slow = _SlowModelContext(ctx.settings, ctx.engine, ctx.store, ctx.enqueue, device="cpu",
                             batch_size=8)  # fmt: skip
    register(ctx, "R-last", 3)
    for seq in (1, 2, 3):
        key = put_frame(ctx, "R-last", seq, frame_bytes(seed=seq))
        assert ingest_frame(ctx, "R-last", seq, key) == "ingested"
    _, run = roll_and_run(ctx, "R-last")
    ctx.enqueue.items.clear()
    for band in (0, 1):
        assert score_band(ctx, run.id, band) == "scored"
    result: list[str] = []
    copy = threading.Thread(target=lambda: result.append(score_band(slow, run.id, 2)))
    copy.start()
    assert slow.entered.wait(120)  # the copy is scoring band 2
    assert score_band(ctx, run.id, 2) == "scored"  # the first delivery stores it …
    ctx.enqueue.items.clear()  # … and dies before its finalize is sent
    slow.go_on.set()
    copy.join()
    assert result == ["already done"]
    assert [name for name, _ in ctx.enqueue.items] == ["finalize"]
    drain(ctx)
    assert roll_and_run(ctx, "R-last")[1].status == "done"
