"""The control plane's loop: a discovery pass every `interval_s`, backing off on failure.

Nothing is lost when a pass fails or the process dies: each pass starts from the cursors that
`scheduler.discovery` keeps in PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from scheduler.auto_resume import AutoResume
from scheduler.discovery import discover_once
from scheduler.stalls import DEFAULT_STALL_AFTER
from worker.backoff import Backoff
from worker.context import WorkerContext
from worker.transient_errors import is_transient_error

log = logging.getLogger(__name__)


def run_scheduler(
    ctx: WorkerContext,
    interval_s: float,
    stop_event: threading.Event,
    *,
    stall_after: timedelta | None = DEFAULT_STALL_AFTER,
    metrics: Any = None,
    max_backoff_s: float = 300.0,
    auto_resume: AutoResume | None = None,
) -> int:
    """Discover every `interval_s` until `stop_event` is set; returns the passes run.

    A failed pass waits `interval_s` · 2^k (k = failures in a row, at most `max_backoff_s`:
    `worker.backoff`) and tries again; nothing is lost, the next pass starts from the database's cursors.
    `metrics` (a `scheduler.scheduler_metrics.SchedulerMetrics`) is updated after each pass;
    `auto_resume` then sends again the work of rolls idle with nothing of it queued."""
    failures = passes = 0
    while not stop_event.is_set():
        passes += 1
        try:
            report = discover_once(ctx, stall_after=stall_after)
            if metrics is not None:
                metrics.update(ctx, report)
            if auto_resume is not None:
                resumed = auto_resume.run(ctx)
                if metrics is not None:
                    metrics.rolls_resumed(len(resumed))
        except Exception as exc:
            failures += 1
            delay = Backoff(interval_s, max_backoff_s).delay(failures)
            transient = is_transient_error(exc)
            if metrics is not None:
                metrics.pass_failed("transient" if transient else "error")
            if transient:
                log.warning("scheduler: pass failed (%s: %s); retrying in %.1f s",
                            type(exc).__name__, (str(exc).splitlines() or [""])[0][:300], delay)  # fmt: skip
            else:
                log.exception("scheduler: pass failed; retrying in %.1f s", delay)
            stop_event.wait(delay)
            continue
        if failures:
            log.info("scheduler: resumed after %d failed pass(es)", failures)
            failures = 0
        if report:
            log.info(
                "discovered: %d new rolls, %d frames enqueued, %d complete, %d stalled, %d problems",
                len(report.new_rolls), len(report.frames_enqueued), len(report.completed),
                len(report.stalled), len(report.problems),
            )  # fmt: skip
        stop_event.wait(interval_s)
    return passes
