"""What the pipeline's plain functions need: settings, database, object store, models, a queue.

Tasks build one context per process (lazily, after the fork: CUDA and connection pools must not
cross a fork); tests and the embedded default build their own. The `Enqueuer` hides Celery from
the pipeline, so the pipeline's functions can be called and tested without it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import torch
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from distill.checkpoint import load_detector
from distill.inference import Detector
from storage.database import make_engine, session_scope
from storage.objectstore import ObjectStore, open_object_store
from storage.registry import fetch_checkpoint, registered_teacher
from storage.schema import Model
from storage.settings import Settings, get_settings

_log = logging.getLogger(__name__)
# A bound (seconds) on the lock waits of the sessions opened while it is set: discovery's, so
# that a roll whose rows another session holds (a finalize of a long roll, a transaction left
# open) holds up that roll alone, not the pass over every other one, silently. A task's own
# work (`worker.tasks`) is never bounded, even run in-process from discovery.
LOCK_WAIT_LIMIT: ContextVar[float | None] = ContextVar("rollscan_lock_wait_limit", default=None)


class Enqueuer(Protocol):
    """Where the pipeline sends its follow-up work: Celery's queues (`worker.tasks.CeleryEnqueuer`)
    or an in-process queue (`worker.inline.InlineEnqueuer`)."""

    def ingest(self, roll_id: str, seq: int, key: str) -> None: ...
    def score(self, run_id: int, band_index: int, reprocess: bool = False) -> None: ...
    def finalize(self, run_id: int) -> None: ...


class RetryLater(Exception):
    """Not an error: the work cannot be done yet (e.g. the previous frame is still missing).

    Tasks retry after `countdown` seconds, doubling on each retry up to a minute: a frame whose
    predecessor is being ingested by another worker gets in within a second, and one whose
    predecessor is held up for long does not churn the queue."""

    def __init__(self, reason: str, countdown: float = 0.5) -> None:
        super().__init__(reason)
        self.countdown = countdown


@dataclass
class WorkerContext:
    """What the pipeline's plain functions run with: settings, a database engine, the object
    store, the queue to send follow-up work to, and the models loaded so far (one per version,
    loaded on first use). One per process; tasks, the command line and tests each build theirs."""

    settings: Settings
    engine: Engine
    store: ObjectStore
    enqueue: Enqueuer
    device: str = "auto"
    batch_size: int = 16
    _detectors: dict[str, Detector] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(
        cls, enqueue: Enqueuer, settings: Settings | None = None, **kwargs
    ) -> WorkerContext:
        settings = settings or get_settings()
        return cls(settings, make_engine(settings), open_object_store(settings), enqueue, **kwargs)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.engine) as session:
            if (limit := LOCK_WAIT_LIMIT.get()) is not None:  # SET LOCAL: this transaction's
                session.execute(text("SELECT set_config('lock_timeout', :v, true)"),
                                {"v": f"{round(limit * 1000)}ms"})  # fmt: skip
            yield session

    def detector(self, model: Model) -> Detector:
        """The model's detector, loaded once per process and cached by version: the
        `settings.max_cached_models` used last are kept (each retrain of a fabric leaves its old
        version behind, which a long-lived GPU worker would keep until CUDA ran out of memory)."""
        with self._lock:
            if model.version in self._detectors:
                self._detectors[model.version] = self._detectors.pop(model.version)  # last used
                return self._detectors[model.version]
            data = fetch_checkpoint(self.store, model)
            with registered_teacher(self.store, model, data) as teacher_weights:
                detector, _ = load_detector(
                    data, teacher_weights=teacher_weights, device=self.device,
                    batch_size=self.batch_size, precision=self.settings.precision,
                    compile=self.settings.compile_model,
                )  # fmt: skip
            while len(self._detectors) >= self.settings.max_cached_models:
                evicted = next(iter(self._detectors))  # used least recently (dicts keep order)
                del self._detectors[evicted]
                # a site interleaving more models than this reloads one at every band (an int8
                # model calibrates again each time): the operator's cue to raise the setting
                _log.warning("model %s dropped from the cache to load %s (it keeps %d: "
                             "ROLLSCAN_MAX_CACHED_MODELS)", evicted, model.version,
                             self.settings.max_cached_models)  # fmt: skip
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self._detectors[model.version] = detector
            _log.info("model %s loaded: %s", model.version, detector.mode)
            return detector


def lock_bands(session: Session, roll_id: str, bands: range | list[int], shared: bool) -> None:
    """Transaction-scoped advisory locks on a roll's bands, always taken in ascending order.

    zarr writes a shard by read-modify-write and reads it with several requests: a frame writer
    takes its bands exclusively, a band scorer takes the bands its read window touches shared,
    so no reader sees a half-rewritten shard and no two writers lose each other's rows.
    """
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    for band in sorted(set(bands)):
        session.execute(
            text(f"SELECT {function}(hashtext(:roll), :band)"), {"roll": roll_id, "band": band}
        )
