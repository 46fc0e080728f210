"""The scheduler sends again the work of a roll left idle with nothing of its kind queued.

A message can vanish for good (a Redis broker restarted without persistence, a task out of
retries after an outage longer than its back-off: `scheduler.resume`). The roll then waits with
nothing moving, and only `rollscan_rolls_idle` and a log line said so, for an operator to run
`rollscan resume`. Each pass the scheduler now does it itself, for a roll with open work and no
progress for `idle_after` (two hours by default: longer than Redis's redelivery of a dead
worker's task, an hour, and a task's whole retry budget, about half an hour) — and only while
the queues its work goes to are empty, so that a backlog is never doubled: with frames, bands or
a finalize waiting in a queue, any of them may be the roll's. Sending work that was only held by
a worker (a countdown) costs a second scoring of a band, never a second count. A roll is sent
its work again at most once per `idle_after`: one that waits for its scanner (no frame to send)
is not asked about every pass, nor one whose queues were busy more often than every 10 minutes
(each asking lists its folder).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update

from scheduler.discovery import LOCK_KEY
from scheduler.resume import Resumed, RollWork, idle_rolls, roll_work, send_work
from storage.database import advisory_lock
from storage.schema import Roll
from worker.context import WorkerContext
from worker.transient_errors import is_transient_error

log = logging.getLogger(__name__)

BUSY_RECHECK = timedelta(minutes=10)  # a roll whose queues were busy is asked about again after
_LONG_AGO = datetime.min.replace(tzinfo=UTC)
PIPELINE_QUEUES = ("ingest", "score", "finalize", "reprocess")


@dataclass
class AutoResume:
    """Sends again the work of idle rolls (the module's docstring); `queue_depths` says how
    many messages wait in each of `PIPELINE_QUEUES` (raising when the broker does not answer:
    then nothing is sent)."""

    idle_after: timedelta
    queue_depths: Callable[[], Mapping[str, int]]
    _sent: dict[str, datetime] = field(default_factory=dict)  # roll → when sent again
    _busy: dict[str, datetime] = field(default_factory=dict)  # roll → when found its queues busy

    def run(self, ctx: WorkerContext, now: datetime | None = None) -> list[Resumed]:
        """Send again what the idle rolls wait for; what was sent. One scheduler at a time (the
        discovery pass's advisory lock): two would each send the same roll's work."""
        with advisory_lock(ctx.engine, LOCK_KEY) as held:
            return self._run(ctx, now) if held else []

    def _run(self, ctx: WorkerContext, now: datetime | None) -> list[Resumed]:
        with ctx.session() as session:
            now = now if now is not None else session.scalar(select(func.now()))
            idle = idle_rolls(session, self.idle_after, now)
        for memory in (self._sent, self._busy):
            for roll_id in memory.keys() - set(idle):  # moving again: forgotten
                del memory[roll_id]
        # a roll whose queues were busy is not asked about (its folder listed) each pass while
        # a backlog lasts: a shift without reprocess workers
        due = [
            r for r in idle
            if now - self._sent.get(r, _LONG_AGO) >= self.idle_after
            and now - self._busy.get(r, _LONG_AGO) >= BUSY_RECHECK
        ]  # fmt: skip
        if not due:
            return []
        try:
            depths = self.queue_depths()
        except Exception as exc:  # the broker away: discovery itself says so
            log.info("idle rolls %s: not sent again, the queues cannot be read (%s)",
                     ", ".join(due), exc)  # fmt: skip
            return []
        sent = []
        for roll_id in due:
            try:
                resumed = self._resume(ctx, roll_id, depths, now)
            except Exception as exc:
                if is_transient_error(exc):  # the pass backs off, and tries again
                    raise
                # one roll's error (its source gone, a bug) neither fails the pass, which would
                # hold up discovery's back-off, nor is met again every pass
                self._sent[roll_id] = now
                log.exception("roll %s: its work could not be sent again", roll_id)
                continue
            if resumed is not None:
                sent.append(resumed)
        return sent

    def _resume(
        self, ctx: WorkerContext, roll_id: str, depths: Mapping[str, int], now: datetime
    ) -> Resumed | None:
        work = roll_work(ctx, roll_id)
        wanted = send_work(ctx, work, dry_run=True)
        busy = sorted(q for q in _queues_of(work, wanted) if depths.get(q, 0))
        if busy:
            self._busy[roll_id] = now
            log.info("roll %s: idle for %s, but %s hold messages that may be its own: not sent "
                     "again yet", roll_id, self.idle_after, ", ".join(busy))  # fmt: skip
            return None
        self._sent[roll_id] = now
        if not (wanted.frames or wanted.bands or wanted.finalizes):
            return None  # it waits for its scanner, or a worker that holds its work
        resumed = send_work(ctx, work)  # what was read above: its folder is not listed twice
        with ctx.session() as session:  # it moved: another scheduler does not send it again
            session.execute(update(Roll).where(Roll.id == roll_id).values(updated_at=now))
        log.warning("no progress for %s and nothing of its work queued: %s", self.idle_after,
                    resumed)  # fmt: skip
        return resumed


def _queues_of(work: RollWork, wanted: Resumed) -> set[str]:
    """The queues the work `wanted` of `work` would go to."""
    queues = {"ingest"} if wanted.frames else set()
    if wanted.finalizes:
        queues.add("finalize")
    banded = {run_id for run_id, _ in wanted.bands}
    queues |= {
        "score" if purpose == "live" else "reprocess"
        for run_id, purpose, _, _ in work.runs
        if run_id in banded
    }
    return queues
