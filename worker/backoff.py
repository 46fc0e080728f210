"""The one retry back-off policy: wait `base_s` · 2^attempt, never more than `cap_s`.

Every retry in the project waits by it, each with its own numbers:

- a task that met a transient error (`worker.transient_errors`): 2 s doubling, capped at
  5 min, at most 12 retries (`TRANSIENT_RETRY`, `TRANSIENT_MAX_RETRIES`): about half an hour of
  outage before the task gives up;
- a task told `RetryLater` (work that waits for other work): the countdown it asked for,
  doubling, capped at a minute (`RETRY_LATER_CAP_S`), retried for as long as it takes; these
  waits are counted apart from the transient retries (a message header, `worker.tasks`), so
  that a long wait leaves a later outage its whole budget;
- the scheduler's discovery loop (`scheduler.loop`): its interval · 2^k after k failed passes
  in a row, capped at its `max_backoff_s`.

The tasks retry through Celery's `task.retry(countdown=…)` rather than its `retry_backoff`
option: which errors are transient is a predicate over the exception's causes, not a list of
exception classes, and `retry_backoff` adds random jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_EXPONENT = 20  # 2^20 outgrows any cap used here; a larger one could overflow a float


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off: attempt k (0, 1, 2, …) waits `base_s` · 2^k seconds, at most
    `cap_s`."""

    base_s: float
    cap_s: float

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the retry numbered `attempt`."""
        return min(self.cap_s, self.base_s * 2 ** min(attempt, MAX_EXPONENT))


TRANSIENT_RETRY = Backoff(base_s=2, cap_s=300)
TRANSIENT_MAX_RETRIES = 12
RETRY_LATER_CAP_S = 60.0
