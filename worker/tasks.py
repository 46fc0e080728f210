"""Celery tasks: thin wrappers over the pipeline's plain functions (ingest, score, finalize, train).

Each task runs with its process's `WorkerContext` (`worker.runtime`: built lazily, after the
prefork, so CUDA and database pools are created in the child) and retries with exponential
back-off (`worker.backoff`) on transient database, object-store and broker errors
(`worker.transient_errors`). A bad roll is marked failed inside the pipeline; other rolls go
on. A task whose worker keeps dying on it fails its roll after `max_deliveries`
(`worker.deliveries`; a training is given up), and so, at once, does a task failing with an
error no retry mends, its reason recorded before the error goes to the log. Only code that sends work through Celery (to a broker, or eagerly in this
process) imports this module; the rest takes its context from `worker.runtime`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from typing import Any

from celery import Task
from celery.signals import worker_init

from worker.app import QUEUES, app
from worker.backoff import RETRY_LATER_CAP_S, TRANSIENT_MAX_RETRIES, TRANSIENT_RETRY, Backoff
from worker.context import LOCK_WAIT_LIMIT, RetryLater, WorkerContext
from worker.deliveries import Delivery, fail_delivery, note_delivery_waiting, run_counted
from worker.finalize import finalize_run
from worker.ingest import ingest_frame
from worker.runtime import process_context
from worker.scoring import score_band
from worker.transient_errors import is_transient_error

log = logging.getLogger(__name__)

WAITS_HEADER = "rollscan_waits"  # a message header: the RetryLater retries among its retries


class CeleryEnqueuer:
    """Sends the pipeline's follow-up work as Celery tasks: to the broker's queues, or run at
    once in this process when the app is eager (no broker configured)."""

    def ingest(self, roll_id: str, seq: int, key: str) -> None:
        ingest.apply_async((roll_id, seq, key))

    def score(self, run_id: int, band_index: int, reprocess: bool = False) -> None:
        # a reprocess run's bands go to the `reprocess` queue: live rolls keep their own
        (score_reprocess if reprocess else score).apply_async((run_id, band_index))

    def finalize(self, run_id: int) -> None:
        finalize.apply_async((run_id,))


def context() -> WorkerContext:
    """The process's worker context (`worker.runtime`), its work sent through Celery."""
    return process_context(CeleryEnqueuer())


def _run_task(task: Task, function: Any, *args: Any, delivery: Delivery | None = None) -> Any:
    unbounded = LOCK_WAIT_LIMIT.set(None)  # an eager task sent by discovery runs in its context
    try:
        return _run(task, function, *args, delivery=delivery)
    finally:
        LOCK_WAIT_LIMIT.reset(unbounded)


def _run(task: Task, function: Any, *args: Any, delivery: Delivery | None) -> Any:
    try:
        ctx = context()  # the database away, or its schema not upgraded yet: retried
    except Exception as exc:
        if not is_transient_error(exc):
            raise
        raise _retry(task, args, exc) from exc
    try:
        if delivery is None:
            return function(ctx, *args)
        retries = task.request.retries or 0
        return run_counted(ctx, delivery, lambda: function(ctx, *args), retries=retries)
    except RetryLater as exc:
        waits = _waits(task)
        countdown = Backoff(exc.countdown, RETRY_LATER_CAP_S).delay(waits)
        raise task.retry(exc=exc, countdown=countdown, max_retries=None,
                         headers={WAITS_HEADER: waits + 1}) from exc  # fmt: skip
    except Exception as exc:
        if not is_transient_error(exc):
            if delivery is not None:  # its roll fails with the reason, not waits for ever
                _failed_for_good(ctx, delivery, exc)
            raise
        raise _retry(task, args, exc, ctx, delivery) from exc


def _waits(task: Task) -> int:
    """How many of the task's retries were waits for other work (`RetryLater`): they do not
    spend its transient errors' budget — a frame that had waited 12 times for the one before
    it was given up at its first transient error, its roll left ingesting for good."""
    try:
        return int((task.request.headers or {}).get(WAITS_HEADER, 0))
    except (TypeError, ValueError):
        return 0


def _retry(task: Task, args: tuple, exc: Exception, ctx: WorkerContext | None = None,
           delivery: Delivery | None = None) -> Exception:  # fmt: skip
    """The task's retry after a transient error, with back-off, said in one line. Out of
    retries, the roll waits for `resume` (or the scheduler's auto-resume): its reason, only in
    the worker's log before, is recorded on it (`note_delivery_waiting`)."""
    waits = _waits(task)
    transient = task.request.retries - waits
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if transient < TRANSIENT_MAX_RETRIES:
        log.warning("%s%s: transient error, retry in %ss: %s", task.name, args,
                    TRANSIENT_RETRY.delay(transient), first)  # fmt: skip
    else:
        minutes = sum(map(TRANSIENT_RETRY.delay, range(transient))) / 60
        reason = (f"{delivery.what if delivery else task.name} gave up after {transient} retries "
                  f"over {minutes:.0f} min of transient errors, the last: {type(exc).__name__}: "
                  f"{first}")  # fmt: skip
        if delivery is None or delivery.task != "train":  # a training is asked for again
            reason += ("; the scheduler sends it again once the roll is idle for its "
                       "--resume-idle (2 h by default), or `rollscan resume`")  # fmt: skip
        if ctx is not None and delivery is not None:
            note_delivery_waiting(ctx, delivery, reason)
        else:  # the database was away before the task could start
            log.error("%s%s: %s", task.name, args, reason)
    log.debug("%s%s: the whole error", task.name, args, exc_info=exc)
    return task.retry(exc=exc, countdown=TRANSIENT_RETRY.delay(transient),
                      max_retries=waits + TRANSIENT_MAX_RETRIES,
                      headers={WAITS_HEADER: waits})  # fmt: skip


def _failed_for_good(ctx: WorkerContext, delivery: Delivery, exc: Exception) -> None:
    """A task that failed with an error no retry mends (a damaged checkpoint, a bug) was
    acknowledged and its roll waited for ever, the reason in the worker's log only."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    try:
        fail_delivery(ctx, delivery, f"{delivery.what}: {type(exc).__name__}: {text}"[:2000])
    except Exception:  # the task's own error is what the log must show
        log.exception("%s: the failure could not be recorded", delivery.what)


SCORING_QUEUES = frozenset({"score", "reprocess"})


@worker_init.connect
def _refuse_a_device_it_lacks(sender: Any = None, **_: Any) -> None:
    """A scoring worker set up for a device or precision this machine lacks (ROLLSCAN_DEVICE=cuda
    on a host whose GPU or driver is gone, int8 without OpenVINO) started healthy and failed the
    roll of every band it took: it now stops before it takes one. A training worker is held to
    its device alone (the precision is scoring's); one on other queues (ingest, finalize,
    grade) runs no model and is not checked — a site's bf16 setting, shared by every service,
    stopped its CPU workers. SystemExit, because Celery logs and swallows a signal handler's
    exceptions."""
    from distill.inference import check_scoring_setup
    from storage.settings import get_settings

    # the queues of its -Q (Celery's default set without one); none known: all of them
    queues = set(sender.app.amqp.queues.consume_from or QUEUES)
    if not queues & (SCORING_QUEUES | {"train"}):
        return
    settings = get_settings()
    precision = settings.precision if queues & SCORING_QUEUES else "fp32"
    try:
        check_scoring_setup(settings.device, precision)
    except ValueError as exc:
        log.critical("this worker cannot run its model here: %s (ROLLSCAN_DEVICE=%s, ROLLSCAN_PRECISION="
                     "%s); not started", exc, settings.device, settings.precision)  # fmt: skip
        raise SystemExit(2) from None


# max_retries=None here, not only in `retry(max_retries=None)`: there, None means the task's
# own limit (Celery's default, 3), and a frame that waited for the one before it more than
# 3.5 s was dropped after its third retry, its roll left ingesting for good
_task = partial(app.task, bind=True, max_retries=None)


def _band(run_id: int, band_index: int) -> Delivery:
    return Delivery("score", f"{run_id}/{band_index}", f"band {band_index} of run {run_id}",
                    run_id=run_id)  # fmt: skip


@_task(name="rollscan.ingest")
def ingest(self: Task, roll_id: str, seq: int, key: str) -> str:
    delivery = Delivery("ingest", f"{roll_id}/{seq}", f"frame {seq} ({key})", roll_id=roll_id)
    return _run_task(self, ingest_frame, roll_id, seq, key, delivery=delivery)


@_task(name="rollscan.score")
def score(self: Task, run_id: int, band_index: int) -> str:
    return _run_task(self, score_band, run_id, band_index, delivery=_band(run_id, band_index))


@_task(name="rollscan.score_reprocess")
def score_reprocess(self: Task, run_id: int, band_index: int) -> str:
    """`score` for the bands of reprocess runs, routed to the `reprocess` queue."""
    return _run_task(self, score_band, run_id, band_index, delivery=_band(run_id, band_index))


@_task(name="rollscan.finalize")
def finalize(self: Task, run_id: int) -> int | str | None:
    delivery = Delivery("finalize", str(run_id), f"finalize of run {run_id}", run_id=run_id)
    return _run_task(self, finalize_run, run_id, delivery=delivery)


@_task(name="rollscan.train")
def train(self: Task, data: str, fabric_type: str | None, version: str | None = None,
          config: dict | None = None) -> str:  # fmt: skip
    from worker.training import train_and_register

    delivery = training_delivery(data, fabric_type, version, config or {})
    return _run_task(self, train_and_register, data, fabric_type, version, config or {},
                     delivery=delivery)  # fmt: skip


def training_delivery(data: str, fabric_type: str | None, version: str | None,
                      config: dict) -> Delivery:  # fmt: skip
    """A training request's deliveries, counted like the others': one that kills its worker
    (out of memory) was delivered again without end, hours of GPU each, beside live scoring."""
    request = json.dumps([data, fabric_type, version, config], sort_keys=True)
    digest = hashlib.sha256(request.encode()).hexdigest()[:32]
    return Delivery("train", digest, f"training of {fabric_type or 'the generic model'} on {data}")
