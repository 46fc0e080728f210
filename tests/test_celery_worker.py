"""The roll pipeline through a real broker and real `celery worker` processes.

Each test starts `celery -A worker.app worker` as a subprocess (its own process group, stopped
in teardown whatever happens) configured by `ROLLSCAN_*` variables: the session's migrated
PostgreSQL database, a fresh bucket on the moto S3 server (HTTP on loopback) and a broker —
a Redis database claimed for this test session (11–15, emptied before each test) or a RabbitMQ
vhost of its own. The test process enqueues through the same broker: `worker.app.app`, which
the tasks are bound to, is pointed at it for the test (`celery_producer`) and restored after;
`scheduler.submit.submit` runs with a `WorkerContext` whose enqueuer is `CeleryEnqueuer`.

Expected defects come from the planted positions and from the same roll run in this process
without Celery (`celery_reference` in tests/fixtures_roll.py).
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

import pytest
from fixtures_celery import VISIBILITY_S, Stack
from fixtures_roll import (
    ROLL_ID,
    ROLL_TIMEOUT_S,
    assert_roll_came_out,
    assert_roll_done,
    assert_same_defects,
    defects_of,
    wait_for_tasks,
    wait_until_done,
)  # fmt: skip
from sqlalchemy import select

from scheduler.submit import submit
from storage.schema import Run
from worker.tasks import CeleryEnqueuer

# --- tests -----------------------------------------------------------------------------------


def run_roll_and_check(stack: Stack, roll, reference: list[dict]) -> None:
    """One worker, the roll submitted, then the planted and the reference defects found."""
    worker = stack.start_worker(torch_threads="1")
    submit(stack.ctx, str(roll[0]))
    wait_until_done(stack, ROLL_ID, stack.workers)
    assert "torch uses 1 CPU threads in this process" in worker.log(), worker.tail()
    assert_roll_came_out(stack, roll, reference)


def test_a_roll_through_redis_comes_out_at_the_planted_positions(
    make_stack, redis_broker, celery_roll, celery_reference
):
    run_roll_and_check(make_stack(redis_broker), celery_roll, celery_reference)


def test_duplicate_frames_and_finalizes_through_the_broker_change_nothing(
    make_stack, redis_broker, celery_roll, celery_reference
):
    stack = make_stack(redis_broker)
    stack.start_worker()
    submission = submit(stack.ctx, str(celery_roll[0]))
    seq, key = submission.frames[1]
    mark = len(stack.published)
    stack.ctx.enqueue.ingest(ROLL_ID, seq, key)  # frame 2 again, queued behind the roll's own
    in_flight = [task_id for _, task_id in stack.published[mark:]]
    wait_until_done(stack, ROLL_ID, stack.workers)
    assert_roll_done(stack, ROLL_ID)
    before = defects_of(stack.ctx, ROLL_ID)
    assert_same_defects(before, celery_reference)
    with stack.ctx.session() as session:
        run_id = session.scalar(select(Run.id).where(Run.roll_id == ROLL_ID))
    mark = len(stack.published)
    for _ in range(2):
        stack.ctx.enqueue.ingest(ROLL_ID, seq, key)
        stack.ctx.enqueue.finalize(run_id)
    after = stack.published[mark:]
    assert [name for name, _ in after] == ["rollscan.ingest", "rollscan.finalize"] * 2
    results = wait_for_tasks(stack, in_flight + [task_id for _, task_id in after])
    assert [results[task_id] for task_id in in_flight] == ["'unchanged'"]
    assert [results[task_id] for _, task_id in after] == ["'unchanged'", str(len(before))] * 2
    assert defects_of(stack.ctx, ROLL_ID) == before
    assert_roll_done(stack, ROLL_ID)


def test_a_frame_waits_for_the_one_before_it_as_long_as_that_takes(
    make_stack, redis_broker, celery_roll, celery_reference
):
    """Frame 1 comes in late (a slow ingest on another worker process, a scanner's upload): the
    frames after it are retried until it is in — they were dropped after their third retry
    (Celery's default limit, which `retry(max_retries=None)` does not lift), 3.5 s in, and the
    roll stayed ingesting for good."""
    stack = make_stack(redis_broker)
    worker = stack.start_worker()
    held: list[tuple[str, int, str]] = []

    class FirstFrameLate(CeleryEnqueuer):
        def ingest(self, roll_id: str, seq: int, key: str) -> None:
            if seq == 1 and not held:
                held.append((roll_id, seq, key))
            else:
                super().ingest(roll_id, seq, key)

    submit(replace(stack.ctx, enqueue=FirstFrameLate()), str(celery_roll[0]))
    deadline = time.monotonic() + ROLL_TIMEOUT_S
    while not re.search(
        r"rollscan\.ingest\[[^]]+\] (raised unexpected|retry: Retry in 4)", worker.log()
    ):
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.2)
    assert "raised unexpected" not in worker.log(), worker.tail()  # past the fourth attempt
    stack.ctx.enqueue.ingest(*held[0])
    wait_until_done(stack, ROLL_ID, stack.workers)
    assert_roll_came_out(stack, celery_roll, celery_reference)


def test_a_roll_through_rabbitmq(make_stack, rabbitmq_broker, celery_roll, celery_reference):
    run_roll_and_check(make_stack(rabbitmq_broker), celery_roll, celery_reference)


def test_a_band_of_a_killed_worker_is_redelivered_to_the_next(
    make_stack, redis_broker, celery_roll, celery_reference
):
    stack = make_stack(redis_broker, broker_visibility_timeout=str(VISIBILITY_S))
    # one tile per model call: its band takes seconds, so the kill lands while it is scored
    first = stack.start_worker(batch_size="1")
    submit(stack.ctx, str(celery_roll[0]))
    m = first.wait_for_log(r"Task rollscan\.score\[([0-9a-f-]+)\] received", ROLL_TIMEOUT_S)
    received_at, task_id = time.monotonic(), m[1]
    time.sleep(0.3)  # into the task: the model loads, then the band's tiles are scored
    first.kill()
    with stack.ctx.session() as session:
        run = session.scalar(select(Run).where(Run.roll_id == ROLL_ID))
        assert run.bands_done == 0, "the band was done before the kill: make scoring slower"
    # Redis gives an unacknowledged task back once it is older than the visibility timeout;
    # a starting worker looks for such tasks at once (and then only every 100 s)
    time.sleep(max(0.0, received_at + VISIBILITY_S + 1 - time.monotonic()))
    second = stack.start_worker()
    wait_until_done(stack, ROLL_ID, [second])
    assert f"Task rollscan.score[{task_id}] received" in second.log(), second.tail()
    assert_roll_came_out(stack, celery_roll, celery_reference)


def test_a_worker_set_up_for_a_gpu_the_machine_lacks_stops_before_it_takes_work(
    make_stack, redis_broker, celery_roll, celery_reference
):
    """ROLLSCAN_DEVICE=cuda on a host without a GPU (or whose driver is gone) started a healthy
    worker that failed the roll of every band it took, at the band. It now stops at start-up,
    saying why, and the roll's work waits in the queue for a worker that can take it. A worker
    of the queues that run no model (ingest, finalize) is not held to the setting it shares
    with the site's scoring workers."""
    import torch

    from rollscan_testing.services import CELERY

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    stack = make_stack(redis_broker)
    submit(stack.ctx, str(celery_roll[0]))
    refused = stack.start_process(None, device="cuda")
    assert refused.proc.wait(timeout=ROLL_TIMEOUT_S) == 2, refused.tail()
    said = "this worker cannot run its model here: device 'cuda' requested but no CUDA GPU is available"
    assert said in refused.log() and "received" not in refused.log(), refused.tail()
    cpu_side = stack.start_process(
        [str(CELERY), "-A", "worker.app", "worker", "-Q", "ingest,finalize", "-c", "1",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info"],
        device="cuda",
    )  # fmt: skip
    cpu_side.wait_ready()
    scorer = stack.start_process(
        [str(CELERY), "-A", "worker.app", "worker", "-Q", "score", "-c", "1", "--without-gossip",
         "--without-mingle", "--without-heartbeat", "-l", "info", "-n", "scorer@%h"],
    )  # fmt: skip
    scorer.wait_ready()
    wait_until_done(stack, ROLL_ID, [cpu_side, scorer])
    assert_roll_came_out(stack, celery_roll, celery_reference)
    assert (
        "Task rollscan.ingest[" in cpu_side.log() and "Task rollscan.score[" not in cpu_side.log()
    )


def test_frames_a_broker_lost_are_sent_again_by_the_scheduler(
    make_stack, redis_broker, celery_roll, celery_reference
):
    """A Redis restarted without persistence loses the queued frames: the roll waited, ingesting,
    until an operator ran `rollscan resume`. The scheduler sends them again once the roll is
    idle and the broker's ingest queue is empty."""
    from datetime import timedelta

    import redis
    from sqlalchemy import func

    from scheduler.auto_resume import PIPELINE_QUEUES, AutoResume
    from scheduler.scheduler_metrics import queue_depths

    stack = make_stack(redis_broker)
    frames = len(submit(stack.ctx, str(celery_roll[0])).frames)  # no worker yet: all queued
    broker = redis.Redis.from_url(redis_broker)
    assert broker.llen("ingest") == frames
    broker.delete("ingest")  # the broker restarted without its queues
    auto = AutoResume(timedelta(hours=2), lambda: queue_depths(redis_broker, PIPELINE_QUEUES))
    with stack.ctx.session() as session:
        later = session.scalar(select(func.now())) + timedelta(hours=2, minutes=1)
    (resumed,) = auto.run(stack.ctx, now=later)
    assert resumed.frames == list(range(1, frames + 1))
    assert broker.llen("ingest") == frames and auto.run(stack.ctx, now=later) == []
    able = stack.start_worker()
    wait_until_done(stack, ROLL_ID, [able])
    assert_roll_came_out(stack, celery_roll, celery_reference)
