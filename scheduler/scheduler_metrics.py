"""Prometheus metrics of the control plane, refreshed by the scheduler after each pass.

- ``rollscan_tiles_scored_total``, ``rollscan_bands_scored_total``: counted by the workers
  (`worker.task_metrics`, each serving its own /metrics); the scheduler's endpoint has them too,
  non-zero when tasks run in its process (no broker). Tiles per second:
  ``rate(rollscan_tiles_scored_total[1m])``.
- ``rollscan_bands_in_flight``: bands recorded and not yet scored, of runs still scoring
  (PostgreSQL).
- ``rollscan_queue_depth{queue}``: messages waiting in each Celery queue, asked of the broker
  (Redis: the list's length; RabbitMQ: a passive queue declare); best effort, NaN when the
  broker does not answer, absent without a broker.
- ``rollscan_roll_latency_seconds``: from a roll's last frame ingested to its live run
  finalized, observed once per run that finishes while the scheduler runs.
- ``rollscan_rolls_idle``: rolls with open work (frames, bands or a finalize outstanding)
  and no progress for an hour — lost messages or a stuck worker; each new one is logged with
  the command that sends its work again (`rollscan resume`), which the scheduler runs itself
  after `--resume-idle` (`scheduler.auto_resume`), counted by ``rollscan_rolls_resumed``.
- ``rollscan_rolls{status}``, discovery counters, failed passes, time of the last good pass.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from sqlalchemy import func, select

from scheduler.discovery import DiscoveryReport
from scheduler.resume import idle_rolls
from storage.schema import ROLL_STATUSES, Band, Frame, Roll, Run
from worker.app import QUEUES
from worker.context import WorkerContext
from worker.task_metrics import BANDS_SCORED, TILES_SCORED

log = logging.getLogger(__name__)

__all__ = ["BANDS_SCORED", "TILES_SCORED", "SchedulerMetrics", "queue_depths", "start_metrics_server"]  # fmt: skip

BANDS_IN_FLIGHT = Gauge("rollscan_bands_in_flight", "bands recorded, not yet scored")
QUEUE_DEPTH = Gauge("rollscan_queue_depth", "messages waiting in a Celery queue", ["queue"])
ROLL_LATENCY = Histogram(
    "rollscan_roll_latency_seconds",
    "last frame ingested to roll finalized",
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
ROLLS = Gauge("rollscan_rolls", "rolls by status", ["status"])
ROLLS_IDLE = Gauge("rollscan_rolls_idle", "rolls with open work and no progress for an hour")
IDLE_AFTER = timedelta(hours=1)
ROLLS_DISCOVERED = Counter("rollscan_rolls_discovered", "rolls registered by discovery")
FRAMES_ENQUEUED = Counter("rollscan_frames_enqueued", "frames enqueued for ingest by discovery")
ROLLS_STALLED = Counter("rollscan_rolls_stalled", "rolls marked stalled")
MANIFESTS_REFUSED = Counter("rollscan_discovery_problems", "manifests refused and roll errors")
ROLLS_RESUMED = Counter("rollscan_rolls_resumed", "idle rolls whose work the scheduler sent again")
PASSES_FAILED = Counter("rollscan_scheduler_passes_failed", "failed discovery passes", ["kind"])
LAST_PASS = Gauge("rollscan_scheduler_last_pass_timestamp_seconds", "end of the last good pass")
GRADE_QUEUES = ("grade",)


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> Any:
    """Serve /metrics (the process's default registry) on `addr`:`port` in a daemon thread;
    0 = off. Loopback unless told (`ROLLSCAN_METRICS_ADDR`): the page names rolls and queues.
    Returns the server (``.shutdown()`` stops it) or None."""
    if port <= 0:
        return None
    try:
        server, _thread = start_http_server(port, addr=addr)
    except OSError as exc:  # a worker on this host may have taken it first
        raise ValueError(
            f"metrics port {addr}:{port} (ROLLSCAN_METRICS_PORT, or --metrics-port) cannot be "
            f"served: {exc.strerror or exc}; give the scheduler a port no worker uses, or 0 for "
            "none"
        ) from None
    log.info("metrics on %s:%d/metrics", addr, port)
    return server


def queue_depths(broker_url: str, queues: tuple[str, ...], timeout: float = 3.0) -> dict[str, int]:
    """Messages waiting per queue; a queue the broker does not know holds 0. Raises when the
    broker cannot be reached."""
    from kombu import Connection

    depths = {}
    # socket_timeout: a Redis that accepts and never answers held the scheduler's loop (its
    # discovery too) for ever; read/write_timeout, py-amqp's words for it, a RabbitMQ that
    # stopped reading (its disk or memory alarm); connect_timeout covers the TCP connect alone
    options = {"socket_timeout": timeout, "read_timeout": timeout, "write_timeout": timeout}
    with Connection(broker_url, connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        for queue in queues:
            channel = conn.channel()  # one per queue: a refused passive declare closes it (AMQP)
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except conn.channel_errors:
                depths[queue] = 0
            finally:
                with contextlib.suppress(Exception):  # already closed by the broker
                    channel.close()
    return depths


class SchedulerMetrics:
    """Refreshes the gauges from PostgreSQL and the broker; observes roll latencies once."""

    def __init__(self, queues: tuple[str, ...] = QUEUES + GRADE_QUEUES) -> None:
        self.queues = queues
        self._finished_after: datetime | None = None  # runs finished before we started: not ours
        self._broker_down = False
        self._idle: set[str] = set()

    def update(self, ctx: WorkerContext, report: DiscoveryReport | None = None) -> None:
        if report is not None:
            ROLLS_DISCOVERED.inc(len(report.new_rolls))
            FRAMES_ENQUEUED.inc(len(report.frames_enqueued))
            ROLLS_STALLED.inc(len(report.stalled))
            MANIFESTS_REFUSED.inc(len(report.problems))
        with ctx.session() as session:
            self._from_database(session)
        if ctx.settings.broker_url is not None:
            self._from_broker(ctx.settings.broker_url.get_secret_value())
        LAST_PASS.set_to_current_time()

    def rolls_resumed(self, count: int) -> None:
        ROLLS_RESUMED.inc(count)

    def pass_failed(self, kind: str) -> None:
        PASSES_FAILED.labels(kind).inc()

    def _from_database(self, session) -> None:
        BANDS_IN_FLIGHT.set(
            session.scalar(
                select(func.count())
                .select_from(Band)
                .join(Run, Run.id == Band.run_id)
                .where(Band.status == "pending", Run.status.in_(("pending", "scoring")))
            )
        )
        query = select(Roll.status, func.count()).group_by(Roll.status)
        counts = {status: n for status, n in session.execute(query)}
        for status in ROLL_STATUSES:
            ROLLS.labels(status).set(counts.get(status, 0))
        idle = set(idle_rolls(session, IDLE_AFTER))
        ROLLS_IDLE.set(len(idle))
        if idle - self._idle:
            log.warning("rolls with open work and no progress for %s: %s (`rollscan resume "
                        "--idle 1h` sends their work again; the scheduler does after "
                        "--resume-idle)", IDLE_AFTER, ", ".join(sorted(idle)))  # fmt: skip
        self._idle = idle
        if self._finished_after is None:
            self._finished_after = session.scalar(select(func.now()))
            return
        last_frame = (
            select(func.max(Frame.ingested_at))
            .where(Frame.roll_id == Run.roll_id)
            .scalar_subquery()
        )
        rows = session.execute(
            select(Run.finished_at, last_frame)
            .where(Run.purpose == "live", Run.status == "done")
            .where(Run.finished_at > self._finished_after)
        ).all()
        for finished, last in rows:
            if last is not None:
                ROLL_LATENCY.observe(max(0.0, (finished - last).total_seconds()))
        self._finished_after = max([self._finished_after, *(r[0] for r in rows)])

    def _from_broker(self, url: str) -> None:
        try:
            depths = queue_depths(url, self.queues)
        except Exception as exc:  # best effort: discovery itself reports broker outages
            if not self._broker_down:
                log.warning("metrics: queue depths unavailable: %s", exc)
            self._broker_down = True
            for queue in self.queues:
                QUEUE_DEPTH.labels(queue).set(float("nan"))
            return
        self._broker_down = False
        for queue, depth in depths.items():
            QUEUE_DEPTH.labels(queue).set(depth)
