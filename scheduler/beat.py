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
between workers and the database), so a night missed while nothing ran is made up by the next
one, and any current run without a grade whenever it finished (a failed reprocess run hands its
roll back to the run before it, which does not finish again); a roll graded twice is an upsert
(`results.grade_store`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from celery.beat import Scheduler, Service
from celery.schedules import crontab
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from results.grade_store import GradeRow, grade_rolls, rules_from_file
from results.grading import GradingRules
from storage.schema import DiscoveryCursor
from storage.settings import Settings, get_settings
from worker.app import app as worker_app

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

    One transaction: the mark row is locked (two gradings never overlap) and moves only if
    the grading commits."""
    session.execute(
        insert(DiscoveryCursor).values(name=CURSOR, cursor=None).on_conflict_do_nothing()
    )
    mark = session.scalar(select(DiscoveryCursor).where(DiscoveryCursor.name == CURSOR).with_for_update())  # fmt: skip
    started = session.scalar(select(func.now()))
    # a margin for clocks: `finished_at` comes from the worker's clock, `started` from the database's
    since = datetime.fromisoformat(mark.cursor) - CLOCK_MARGIN if mark.cursor else None
    rows = grade_rolls(session, since=since, rules_for=rules_for, ungraded=True)
    mark.cursor, mark.updated_at = started.isoformat(), started
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


class InProcessScheduler(Scheduler):
    """Beat that runs due tasks in its own process instead of sending them to a broker."""

    producer = None  # nothing is sent: no broker connection

    def install_default_entries(self, data: Any) -> None:
        """Only our schedule (no result backend to clean up)."""

    def apply_async(
        self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        entry = self.reserve(entry) if advance else entry
        try:
            return self.app.tasks[entry.task].apply(entry.args, entry.kwargs)
        except Exception:  # the next run grades everything since the last good one
            log.exception("beat: %s failed", entry.task)
            return None


def start_embedded_beat(settings: Settings | None = None) -> tuple[threading.Thread, Service]:
    """Beat in a daemon thread of this process, running its tasks here; `service.stop()`
    ends it (within a minute)."""
    settings = settings or get_settings()
    configure(app, settings)
    service = Service(app, scheduler_cls=InProcessScheduler, max_interval=60, remote_control=False)
    thread = threading.Thread(target=service.start, name="rollscan-beat", daemon=True)
    thread.start()
    log.info("beat: grading every day at %s (%s)", settings.grade_at, settings.timezone)
    return thread, service
