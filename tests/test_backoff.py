"""The one retry back-off policy (`worker.backoff`) and the process's worker context
(`worker.runtime`)."""

from __future__ import annotations

import pytest
from fixtures_ingest import frame_bytes, put_frame, register, roll_and_run
from fixtures_pg import alter_database
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


def _roll_row(ctx, roll_id: str) -> tuple[str, str | None, object]:
    from storage.schema import Roll

    with ctx.session() as session:
        roll = session.get(Roll, roll_id)
        return roll.status, roll.failure_reason, roll.updated_at


def test_a_task_out_of_retries_says_on_its_roll_why_it_waits(
    db_engine, tmp_path, env_context, monkeypatch
) -> None:
    """A frame whose object store stayed away for its whole retry budget left its roll
    ingesting with the reason in the worker's log only (a disk that stays full does the same,
    every two hours). The roll now says why it waits ("waiting: …" in `failure_reason`), keeps
    its status and its idle clock (the scheduler's auto-resume), and forgets the reason once
    its work is sent again."""
    from celery.exceptions import Retry

    from rollscan_testing.services import free_port
    from scheduler.resume import resume_roll
    from worker.tasks import ingest

    env_context(db_engine, tmp_path, ROLLSCAN_S3_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret")  # fmt: skip
    ctx = process_context()
    register(ctx, "R-1", frames=2)
    registered = _roll_row(ctx, "R-1")
    args = ("R-1", 1, "incoming/R-1/frames/000001.tif")
    with pytest.raises(Retry):  # the store refuses connections: transient, retried
        ingest.apply(args, retries=TRANSIENT_MAX_RETRIES - 1, throw=True)
    assert _roll_row(ctx, "R-1") == registered
    with pytest.raises(Exception) as given_up:
        ingest.apply(args, retries=TRANSIENT_MAX_RETRIES, throw=True)
    assert not isinstance(given_up.value, Retry)
    status, reason, updated_at = _roll_row(ctx, "R-1")
    assert (status, updated_at) == (registered[0], registered[2])
    assert reason.startswith(
        "waiting: frame 1 (incoming/R-1/frames/000001.tif) gave up after 12 retries over 28 min "
        "of transient errors, the last: "
    )
    assert "`rollscan resume`" in reason
    monkeypatch.delenv("ROLLSCAN_S3_ENDPOINT")  # the store back (a local one, with no frame)
    env_context(db_engine, tmp_path)
    resume_roll(process_context(), "R-1")
    assert _roll_row(ctx, "R-1") == registered


def test_a_task_on_a_read_only_server_waits_for_the_primary(
    db_engine, make_database, tmp_path, env_context
) -> None:
    """A worker that reaches a standby after a failover (or a server set read-only) had its
    frame fail for good — the failure itself could not be recorded there: message acknowledged,
    roll waiting with no reason. The write is retried, the roll left open for it."""
    from celery.exceptions import Retry

    from storage.database import upgrade
    from worker.tasks import ingest

    url = make_database()
    upgrade(url)
    env_context(url, tmp_path)
    ctx = process_context()
    key = put_frame(ctx, "R-1", 1, frame_bytes())
    register(ctx, "R-1", frames=1)
    alter_database(db_engine, url, "SET default_transaction_read_only = on")
    env_context(url, tmp_path)  # the worker's sessions from now on: read-only
    try:
        with pytest.raises(Retry):
            ingest.apply(("R-1", 1, key), throw=True)
    finally:
        alter_database(db_engine, url, "RESET default_transaction_read_only")
    env_context(url, tmp_path)
    roll, _ = roll_and_run(process_context(), "R-1")
    assert (roll.status, roll.failure_reason) == ("registered", None)
