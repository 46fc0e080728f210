"""`rollscan resume`: send again the work a roll waits for, when its messages were lost.

Every step is idempotent, and a redelivered step sends its successor again
(`worker.ingest.finalize_due`), so a roll normally needs none of this. A message can still
vanish for good: a Redis broker restarted without persistence, or a task out of retries after
an outage longer than its back-off (about half an hour: `worker.backoff`). The roll then
waits, `ingesting` or `scoring`, with nothing moving. `resume_roll` reads what the database
says is missing and sends exactly that: the frames under the roll's source not ingested (or
replaced since, a finished roll's too), the pending bands of its open runs, and the finalize
of a run whose bands are all scored. Sending
work that was only queued, not lost, costs a second scoring of a band, never a second count.

`retry_roll` starts a failed roll again once its cause is fixed — a model activated for its
fabric, a corrupt frame replaced under its source: its live run reopens with the bands it had
scored (`worker.roll_rows.reopen_failed_run`), the deaths counted against its frames, bands and
finalize are forgotten, discovery lists it again, and what it waits for is sent as `resume_roll`
sends it. A cause not fixed fails it again, with its reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, func, or_, select, union
from sqlalchemy.orm import Session

from scheduler.discovery import list_roll
from scheduler.roll_cursors import reopen_discovery
from storage.schema import OPEN_ROLL_STATUSES, Band, Frame, Roll, Run, TaskDelivery
from worker.context import WorkerContext
from worker.ingest import announce_live_run, finalize_due, pending_bands
from worker.roll_rows import clear_waiting, reopen_failed_run, replace_failed_current

log = logging.getLogger(__name__)
CLOSED_RUN = ("done", "failed")


@dataclass
class Resumed:
    """What `resume_roll` sent again for one roll: frames, bands and finalizes."""

    roll_id: str
    frames: list[int] = field(default_factory=list)
    bands: list[tuple[int, int]] = field(default_factory=list)  # (run, band)
    finalizes: list[int] = field(default_factory=list)  # runs

    def __str__(self) -> str:
        if not (self.frames or self.bands or self.finalizes):
            return f"roll {self.roll_id}: nothing to resume"
        parts = [f"{len(self.frames)} frames", f"{len(self.bands)} bands",
                 f"{len(self.finalizes)} finalizes"]  # fmt: skip
        return f"roll {self.roll_id}: sent again {', '.join(parts)}"


def idle_rolls(session: Session, idle: timedelta, now: datetime | None = None) -> list[str]:
    """Rolls with work open (an open status or an open run) and no progress for `idle`:
    no frame ingested, no band scored, no run started since."""
    now = now if now is not None else session.scalar(select(func.now()))
    of_roll = Run.roll_id == Roll.id
    last_band = (
        select(func.max(Band.scored_at)).join(Run, Run.id == Band.run_id).where(of_roll)
    ).scalar_subquery()
    last_run = select(func.max(Run.created_at)).where(of_roll).scalar_subquery()
    last = func.greatest(Roll.updated_at, last_band, last_run)  # PostgreSQL skips NULLs
    # the rolls with open work first (an index each), then their progress: an OR over every
    # roll of the archive was planned as a scan of all of them, JIT-compiled on each metrics
    # pass (300 ms at 20,000 rolls, to say 0)
    open_work = union(
        select(Roll.id.label("roll_id")).where(Roll.status.in_(OPEN_ROLL_STATUSES)),
        select(Run.roll_id).where(Run.status.not_in(CLOSED_RUN)),
    ).subquery()
    rows = session.scalars(
        select(Roll.id)
        .join(open_work, open_work.c.roll_id == Roll.id)
        .where(Roll.status != "failed", last < now - idle)
        .order_by(Roll.id)
    )
    return list(rows)


@dataclass
class RollWork:
    """What a roll waits for, as the database and its source folder say (`roll_work`)."""

    roll_id: str
    frames: list[tuple[int, str]]  # (seq, key): under its source, not ingested or replaced since
    runs: list[tuple[int, str, bool, list[int]]]  # open runs: (id, purpose, finalize due, pending)


def roll_work(ctx: WorkerContext, roll_id: str) -> RollWork:
    """What `roll_id` waits for (see the module's docstring); ValueError for an unknown roll."""
    with ctx.session() as session:
        roll = session.get(Roll, roll_id)
        if roll is None:
            raise ValueError(f"unknown roll {roll_id!r}")
        ingested = dict(
            session.execute(select(Frame.seq, Frame.etag).where(Frame.roll_id == roll_id)).all()
        )
        runs = session.scalars(
            select(Run).where(Run.roll_id == roll_id, Run.status.not_in(CLOSED_RUN)).order_by(Run.id)
        ).all()  # fmt: skip
        work = [
            (run.id, run.purpose, finalize_due(run), pending_bands(session, run.id))
            for run in runs
        ]  # fmt: skip
        source, status, total = roll.source, roll.status, roll.frames_total
    frames = []
    # a done roll's too: frames replaced since
    if (status in OPEN_ROLL_STATUSES or status == "done") and source:
        _, listed, twice = list_roll(ctx.store, source.rstrip("/"))  # as discovery lists it
        for seq, keys in twice.items():
            log.warning("roll %s: frame %d is numbered by %s: not sent", roll_id, seq, ascii(keys))
        frames = [
            (seq, info.key) for seq, info in listed.items()
            if (total is None or seq <= total) and ingested.get(seq) != info.etag
        ]  # fmt: skip
    return RollWork(roll_id, sorted(frames), work)


def send_work(
    ctx: WorkerContext, work: RollWork, dry_run: bool = False, frames_only: bool = False
) -> Resumed:
    """Send `work` again; `dry_run`: only say; `frames_only`: its frames alone (`retry_roll`
    has sent its live run's bands)."""
    resumed = Resumed(work.roll_id)
    for seq, key in work.frames:
        resumed.frames.append(seq)
        if not dry_run:
            ctx.enqueue.ingest(work.roll_id, seq, key)
    for run_id, purpose, finalize, pending in [] if frames_only else work.runs:
        for band in pending:
            resumed.bands.append((run_id, band))
            if not dry_run:
                ctx.enqueue.score(run_id, band, reprocess=purpose != "live")
        if finalize and not pending:
            resumed.finalizes.append(run_id)
            if not dry_run:
                ctx.enqueue.finalize(run_id)
    if not dry_run:
        with ctx.session() as session:  # sent again: a task's "waiting:" note is out of date
            clear_waiting(session, work.roll_id)
        log.info("%s", resumed)
    return resumed


def resume_roll(
    ctx: WorkerContext, roll_id: str, dry_run: bool = False, frames_only: bool = False
) -> Resumed:
    """Send again what `roll_id` waits for (see the module's docstring); `dry_run`: only say;
    `frames_only`: its frames alone (`retry_roll` has sent its live run's bands)."""
    return send_work(ctx, roll_work(ctx, roll_id), dry_run, frames_only)


def retry_roll(ctx: WorkerContext, roll_id: str) -> Resumed:
    """Start the failed roll `roll_id` again (see the module's docstring); ValueError for a roll
    that has not failed."""
    with ctx.session() as session:
        roll = session.get(Roll, roll_id, with_for_update=True)
        if roll is None:
            raise ValueError(f"unknown roll {roll_id!r}")
        if roll.status != "failed":
            raise ValueError(
                f"roll {roll_id} has not failed (status {roll.status}): `rollscan resume "
                f"{roll_id}` sends what it waits for"
            )
        live = session.scalar(
            select(Run).where(Run.roll_id == roll_id, Run.purpose == "live").with_for_update()
        )
        frames = TaskDelivery.key.startswith(f"{roll_id}/", autoescape=True)  # ids may hold _ %
        deaths = and_(TaskDelivery.task == "ingest", frames)
        if live is not None:
            deaths = or_(
                deaths,
                and_(TaskDelivery.task == "score", TaskDelivery.key.startswith(f"{live.id}/")),
                and_(TaskDelivery.task == "finalize", TaskDelivery.key == str(live.id)),
            )
            if live.status == "failed":  # `advance_run` turns it "scoring" again
                reopen_failed_run(session, live, "pending")
        session.execute(delete(TaskDelivery).where(deaths))
        if live is not None and live.status == "done":  # it failed on a frame the run never read
            roll.status = "done"
            # a reprocess run that was current failed with the roll: the live run, done on the
            # roll's pixels, shows it again (`rollscan reprocess` can start the other again)
            replace_failed_current(session, roll_id)
        else:
            roll.status = "ingesting" if roll.rows_ingested else "registered"
        roll.failure_reason, roll.updated_at = None, func.now()
        reopen_discovery(session, roll_id)
    log.info("roll %s: started again", roll_id)
    run_id, bands, finalize = announce_live_run(ctx, roll_id)
    resumed = resume_roll(ctx, roll_id, frames_only=True)
    resumed.bands = [(run_id, band) for band in bands]
    resumed.finalizes = [run_id] if finalize else []
    return resumed
