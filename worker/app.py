"""The Celery app. `celery -A worker.app worker -Q score -c 1` runs a scoring worker.

With no `ROLLSCAN_BROKER_URL` the tasks run in-process (`task_always_eager`): the embedded
default executes the same task code without a broker.
"""

from __future__ import annotations

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


REDIS_SOCKET_TIMEOUT_S = 30.0


def broker_transport_options(settings: Settings) -> dict[str, float]:
    """The broker's transport options (Redis reads them; AMQP has its own heartbeats):
    - `visibility_timeout`: Redis redelivers an unacknowledged task after it
      (ROLLSCAN_BROKER_VISIBILITY_TIMEOUT, an hour): it must exceed the longest task, a band
      takes seconds to minutes;
    - socket timeouts: a Redis that accepts and never answers (hung, or a middlebox) held a
      producer (`rollscan submit`, the scheduler) for ever, silent, and a worker logged one
      line; a blocking pop waits `polling_interval` (1 s), far below them."""
    return {
        "visibility_timeout": settings.broker_visibility_timeout,
        "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": REDIS_SOCKET_TIMEOUT_S,
    }


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
