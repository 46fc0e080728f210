"""The one retry back-off policy (`worker.backoff`) and the process's worker context
(`worker.runtime`)."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from worker.backoff import RETRY_LATER_CAP_S, TRANSIENT_MAX_RETRIES, TRANSIENT_RETRY, Backoff
from worker.inline import InlineEnqueuer
from worker.runtime import NoEnqueuer, process_context


def test_the_delay_doubles_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(base_s=1.5, cap_s=10)
    assert [backoff.delay(k) for k in range(5)] == [1.5, 3, 6, 10, 10]
    assert Backoff(base_s=20, cap_s=10).delay(0) == 10


def test_a_huge_attempt_number_stays_at_the_cap() -> None:
    assert Backoff(base_s=0.5, cap_s=60).delay(10_000) == 60
    assert Backoff(base_s=1e-9, cap_s=300).delay(10_000) == 1e-9 * 2**20  # exponent at most 20


def test_the_tasks_numbers() -> None:
    """A transient error: 2 s doubling, capped at 5 min, 12 retries (about half an hour);
    RetryLater: its countdown doubling, capped at a minute."""
    delays = [TRANSIENT_RETRY.delay(k) for k in range(TRANSIENT_MAX_RETRIES)]
    assert delays == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300]
    assert sum(delays) == 1710  # 28.5 minutes of waiting before the task gives up
    assert [Backoff(0.5, RETRY_LATER_CAP_S).delay(k) for k in (0, 1, 7, 8)] == [0.5, 1, 60, 60]


def test_the_process_context_is_built_once_and_takes_the_first_enqueuer(
    db_engine, tmp_path, env_context
) -> None:
    env_context(db_engine, tmp_path)
    ctx = process_context()  # a caller that sends no work
    assert isinstance(ctx.enqueue, NoEnqueuer)
    with pytest.raises(RuntimeError, match="send no work"):
        ctx.enqueue.finalize(1)
    first, second = InlineEnqueuer(), InlineEnqueuer()
    assert process_context(first) is ctx and ctx.enqueue is first
    assert process_context(second) is ctx and ctx.enqueue is first
    assert process_context() is ctx and ctx.enqueue is first


def test_a_process_on_a_database_not_yet_upgraded_waits_for_it(
    make_database, tmp_path, env_context
) -> None:
    """A worker started before `rollscan db upgrade` read columns not there yet, and its tasks
    failed their rolls for good; its context is refused with a transient error until then."""
    from storage.database import SchemaNotAtHead, upgrade
    from worker.transient_errors import is_transient_error

    url = make_database()
    upgrade(url, "0007")
    env_context(url, tmp_path)
    with pytest.raises(
        SchemaNotAtHead, match="at schema revision 0007; this rollscan needs revision 0013"
    ) as caught:
        process_context()
    assert is_transient_error(caught.value)
    upgrade(url)
    assert process_context().engine.url.database == make_url(url).database


def test_waits_for_other_work_do_not_spend_the_transient_budget(tmp_path, env_context) -> None:
    """A frame that had waited 12 times for the one before it (RetryLater, retried without
    limit) met a database away: its retries were past the transient budget of 12, so it was
    given up at once — the frame lost, its roll ingesting for good. The waits are counted
    apart (a message header): the outage gets its own 12 retries, from 2 s."""
    from celery.exceptions import Retry

    from rollscan_testing.services import free_port
    from worker.tasks import WAITS_HEADER, ingest

    env_context(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", tmp_path)
    args = ("R-1", 13, "incoming/R-1/frames/000013.tif")
    with pytest.raises(Retry) as retried:  # the database is away: a transient error
        ingest.apply(args, retries=12, headers={WAITS_HEADER: 12}, throw=True)
    assert retried.value.when == TRANSIENT_RETRY.delay(0)
    with pytest.raises(Retry) as retried:
        ingest.apply(args, retries=12 + 11, headers={WAITS_HEADER: 12}, throw=True)
    assert retried.value.when == TRANSIENT_RETRY.delay(11)
    with pytest.raises(Exception, match=r"connect") as given_up:  # the budget spent
        ingest.apply(args, retries=12 + 12, headers={WAITS_HEADER: 12}, throw=True)
    assert not isinstance(given_up.value, Retry)
