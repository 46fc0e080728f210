"""The Celery app. `celery -A worker.app worker -Q score -c 1` runs a scoring worker.

With no `ROLLSCAN_BROKER_URL` the tasks run in-process (`task_always_eager`): the embedded
default executes the same task code without a broker.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from storage.settings import Settings, get_settings

QUEUES = ("ingest", "score", "finalize", "train", "reprocess")
ROUTES = {
    **{f"rollscan.{queue}": {"queue": queue} for queue in ("ingest", "score", "finalize", "train")},
    # bands of reprocess runs (`rollscan reprocess`) wait in a queue of their own, so an
    # archive's backlog never sits in front of live bands (a worker of its own takes it)
    "rollscan.score_reprocess": {"queue": "reprocess"},
    # the nightly grading task lives in scheduler/beat.py (grading is the scheduler's); its
    # route is declared here too because Celery builds its router once, at first use
    "rollscan.grade_nightly": {"queue": "grade"},
}


log = logging.getLogger(__name__)

REDIS_SOCKET_TIMEOUT_S = 30.0
PRODUCER_TIMEOUT_S = 10.0  # an AMQP producer's wait for each answer: a confirm, a close
# a producer's retries of one message (a broker restarting): each costs up to three
# PRODUCER_TIMEOUT_S while RabbitMQ blocks publishers, so a command gives up in about 1.5 min
PRODUCER_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.5, "interval_step": 1.0,
                         "interval_max": 2.0}  # fmt: skip
_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def broker_transport_options(settings: Settings, *, producer: bool = False) -> dict[str, Any]:
    """The broker's transport options.

    Redis:
    - `visibility_timeout`: Redis redelivers an unacknowledged task after it
      (ROLLSCAN_BROKER_VISIBILITY_TIMEOUT, an hour): it must exceed the longest task, a band
      takes seconds to minutes;
    - socket timeouts: a Redis that accepts and never answers (hung, or a middlebox) held a
      producer (`rollscan submit`, the scheduler) for ever, silent, and a worker logged one
      line; a blocking pop waits `polling_interval` (1 s), far below them.

    AMQP (RabbitMQ has its own heartbeats):
    - publisher confirms: a publish returns once the broker has the message. Without them it
      returned once the bytes were in the socket's buffer: while a resource alarm (memory,
      disk) blocked publishers, `rollscan submit` said "2000 frames submitted" and 24 arrived,
      the rest dropped with the connection, the roll's cursor saying all were sent;
    - `producer` (a command or the scheduler, which consume nothing): read and write timeouts,
      so that a blocked publish fails in `PRODUCER_TIMEOUT_S`s and says so — a worker's waits
      until the alarm clears (its consuming connection must not time out while idle);
    - `on_blocked`: RabbitMQ's word that it blocks this connection, logged and remembered for
      the command line's message (`broker_blocked`)."""
    if _is_amqp(settings):
        options: dict[str, Any] = {"confirm_publish": True, "on_blocked": _note_blocked,
                                   "on_unblocked": _note_unblocked}  # fmt: skip
        if producer:
            options |= {"read_timeout": PRODUCER_TIMEOUT_S, "write_timeout": PRODUCER_TIMEOUT_S}
        return options
    return {
        "visibility_timeout": settings.broker_visibility_timeout,
        "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": REDIS_SOCKET_TIMEOUT_S,
    }


def _is_amqp(settings: Settings) -> bool:
    url = settings.broker_url.get_secret_value() if settings.broker_url else ""
    return url.split("://", 1)[0].lower() in _AMQP_SCHEMES


_blocked_at: float | None = None  # when RabbitMQ last blocked one of this process's connections


def _note_blocked(reason: str) -> None:
    global _blocked_at
    if _blocked_at is None:
        log.warning("the broker blocks publishing (%s): a RabbitMQ resource alarm, low memory or "
                    "disk (`rabbitmq-diagnostics check_alarms`); publishes wait", reason)  # fmt: skip
    _blocked_at = time.monotonic()


def _note_unblocked() -> None:
    global _blocked_at
    if _blocked_at is not None:
        log.warning(
            "the broker publishes again after %.0f s blocked", time.monotonic() - _blocked_at
        )
    _blocked_at = None


def broker_blocked() -> bool:
    """Whether RabbitMQ blocks this process's publishing now (its last word on it)."""
    return _blocked_at is not None


def use_as_producer(app: Celery, settings: Settings | None = None) -> None:
    """Make `app` a producer's: bounded AMQP waits and few retries per message (see
    `broker_transport_options`). Before its first connection: options are read at connect."""
    settings = settings or get_settings()
    app.conf.update(broker_transport_options=broker_transport_options(settings, producer=True),
                    task_publish_retry_policy=PRODUCER_RETRY_POLICY)  # fmt: skip


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("rollscan", include=["worker.tasks"])
    broker = (
        settings.broker_url.get_secret_value() if settings.broker_url else "memory://localhost/"
    )
    app.conf.update(
        broker_url=broker,
        task_always_eager=settings.broker_url is None,
        task_eager_propagates=True,
        # a task is acknowledged after it ran: a worker killed mid-band gets it redelivered
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_routes=ROUTES,
        task_default_queue="ingest",
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        # a task sends its successor (band → finalize) after committing its own work: keep
        # trying through a broker restart (about 90 s in all) rather than fail the task over it
        task_publish_retry_policy={
            "max_retries": 20,
            "interval_start": 0.5,
            "interval_step": 1.0,
            "interval_max": 5.0,
        },
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    return app


app = make_app()
