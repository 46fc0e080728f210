"""Deliveries of bands and finalizes whose worker died (issue 13 item 2), on a real PostgreSQL.

A frame's deaths fail its roll (tests/test_poison.py through a real worker and a SIGKILL,
tests/test_repeated_work.py for the count). A band or a finalize knows only its run: a live
run's deaths fail its roll, a reprocess run's fail that run alone — the roll keeps its current
run, defects and grade.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from storage.objectstore import LocalStore
from storage.schema import Model, Roll, Run, TaskDelivery
from storage.settings import Settings
from worker.context import WorkerContext
from worker.deliveries import GIVEN_UP, Delivery, run_counted
from worker.inline import InlineEnqueuer

MAX_DELIVERIES = 2


@pytest.fixture
def ctx(db_engine, tmp_path) -> WorkerContext:
    settings = Settings(data_dir=tmp_path / "d", device="cpu", max_deliveries=MAX_DELIVERIES)
    ctx = WorkerContext(settings, db_engine, LocalStore(tmp_path / "o"), InlineEnqueuer())
    with ctx.session() as session:
        for version in ("m-1", "m-2"):
            session.add(Model(version=version, fabric_type="twill", variant="residual",
                              teacher="t", tile=128, checkpoint_uri="none",
                              sha256=version[-1] * 64, threshold=1.0))  # fmt: skip
    return ctx


def add_roll(ctx: WorkerContext, roll_id: str, status: str) -> None:
    with ctx.session() as session:
        session.add(Roll(id=roll_id, fabric_type="twill", width_mm=100.0, px_per_mm_x=10.0,
                         px_per_mm_y=10.0, status=status))  # fmt: skip


def add_run(ctx: WorkerContext, roll_id: str, version: str, purpose: str, status: str,
            current: bool = False) -> int:  # fmt: skip
    with ctx.session() as session:
        run = Run(roll_id=roll_id, model_version=version, purpose=purpose, status=status,
                  bands_total=2, bands_done=2 if status == "done" else 0, is_current=current,
                  finished_at=datetime.now(UTC) if status == "done" else None)  # fmt: skip
        session.add(run)
        session.flush()
        return run.id


def died(ctx: WorkerContext, delivery: Delivery, times: int) -> None:
    """What `times` SIGKILLed deliveries leave behind: their counts, never taken back."""
    with ctx.session() as session:
        session.add(TaskDelivery(task=delivery.task, key=delivery.key, unfinished=times))


def must_not_run() -> None:
    pytest.fail("a delivery after max_deliveries deaths must not run")


def a_bug() -> None:
    raise RuntimeError("a bug, not a death")


@pytest.mark.parametrize("task", ["score", "finalize"])
def test_a_band_or_finalize_of_a_live_run_that_kills_its_worker_fails_the_roll(ctx, task):
    add_roll(ctx, "R-live", "scoring")
    run_id = add_run(ctx, "R-live", "m-1", "live", "scoring")
    key, what = (f"{run_id}/1", f"band 1 of run {run_id}") if task == "score" else (
        str(run_id), f"finalize of run {run_id}")  # fmt: skip
    delivery = Delivery(task, key, what, run_id=run_id)
    died(ctx, delivery, MAX_DELIVERIES - 1)
    with pytest.raises(RuntimeError):  # one death short: it runs (and here fails in Python)
        run_counted(ctx, delivery, a_bug)
    with ctx.session() as session:  # a Python error is no death: the count is where it was
        assert session.get(TaskDelivery, (task, key)).unfinished == MAX_DELIVERIES - 1
        session.get(TaskDelivery, (task, key)).unfinished = MAX_DELIVERIES
    assert run_counted(ctx, delivery, must_not_run) == GIVEN_UP
    with ctx.session() as session:
        roll, run = session.get(Roll, "R-live"), session.get(Run, run_id)
        assert roll.status == "failed" and run.status == "failed"
        assert roll.failure_reason.startswith(f"{what}: its worker died during each of 2")
        assert "ROLLSCAN_MAX_DELIVERIES = 2" in roll.failure_reason
        assert session.get(TaskDelivery, (task, key)) is None  # the message is acknowledged


def test_a_reprocess_band_that_kills_its_worker_fails_only_its_run(ctx):
    add_roll(ctx, "R-done", "done")
    current = add_run(ctx, "R-done", "m-1", "live", "done", current=True)
    rerun = add_run(ctx, "R-done", "m-2", "reprocess", "scoring")
    delivery = Delivery("score", f"{rerun}/0", f"band 0 of run {rerun}", run_id=rerun)
    died(ctx, delivery, MAX_DELIVERIES)
    assert run_counted(ctx, delivery, must_not_run) == GIVEN_UP
    with ctx.session() as session:
        roll = session.get(Roll, "R-done")
        assert (roll.status, roll.failure_reason) == ("done", None)
        kept, failed = session.get(Run, current), session.get(Run, rerun)
        assert (kept.status, kept.is_current) == ("done", True)
        assert failed.status == "failed" and "died during each of 2" in failed.error


def test_copies_of_a_task_running_at_once_are_no_deaths(ctx):
    """`resume`, a redelivered step or a restarted reprocess driver send a band again while it
    is queued or running: four workers take four copies at once. None of them died, so none
    gives the roll up (each counted the others as deaths: the fourth failed a good roll), and a
    death counted before them still counts for the next delivery."""
    add_roll(ctx, "R-copies", "scoring")
    run_id = add_run(ctx, "R-copies", "m-1", "live", "scoring")
    delivery = Delivery("score", f"{run_id}/0", f"band 0 of run {run_id}", run_id=run_id)
    died(ctx, delivery, MAX_DELIVERIES - 1)
    copies = MAX_DELIVERIES + 2
    together = threading.Barrier(copies)

    def work() -> str:
        together.wait(timeout=30)  # every copy is running before any ends
        return "scored"

    with ThreadPoolExecutor(copies) as pool:
        results = list(pool.map(lambda _: run_counted(ctx, delivery, work), range(copies)))
    assert results == ["scored"] * copies
    with ctx.session() as session:
        assert session.get(Roll, "R-copies").status == "scoring"
        assert session.get(TaskDelivery, ("score", delivery.key)) is None  # the counted one ended
    died(ctx, delivery, MAX_DELIVERIES)
    assert run_counted(ctx, delivery, must_not_run) == GIVEN_UP
