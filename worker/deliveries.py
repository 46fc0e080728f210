"""Poison messages: a task whose worker dies on it too often fails its roll instead.

Tasks are acknowledged late and rejected back to the queue when their worker is lost
(`worker.app`), so that a band of a worker killed mid-way is scored by the next one. The same
rule would deliver for ever a frame that itself kills the worker (out of memory, a segfault in
a codec): the roll would never fail and the queue would stay wedged behind it.

So each delivery of ingest (per roll and frame), score (per run and band), finalize (per
run) and train (per request) counts itself in PostgreSQL (`task_deliveries.unfinished + 1`)
before it works, and uncounts itself when it ends in any way Python sees: success, an error, a
retry. Only
deliveries whose process died stay counted. Copies of one task running at the same time (sent
again by `resume`, a redelivered step or a restarted reprocess driver) are no deaths: the
counted delivery holds an advisory lock on its key while it runs, and a copy that finds it held
runs uncounted. A delivery that finds `max_deliveries` of those
before it does not run: it fails the roll (a reprocess run only, for a reprocess band) with the
reason and returns normally, so its message is acknowledged and the queue goes on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, func, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from storage.database import advisory_lock
from storage.schema import Band, Frame, Roll, Run, TaskDelivery
from worker.context import WorkerContext
from worker.roll_rows import fail_roll, note_waiting, replace_failed_current

log = logging.getLogger(__name__)
GIVEN_UP = "failed"  # what a task returns when it gave up its roll


@dataclass(frozen=True)
class Delivery:
    """One task's identity across its deliveries, and how to give its roll up."""

    task: str  # ingest, score, finalize, train
    key: str  # unique per task: "R-1/3", "17/2", "17", a training request's digest
    what: str  # for people: "frame 3 (incoming/R-1/frames/000003.tif)"
    roll_id: str | None = None  # ingest knows it; score and finalize go through their run
    run_id: int | None = None


def run_counted(
    ctx: WorkerContext, delivery: Delivery, work: Callable[[], Any], *, retries: int = 0
) -> Any:
    """Run `work()` as one counted delivery of `delivery` (module docstring).

    `retries`: the message's Celery retry number. A retry is a new message, sent by a delivery
    that ended in Python (it raised to retry): whatever the messages before it left counted is
    no death — that delivery's decrement may have failed with the database it waited for — so
    the first delivery of a higher retry number starts the count again. The broker delivers
    the same message again, retry number and all, after its worker died: that one counts on."""
    with advisory_lock(ctx.engine, _lock_key(delivery)) as sole:
        if not sole:
            # another delivery of it is running now (a copy sent by `resume`, by a redelivered
            # step, by a restarted reprocess driver): alive, so it is no death, and this copy
            # runs uncounted — the one counted holds the lock until it ends
            log.info("%s %s: another delivery of it is running; this one is not counted",
                     delivery.task, delivery.what)  # fmt: skip
            return work()
        died = _begin(ctx, delivery, retries) - 1  # earlier deliveries that never ended
        if died >= ctx.settings.max_deliveries:
            _give_up(ctx, delivery, died)
            return GIVEN_UP
        succeeded = False
        try:
            result = work()
            succeeded = True
            return result
        finally:
            _end(ctx, delivery, succeeded)


def _lock_key(delivery: Delivery) -> int:
    """The advisory lock of a task's deliveries: the counted one holds it while it runs, so the
    deliveries counted before one that takes it are the dead ones, never a live copy."""
    digest = hashlib.blake2b(f"delivery {delivery.task} {delivery.key}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _begin(ctx: WorkerContext, delivery: Delivery, retries: int) -> int:
    """Count this delivery (committed at once: a kill must not undo it); return the count."""
    stmt = insert(TaskDelivery).values(
        task=delivery.task, key=delivery.key, unfinished=1, retries=retries
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[TaskDelivery.task, TaskDelivery.key],
        set_={
            "unfinished": case(
                (TaskDelivery.retries < retries, 1), else_=TaskDelivery.unfinished + 1
            ),
            "retries": func.greatest(TaskDelivery.retries, retries),
            "started_at": func.now(),
        },
    )
    with ctx.session() as session:
        count = session.scalar(stmt.returning(TaskDelivery.unfinished))
    if count > 1:
        log.warning("%s %s: delivery %d, %d before it died with their worker",
                    delivery.task, delivery.what, count, count - 1)  # fmt: skip
    return count


def _end(ctx: WorkerContext, delivery: Delivery, succeeded: bool) -> None:
    where = (TaskDelivery.task == delivery.task, TaskDelivery.key == delivery.key)
    try:
        with ctx.session() as session:
            if succeeded:  # done for good: forget the deaths too
                session.execute(delete(TaskDelivery).where(*where))
            else:
                session.execute(
                    update(TaskDelivery)
                    .where(*where, TaskDelivery.unfinished > 0)
                    .values(unfinished=TaskDelivery.unfinished - 1)
                )
    except Exception:  # the database is away: the task's own error (a retry) matters more
        log.warning("%s %s: could not record the end of a delivery", delivery.task,
                    delivery.what, exc_info=True)  # fmt: skip


def _give_up(ctx: WorkerContext, delivery: Delivery, died: int) -> None:
    fail_delivery(
        ctx, delivery,
        f"{delivery.what}: its worker died during each of {died} deliveries (killed, out of "
        f"memory or a crash, e.g. in a decoder); given up after ROLLSCAN_MAX_DELIVERIES = "
        f"{ctx.settings.max_deliveries} instead of delivered again",
    )  # fmt: skip


def fail_delivery(ctx: WorkerContext, delivery: Delivery, reason: str) -> None:
    """Fail what `delivery` works for with `reason` — its roll, or its reprocess run alone;
    a training has neither: the reason is logged — and forget its deliveries."""
    with ctx.session() as session:
        roll_id, run = _target(session, delivery)
        if run is not None and run.purpose == "reprocess":
            _fail_run_only(session, run, reason)
        elif roll_id is not None:
            fail_roll(session, roll_id, reason)
        session.execute(
            delete(TaskDelivery).where(
                TaskDelivery.task == delivery.task, TaskDelivery.key == delivery.key
            )
        )
    log.error("%s%s", _where(delivery, roll_id, run), reason)


def note_delivery_waiting(ctx: WorkerContext, delivery: Delivery, reason: str) -> None:
    """Record on the roll (or reprocess run) `delivery` works for why its work stopped and the
    roll did not fail (`worker.roll_rows.note_waiting`); a training has neither: logged only.
    The database may be what is away: then the log alone says it."""
    roll_id, run = delivery.roll_id, None
    try:
        with ctx.session() as session:
            roll_id, run = _target(session, delivery)
            if roll_id is not None and not _done_meanwhile(session, delivery):
                note_waiting(session, roll_id, run, reason)
    except Exception:
        log.warning("%s: its waiting could not be recorded", delivery.what, exc_info=True)
    log.error("%s%s", _where(delivery, roll_id, run), reason)


def _target(session: Session, delivery: Delivery) -> tuple[str | None, Run | None]:
    """The roll `delivery` works for, and its run (score, finalize); a training has neither."""
    if delivery.run_id is None:
        return delivery.roll_id, None
    run = session.get(Run, delivery.run_id)
    return (run.roll_id if run is not None else None), run


def _where(delivery: Delivery, roll_id: str | None, run: Run | None) -> str:
    """The log line's prefix: the roll, and a reprocess run's number (it fails alone)."""
    if run is not None and run.purpose == "reprocess":
        return f"roll {roll_id} (reprocess run {run.id}): "
    if roll_id is not None:
        return f"roll {roll_id}: "
    return f"roll (run {delivery.run_id}): " if delivery.run_id is not None else ""


def _done_meanwhile(session: Session, delivery: Delivery) -> bool:
    """Whether another copy of the work did it (sent again by `resume` while this one waited out
    its retries): then nothing waits for this one. A frame counts as done once it is in (a
    changed frame's second ingest that gives up is in the log only); a finalize's finished run
    leaves an open roll no longer (`note_waiting` reads the status)."""
    number = delivery.key.rpartition("/")[2]  # "run/band", "roll/frame" (`worker.tasks`)
    if delivery.task == "score":
        band = session.get(Band, (delivery.run_id, int(number)))
        return band is None or band.status == "done"
    if delivery.task == "ingest":
        return session.get(Frame, (delivery.roll_id, int(number))) is not None
    return False


def _fail_run_only(session: Session, run: Run, reason: str) -> None:
    """A reprocess run fails alone: the roll keeps its current run, defects and grade.

    The failed run is itself current when a changed frame reopened it after it had taken the
    roll over: its defects read the old pixels, so the run asked for last of those finalized on
    the new ones takes its place now, or (none yet) the first to finalize (`worker.finalize`)."""
    session.get(Roll, run.roll_id, with_for_update=True)  # the roll before the run, as finalize
    session.refresh(run, with_for_update=True)  # a finalize committing meanwhile stays done
    if run.status in ("done", "failed"):
        return
    run.status, run.error, run.finished_at = "failed", reason[:2000], func.now()
    replace_failed_current(session, run.roll_id)
