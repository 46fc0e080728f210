"""Prometheus metrics of a worker process: what the tasks count as they run.

Tiles per second is ``rate(rollscan_tiles_scored_total[1m])``. The scheduler exports the
control plane's view (queue depth, bands in flight, roll latency: `scheduler.scheduler_metrics`).

With `ROLLSCAN_METRICS_PORT` set, each prefork child of a Celery worker serves its own
``/metrics`` on the first free port from that one on (a worker of ``-c N`` children serves on
PORT … PORT + N − 1; the documented GPU worker has one child, so exactly PORT). Counters are
per process, as Prometheus expects: it sums them.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from celery.signals import worker_process_init
from prometheus_client import REGISTRY, Counter, start_http_server

log = logging.getLogger(__name__)

TILES_SCORED = Counter("rollscan_tiles_scored", "tiles scored by the model")
BANDS_SCORED = Counter("rollscan_bands_scored", "bands scored (written and counted)")
PORTS_TRIED = 16


def band_scored(tiles: int) -> None:
    """Called by `worker.scoring.score_band` after a band's scores are written."""
    TILES_SCORED.inc(tiles)
    BANDS_SCORED.inc()


def tiles_scored_total() -> int:
    """Tiles this process has scored so far (benchmarks: a run's tiles are the difference)."""
    return int(REGISTRY.get_sample_value("rollscan_tiles_scored_total") or 0)


def serve_metrics(port: int, *, addr: str = "127.0.0.1", tries: int = PORTS_TRIED) -> int | None:
    """Serve /metrics on `port`, or the next free port up to `tries` on; return it (None: 0
    means off, or no port was free: logged, the worker goes on without an endpoint)."""
    if port <= 0:
        return None
    for candidate in range(port, min(port + tries, 65536)):
        try:
            start_http_server(candidate, addr=addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # another process's: the next port
                continue
            # an address this host does not have: no other port would do, and "no free port"
            # sent the operator looking for processes
            log.warning("metrics: cannot listen on %s:%d (ROLLSCAN_METRICS_ADDR, "
                        "ROLLSCAN_METRICS_PORT): %s; this process serves none", addr, candidate,
                        exc.strerror or exc)  # fmt: skip
            return None
        # moved: say it where the default log level shows it, or a scrape finds another process
        (log.info if candidate == port else log.warning)(
            "metrics on %s:%d/metrics%s", addr, candidate,
            "" if candidate == port else f" ({port} was taken)",
        )  # fmt: skip
        return candidate
    log.warning("metrics: no free port in %d..%d; this process serves none", port, port + tries - 1)
    return None


@worker_process_init.connect
def _serve_from_child(**_: Any) -> None:
    from storage.settings import get_settings

    settings = get_settings()
    serve_metrics(settings.metrics_port, addr=settings.metrics_addr)
