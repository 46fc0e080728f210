"""The process's one `WorkerContext`, built on first use, without Celery.

Built lazily, so that a prefork worker builds it in the child (CUDA and connection pools must
not cross a fork), and with torch's CPU threads set from the settings. Who sends the follow-up
work is the caller's to say: the Celery tasks pass their broker's enqueuer
(`worker.tasks.CeleryEnqueuer`); a caller that sends no work (the nightly grading) passes none.
"""

from __future__ import annotations

import logging

from worker.context import Enqueuer, WorkerContext

log = logging.getLogger(__name__)


class NoEnqueuer:
    """The enqueuer of a context built by a caller that sends no work: sending is a bug."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("this process's worker context was built to send no work")

    ingest = score = finalize = _refuse


_context: WorkerContext | None = None


def process_context(enqueue: Enqueuer | None = None) -> WorkerContext:
    """This process's worker context, built on the first call from the settings.

    `enqueue` is where its follow-up work goes; one process sends through one, the first given
    (a context built with none gets the first one given later)."""
    global _context
    if _context is None:
        from distill.malloc_tuning import keep_freed_memory
        from storage.database import check_schema_at_head, database_url
        from storage.settings import get_settings

        keep_freed_memory()

        settings = get_settings()
        # a worker started before `rollscan db upgrade` read columns that were not there yet,
        # and failed its rolls for good: its tasks wait (a transient error) until it is done
        check_schema_at_head(database_url(settings))
        if settings.torch_threads is not None:
            import torch

            # torch takes every core by default: N processes on a CPU machine would run
            # N × cores threads, which on 2 cores measured 5× slower (docs/benchmarks.md)
            torch.set_num_threads(settings.torch_threads)
            log.info("torch uses %d CPU threads in this process", torch.get_num_threads())
        _context = WorkerContext.from_settings(
            enqueue if enqueue is not None else NoEnqueuer(), settings, device=settings.device,
            batch_size=settings.batch_size,
        )  # fmt: skip
    elif enqueue is not None and isinstance(_context.enqueue, NoEnqueuer):
        _context.enqueue = enqueue
    return _context
