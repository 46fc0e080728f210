"""The Celery app. `celery -A worker.app worker -Q score -c 1` runs a scoring worker.

With no `ROLLSCAN_BROKER_URL` the tasks run in-process (`task_always_eager`): the embedded
default executes the same task code without a broker.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from storage.settings import Settings, get_settings
from worker.broker_options import PUBLISH_RETRY_POLICY, broker_transport_options

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
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    return app


app = make_app()


@worker_process_init.connect
def _confirm_in_pool_processes(**_: Any) -> None:
    """A pool process's publishes are confirmed (`worker.broker_options`); it connects after."""
    app.conf.broker_transport_options = broker_transport_options(get_settings(), "pool")
