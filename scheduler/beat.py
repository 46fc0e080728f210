"""Nightly grading on a Celery beat schedule.

The task is here, not in `worker.tasks`, because grading is the control plane's
(`results.grade_store`) and the worker does not import the scheduler. This module registers
`rollscan.grade_nightly` on the worker's app (`worker.app.app`), routes it to its own queue
``grade`` and sets the beat schedule: every day at `ROLLSCAN_GRADE_AT` (HH:MM) in
`ROLLSCAN_TIMEZONE`. Two ways to run it:

- ``rollscan scheduler --beat``: beat embedded in the scheduler process; the task runs right
  there (no broker round trip, no extra worker).
- ``celery -A scheduler.beat beat`` with a consumer ``celery -A scheduler.beat worker -Q grade``.

Each grading takes the rolls whose current run finished since the previous grading began
(kept in ``discovery_cursors`` as name ``grading``; minus a 10-minute margin for clock skew
between workers and the database), so a night missed is made up by the next grading — the
embedded beat's at once when it starts again (`InProcessScheduler`) — and any current run
without a grade whenever it finished (a failed reprocess run hands its
roll back to the run before it, which does not finish again); a roll graded twice is an upsert
(`results.grade_store`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from celery import Celery
from celery.beat import Scheduler, Service
from celery.schedules import crontab
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from results.grade_store import GradeRow, grade_rolls
from results.grading_rules import GradingRules, rules_from_file
from storage.schema import DiscoveryCursor
from storage.settings import Settings, get_settings
from worker.app import app as worker_app
from worker.backoff import Backoff

log = logging.getLogger(__name__)

TASK = "rollscan.grade_nightly"
QUEUE = "grade"
CURSOR = "grading"
CLOCK_MARGIN = timedelta(minutes=10)  # runs this close before the mark are graded again


def grade_since_last(
    session: Session, rules_for: Callable[[str], GradingRules] | None = None
) -> list[GradeRow]:
    """Grade the rolls finished since the last grading began, and any current run not graded
    yet, then move the mark to now.

    Two gradings never overlap: the mark's row stays locked, on a connection of its own, until
    the mark moves — which it does only once every roll was graded. Each roll's grade commits
    as it is made (`session`'s transactions), so that a long grading — the first night's, over
    the whole archive — holds no roll's run longer than its own grading; one that stops half-way
    leaves its grades, and the next grades those rolls again (a regrade replaces)."""
    with Session(session.get_bind()) as marker:
        marker.execute(
            insert(DiscoveryCursor).values(name=CURSOR, cursor=None).on_conflict_do_nothing()
        )
        mark = marker.scalar(select(DiscoveryCursor).where(DiscoveryCursor.name == CURSOR).with_for_update())  # fmt: skip
        started = marker.scalar(select(func.now()))
        # a margin for clocks: `finished_at` comes from the worker's clock, `started` from the
        # database's
        since = datetime.fromisoformat(mark.cursor) - CLOCK_MARGIN if mark.cursor else None
        rows = grade_rolls(session, since=since, rules_for=rules_for, ungraded=True,
                           commit_each=True)  # fmt: skip
        mark.cursor, mark.updated_at = started.isoformat(), started
        marker.commit()
    log.info("graded %d rolls finished since %s", len(rows), since or "the beginning")
    return rows


def schedule(settings: Settings) -> dict[str, Any]:
    hour, minute = (int(part) for part in settings.grade_at.split(":"))
    return {
        "grade-nightly": {
            "task": TASK,
            "schedule": crontab(hour=hour, minute=minute),
            "options": {"queue": QUEUE},
        }
    }


def configure(app: Celery, settings: Settings) -> Celery:
    app.conf.beat_schedule = schedule(settings)
    app.conf.timezone = settings.timezone
    # Celery caches the zone the first time it is read: a later configure (a beat started with
    # other settings) moved only the log's zone, the gradings stayed at the old one's hour
    vars(app).pop("timezone", None)
    app.conf.task_routes = {**(app.conf.task_routes or {}), TASK: {"queue": QUEUE}}
    return app


app = configure(worker_app, get_settings())


@app.task(name=TASK)
def grade_nightly() -> int:
    from worker.runtime import process_context

    ctx = process_context()  # grading sends no work
    rules_for = rules_from_file(ctx.settings.grading_rules)  # ROLLSCAN_GRADING_RULES
    with ctx.session() as session:
        return len(grade_since_last(session, rules_for))


def last_grading(session: Session) -> datetime | None:
    """When the last grading began (the mark's time), or None before the first."""
    return session.scalar(select(DiscoveryCursor.updated_at).where(DiscoveryCursor.name == CURSOR))


GRADING_RETRY = Backoff(base_s=60, cap_s=1800)  # a grading that failed: again within the night


class InProcessScheduler(Scheduler):
    """Beat that runs due tasks in its own process instead of sending them to a broker.

    Its schedule lives in memory, so on start the grading entry takes the last grading's time
    from the database: a grading time that passed while the process was down (a deploy, a
    reboot) is due at once, once. A grading that fails (the database restarting at that minute)
    stays due and is tried again after `GRADING_RETRY`'s back-off, not the next night."""

    producer = None  # nothing is sent: no broker connection

    def __init__(self, *args: Any, last_run: Callable[[], datetime | None] | None = None,
                 clock: Callable[[], float] = time.monotonic, **kwargs: Any) -> None:  # fmt: skip
        self._last_run, self._clock = last_run, clock
        self._failed: Any = None  # the entry whose task failed, to run again
        self._failures, self._retry_at = 0, 0.0
        super().__init__(*args, **kwargs)

    def install_default_entries(self, data: Any) -> None:
        """Only our schedule (no result backend to clean up)."""

    def setup_schedule(self) -> None:
        super().setup_schedule()
        entry = self.schedule.get("grade-nightly")
        if entry is None or self._last_run is None:
            return
        try:
            last = self._last_run()
        except Exception:  # the database down at start: the schedule starts from now
            log.exception("beat: the last grading's time could not be read")
            return
        if last is not None:
            entry.last_run_at = last.astimezone(self.app.timezone)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if self._failed is not None and self._clock() >= self._retry_at:
            self._run(self._failed)
            return 0.0
        delay = super().tick(*args, **kwargs)  # Celery's own: the next night is reserved
        if self._failed is not None:
            delay = min(delay, max(0.0, self._retry_at - self._clock()))
        return delay

    def apply_async(
        self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        entry = self.reserve(entry) if advance else entry
        return self._run(entry)

    def _run(self, entry: Any) -> Any:
        try:
            result = self.app.tasks[entry.task](*entry.args, **entry.kwargs)
        except Exception:  # run again after the back-off, within the night
            delay = GRADING_RETRY.delay(self._failures)
            self._failed, self._failures = entry, self._failures + 1
            self._retry_at = self._clock() + delay
            log.exception("beat: %s failed; trying again in %.0f s", entry.task, delay)
            return None
        self._failed, self._failures = None, 0
        return result


def _last_grading_of_this_site() -> datetime | None:
    from worker.runtime import process_context

    with process_context().session() as session:
        return last_grading(session)


def start_embedded_beat(settings: Settings | None = None) -> tuple[threading.Thread, Service]:
    """Beat in a daemon thread of this process, running its tasks here; `service.stop()`
    ends it (within a minute)."""
    settings = settings or get_settings()
    configure(app, settings)
    scheduler = partial(InProcessScheduler, last_run=_last_grading_of_this_site)
    service = Service(app, scheduler_cls=scheduler, max_interval=60, remote_control=False)
    thread = threading.Thread(target=service.start, name="rollscan-beat", daemon=True)
    thread.start()
    log.info("beat: grading every day at %s (%s)", settings.grade_at, settings.timezone)
    return thread, service
