"""A database and an object store restored from backups (docs/deployment.md, "Back up and
restore"): what the pipeline does with what the other one lost, on a real PostgreSQL and local
object store, in-process (`InlineEnqueuer`)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from rollscan_testing.synthetic_roll import write_synthetic_roll
from scheduler.submit import submit
from storage.schema import Roll, Run
from storage.zarr_rolls import delete_roll
from worker.ingest import ingest_frame
from worker.roll_rows import RollError
from worker.scoring import score_band

PX_PER_MM, BAND = 4.0, 512
FRAME_ROWS, FRAMES, WIDTH = 256, 4, 384  # two bands
PLAN = [("hole", (512, 190))]


@pytest.fixture
def ctx(make_inline_ctx):
    return make_inline_ctx(BAND)


def _submit(ctx, tmp_path, roll_id: str) -> None:
    write_synthetic_roll(tmp_path / roll_id, roll_id, frames=FRAMES, frame_rows=FRAME_ROWS,
                         width=WIDTH, plan=PLAN, px_per_mm=PX_PER_MM)  # fmt: skip
    submit(ctx, str(tmp_path / roll_id))


def _run_first(ctx, count: int) -> None:
    for _ in range(count):
        function, args = ctx.enqueue.queue.popleft()
        function(ctx, *args)


def test_a_roll_whose_image_the_restored_store_lacks_fails_saying_so(ctx, tmp_path):
    """A store restored from a snapshot older than the database: a roll with rows recorded as
    ingested got a new, empty image, and its bands scored the zeros into wrong defects, the roll
    'done' without a word. Its next frame, or its band, now fails it with the reason."""
    _submit(ctx, tmp_path, "R-lost")
    _run_first(ctx, 3)  # frames 1 to 3: band 0 and the rows below it are in, band 0 is sent
    assert [f.__name__ for f, _ in ctx.enqueue.queue] == ["ingest_frame", "score_band"]
    delete_roll(ctx.store, "R-lost")  # the restored store never had its image
    with ctx.session() as session:
        run_id = session.scalar(select(Run.id).where(Run.roll_id == "R-lost"))
    with pytest.raises(RollError, match=r"its image \(rolls/R-lost\.zarr\) is not in the object "
                       r"store, though 768 rows of it were ingested"):  # fmt: skip
        score_band(ctx, run_id, 0)  # the task records the reason on the roll (test_poison)
    assert ingest_frame(ctx, "R-lost", 4, "incoming/R-lost/frames/000004.tif") == "failed"
    with ctx.session() as session:
        roll = session.get(Roll, "R-lost")
        assert roll.status == "failed"
        assert "is not in the object store, though 768 rows" in roll.failure_reason


def test_a_band_message_from_before_a_restore_is_dropped_not_the_end_of_a_roll(ctx, tmp_path):
    """A restored database hands its run ids out again: a queued score message of the old
    database named a band another roll's run does not have, and failed that roll."""
    _submit(ctx, tmp_path, "R-new")
    ctx.enqueue.drain()
    with ctx.session() as session:
        run = session.scalar(select(Run).where(Run.roll_id == "R-new"))
        run_id, done = run.id, run.bands_done
    assert score_band(ctx, run_id, 7) == "no such band"
    assert score_band(ctx, run_id + 1000, 0) == "no such band"
    with ctx.session() as session:
        roll = session.get(Roll, "R-new")
        assert (roll.status, roll.failure_reason) == ("done", None)
        assert session.get(Run, run_id).bands_done == done


def test_a_roll_whose_group_metadata_alone_is_lost_keeps_its_image(ctx, tmp_path):
    """Only the group's own `zarr.json` gone (its image there): the group is written again and
    the roll goes on, its rows kept — not failed as if its image were lost."""
    _submit(ctx, tmp_path, "R-group")
    _run_first(ctx, 3)
    ctx.store.delete("rolls/R-group.zarr/zarr.json")
    ctx.enqueue.drain()
    with ctx.session() as session:
        roll = session.get(Roll, "R-group")
        assert (roll.status, roll.failure_reason) == ("done", None)
    assert ctx.store.exists("rolls/R-group.zarr/zarr.json")
