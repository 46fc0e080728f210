"""Work done again, without Celery (issue 13): a delivery counts only deaths, not errors or
retries, and gives its roll up after max_deliveries of them (item 2); finalizing a done run
again keeps its defects and points (item 11).
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os

import numpy as np
import pytest
import tifffile
from fixtures_ingest import BAND, WIDTH, drain, frame_bytes, put_frame, register, roll_and_run
from sqlalchemy import select, text

from results.grade_store import grade_run
from results.grading_rules import GradingRules
from storage.schema import Defect, TaskDelivery
from worker.deliveries import Delivery, run_counted
from worker.finalize import finalize_run
from worker.ingest import ingest_frame, roll_updated

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
    assert run_counted(ctx, delivery, lambda: "ran", retries=1) == "ran"
    with ctx.session() as session:
        assert session.get(TaskDelivery, ("ingest", "R-dead/1")) is None  # success forgets
        session.add(TaskDelivery(task="ingest", key="R-dead/1", unfinished=2))
    assert run_counted(ctx, delivery, lambda: pytest.fail("must not run")) == "failed"
    roll, _ = roll_and_run(ctx, "R-dead")
    assert roll.status == "failed" and "died during each of 2 deliveries" in roll.failure_reason


def test_a_retried_message_that_kills_its_workers_is_given_up_too(make_ctx):
    """The broker redelivers a Celery retry with its retry number: each such redelivery after a
    death counts on from the deaths before it; only a higher retry number starts again."""
    ctx = make_ctx(max_deliveries=2)
    register(ctx, "R-retried", 1)
    delivery = Delivery("ingest", "R-retried/1", "frame 1", roll_id="R-retried")

    def count() -> tuple[int, int]:
        with ctx.session() as session:
            row = session.get(TaskDelivery, ("ingest", "R-retried/1"))
            return row.unfinished, row.retries

    def killed(retries: int) -> None:
        """A delivery whose worker process dies mid-way: counted, never uncounted."""
        child = multiprocessing.get_context("fork").Process(target=_deliver_and_die,
                                                            args=(ctx, delivery, retries))  # fmt: skip
        child.start()
        child.join(60)
        assert child.exitcode == 17

    with ctx.session() as session:  # a first message that died once, then was retried
        session.add(TaskDelivery(task="ingest", key="R-retried/1", unfinished=1))
    killed(1)  # retry 1's first delivery: the count starts again
    assert count() == (1, 1)
    killed(1)  # redelivered after that death: it counts on
    assert count() == (2, 1)
    assert run_counted(ctx, delivery, lambda: pytest.fail("must not run"), retries=1) == "failed"
    roll, _ = roll_and_run(ctx, "R-retried")
    assert roll.status == "failed" and "died during each of 2 deliveries" in roll.failure_reason


def _deliver_and_die(ctx, delivery: Delivery, retries: int) -> None:
    ctx.engine.dispose(close=False)  # the parent's pooled connections stay the parent's
    run_counted(ctx, delivery, lambda: os._exit(17), retries=retries)


def test_a_roll_keeps_its_own_bands_when_the_band_height_setting_changes(make_ctx):
    """ROLLSCAN_BAND_HEIGHT changed while a roll was half in: its zarr shards are one band tall,
    so its remaining bands are the stored ones', and it finishes."""
    ctx = make_ctx()
    register(ctx, "R-height", 2)
    key = put_frame(ctx, "R-height", 1, frame_bytes(seed=1))
    assert ingest_frame(ctx, "R-height", 1, key) == "ingested"
    later = dataclasses.replace(
        ctx, settings=ctx.settings.model_copy(update={"band_height": 2 * BAND})
    )
    key = put_frame(ctx, "R-height", 2, frame_bytes(seed=2))
    assert ingest_frame(later, "R-height", 2, key) == "ingested"
    drain(later)
    roll, run = roll_and_run(ctx, "R-height")
    assert (roll.status, run.bands_total, run.bands_done) == ("done", 2, 2)


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
