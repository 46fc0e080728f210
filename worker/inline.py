"""Run the pipeline in this process without Celery: each enqueue calls the function at once.

For tests of the pipeline's logic and for tools that want no broker at all. (The embedded
default uses Celery's eager mode instead, so that it runs the task code itself.)
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from worker.context import WorkerContext
from worker.finalize import finalize_run
from worker.ingest import ingest_frame
from worker.scoring import score_band


@dataclass
class InlineEnqueuer:
    """Queues work in memory; `drain()` runs it in order (breadth-first, like a broker would)."""

    ctx: WorkerContext | None = None
    queue: deque[tuple[Any, tuple]] = field(default_factory=deque)
    log: list[tuple[str, tuple]] = field(default_factory=list)
    # the Celery queue each score would be routed to, and its arguments
    routed: list[tuple[str, tuple]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per function name

    def ingest(self, roll_id: str, seq: int, key: str) -> None:
        self.queue.append((ingest_frame, (roll_id, seq, key)))

    def score(self, run_id: int, band_index: int, reprocess: bool = False) -> None:
        self.routed.append(("reprocess" if reprocess else "score", (run_id, band_index)))
        self.queue.append((score_band, (run_id, band_index)))  # one queue: no priorities here

    def finalize(self, run_id: int) -> None:
        self.queue.append((finalize_run, (run_id,)))

    def drain(self, lose: str | None = None) -> list[tuple[str, tuple, Any]]:
        """Run the queue; the messages for the function named `lose` vanish instead, as a
        broker that lost its queues or a worker killed before sending would lose them."""
        results = []
        while self.queue:
            function, args = self.queue.popleft()
            self.log.append((function.__name__, args))
            if function.__name__ == lose:
                results.append((function.__name__, args, "lost"))
            else:
                started = time.perf_counter()
                results.append((function.__name__, args, function(self.ctx, *args)))
                elapsed = time.perf_counter() - started
                self.seconds[function.__name__] = self.seconds.get(function.__name__, 0) + elapsed
        return results
