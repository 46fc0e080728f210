"""Faults on real services while a roll is in flight: the roll completes, nothing is lost and
nothing is duplicated (issue 7).

Each test runs the broker tests' roll (tests/fixtures_roll.py) through a real `celery worker`
and breaks one service mid-roll: a PostgreSQL server of the test's own is restarted, the S3
server is cut off behind a TCP relay, a Redis broker of the test's own is restarted, a RabbitMQ
node of the test's own raises its resource alarm. Shared
services are never stopped (other test sessions may use them). Every test first proves that the
fault hit the roll (the worker's log shows the retry or the lost connection), then that the roll
came out whole: every frame ingested, every band scored once, the reference defects.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fault_servers import RedisServer, TcpRelay
from fixtures_celery import FABRIC, VISIBILITY_S
from fixtures_roll import (
    ROLL_ID,
    ROLL_TIMEOUT_S,
    assert_roll_came_out,
    defects_of,
    wait_until_done,
)  # fmt: skip
from sqlalchemy import func, make_url, select

from rollscan_testing.services import CELERY, PIPELINE_QUEUES
from rollscan_testing.synthetic_roll import match_defects, write_synthetic_roll
from scheduler.submit import submit, upload_folder
from storage.database import upgrade
from storage.embedded_pg import start_embedded, stop_embedded
from storage.schema import Frame, Roll

SCORE_RECEIVED = r"Task rollscan\.score\[([0-9a-f-]+)\] received"
SCORE_RETRY = r"rollscan\.score\(.*\): transient error, retry in"
OUTAGE_S = 6  # how long the S3 and broker outages last once they have hit the roll


@dataclass
class OwnPostgres:
    data_dir: Path
    url: str

    def restart(self, while_down: Callable[[], object]) -> None:
        """Stop the server, call `while_down`, start it again on the same port."""
        stop_embedded(self.data_dir)  # fast mode: open sessions are terminated
        try:
            while_down()
        finally:
            port = make_url(self.url).port
            server = start_embedded(self.data_dir)
        assert server.port == port, f"PostgreSQL came back on port {server.port}, not {port}"


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[OwnPostgres]:
    """A PostgreSQL server of this test's own (embedded), migrated; stopped at the end."""
    data_dir = tmp_path / "pg"
    server = start_embedded(data_dir)
    try:
        upgrade(server.url, "head")
        yield OwnPostgres(data_dir, server.url)
    finally:
        stop_embedded(data_dir)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_relay(s3_server: str) -> Iterator[TcpRelay]:
    relay = TcpRelay(make_url(s3_server.replace("http", "postgresql", 1)).port)
    try:
        yield relay
    finally:
        relay.cut()


# fixtures in this order: the server a test breaks is set up before its workers and so
# stopped after them


def test_a_postgresql_restart_mid_band_delays_the_roll_only(
    own_postgres, make_stack, redis_broker, celery_roll, celery_reference
):
    stack = make_stack(redis_broker, database_url=own_postgres.url)
    worker = stack.start_worker(batch_size="1")  # one tile per call: a band takes seconds
    submit(stack.ctx, str(celery_roll[0]))
    worker.wait_for_log(SCORE_RECEIVED, ROLL_TIMEOUT_S)
    # down until the band's writes have met the outage, however long the band takes on a busy
    # machine (a fixed outage ended before a band's closing writes under load)
    own_postgres.restart(lambda: worker.wait_for_log(SCORE_RETRY, ROLL_TIMEOUT_S))
    wait_until_done(stack, ROLL_ID, [worker])
    assert_roll_came_out(stack, celery_roll, celery_reference)


def test_s3_outages_during_ingest_and_scoring_skip_nothing(
    s3_relay, make_stack, redis_broker, celery_roll, celery_reference
):
    """Ingest meets the outage through boto3 (frames); scoring through zarr's obstore store
    (the roll image and the score shards), whose errors must be recognised as transient too."""
    stack = make_stack(redis_broker)
    worker = stack.start_worker(s3_endpoint=f"http://127.0.0.1:{s3_relay.port}", batch_size="1")
    s3_relay.cut()
    submit(stack.ctx, str(celery_roll[0]))  # the test itself reaches S3 directly
    worker.wait_for_log(r"rollscan\.ingest\(.*\): transient error, retry in", ROLL_TIMEOUT_S)
    time.sleep(OUTAGE_S)
    s3_relay.restore()
    # the second band: the model is loaded and the band's rows read, its tiles take seconds
    # (batch 1), so its score shard is written into the outage, through zarr and obstore
    worker.wait_for_log(r"Task rollscan\.score\[\S+\] received(?s:.*)"
                        r"Task rollscan\.score\[\S+\] received", ROLL_TIMEOUT_S)  # fmt: skip
    time.sleep(0.5)
    s3_relay.cut()
    worker.wait_for_log(SCORE_RETRY, ROLL_TIMEOUT_S)
    time.sleep(OUTAGE_S)
    s3_relay.restore()
    wait_until_done(stack, ROLL_ID, [worker])
    assert_roll_came_out(stack, celery_roll, celery_reference)


def test_a_broker_restart_mid_band_loses_no_work(
    own_redis, make_stack, celery_roll, celery_reference
):
    stack = make_stack(own_redis.url, broker_visibility_timeout=str(VISIBILITY_S))
    worker = stack.start_worker(batch_size="1")
    submit(stack.ctx, str(celery_roll[0]))
    in_flight = worker.wait_for_log(SCORE_RECEIVED, ROLL_TIMEOUT_S)[1]
    own_redis.stop()
    time.sleep(OUTAGE_S)
    own_redis.start()
    wait_until_done(stack, ROLL_ID, [worker])
    assert "Connection to broker lost" in worker.log(), worker.tail()
    # the band in flight was given up with the connection and delivered again, not dropped
    assert worker.log().count(f"Task rollscan.score[{in_flight}] received") == 2, worker.tail()
    assert_roll_came_out(stack, celery_roll, celery_reference)


def test_a_rabbitmq_resource_alarm_mid_roll_delays_the_roll_only(
    own_rabbitmq, make_stack, celery_roll, celery_reference
):
    """RabbitMQ blocks publishers while its memory or disk runs low. A task's publish waits for
    the broker's confirm until the alarm clears (it had returned with the message in the
    socket's buffer, and the task acknowledged its own with its successor not yet taken). The
    worker runs as the compose file's do (events, mingle, gossip, heartbeats): confirms on its
    main process froze its loop under the alarm, RabbitMQ dropped it for missed heartbeats,
    and its running band was terminated and run again."""
    stack = make_stack(own_rabbitmq.url)
    worker = stack.start_process(
        [str(CELERY), "-A", "worker.app", "worker", "-Q", ",".join(PIPELINE_QUEUES), "-c", "1",
         "-E", "-l", "info", "-n", f"alarm-{own_rabbitmq.port}@%h"], batch_size="1",
    )  # fmt: skip
    worker.wait_ready()
    submit(stack.ctx, str(celery_roll[0]))  # its frames confirmed: the alarm holds the worker's
    own_rabbitmq.alarm()
    worker.wait_for_log(r"WARNING/ForkPoolWorker-\d+\] the broker blocks publishing",
                        ROLL_TIMEOUT_S)  # fmt: skip
    time.sleep(3 * OUTAGE_S)  # many of the node's 2 s heartbeats
    own_rabbitmq.alarm(on=False)
    wait_until_done(stack, ROLL_ID, [worker])
    log = worker.log()
    assert "the broker takes publishes again after" in log, worker.tail()
    assert "Connection to broker lost" not in log and "cannot be acknowledged" not in log, log
    assert_roll_came_out(stack, celery_roll, celery_reference)


# --- the scheduler killed mid-pass -------------------------------------------------------------

SCANNED, SCANNED_FRAMES = 16, 2  # rolls uploaded before the scheduler starts, frames each


def queued_ingests(broker_url: str) -> Counter[tuple[str, int]]:
    """(roll, frame) → how many ingest messages wait for it in the Redis queue `ingest`."""
    import redis

    messages = redis.Redis.from_url(broker_url).lrange("ingest", 0, -1)
    args = [json.loads(base64.b64decode(json.loads(m)["body"]))[0] for m in messages]
    return Counter((roll_id, seq) for roll_id, seq, _ in args)


def test_a_scheduler_killed_mid_pass_misses_nothing_and_counts_nothing_twice(
    make_stack, redis_broker, tmp_path
):
    """SIGKILL lands while the scheduler's first pass enqueues frames; the restarted scheduler
    sends what was not sent. Frames enqueued just before the kill may go out once more (the
    pass had not yet recorded them): ingest is idempotent, so the rolls still come out with
    every frame once and every defect once."""
    stack = make_stack(redis_broker)
    planted = {}
    for k in range(SCANNED):
        roll_id = f"R-scan{k:02d}"
        _, planted[roll_id] = write_synthetic_roll(
            tmp_path / "scanned" / roll_id, roll_id, frames=SCANNED_FRAMES, frame_rows=256,
            width=256, plan=[("hole", (256, 128))], px_per_mm=10.0, fabric_type=FABRIC, seed=k,
        )  # fmt: skip
        upload_folder(stack.ctx.store, tmp_path / "scanned" / roll_id, "incoming")
    expected = {(f"R-scan{k:02d}", s) for k in range(SCANNED) for s in range(1, 3)}
    command = [sys.executable, "-m", "cli", "scheduler", "--interval", "0.2",
               "--metrics-port", "0"]  # fmt: skip

    first = stack.start_process(command)
    deadline = time.monotonic() + 120
    while not queued_ingests(redis_broker):
        if first.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the scheduler enqueued nothing\n{first.tail()}")
        time.sleep(0.005)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=30)
    at_kill = queued_ingests(redis_broker)
    assert set(at_kill) < expected, "the first pass ended before the kill: upload more rolls"

    second = stack.start_process(command)
    deadline = time.monotonic() + 120
    while set(queued_ingests(redis_broker)) != expected:
        if second.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"frames never enqueued: {expected - set(queued_ingests(redis_broker))}"
                        f"\n{second.tail()}")  # fmt: skip
        time.sleep(0.2)
    time.sleep(2)  # ten more passes: none may send anything again
    sent = queued_ingests(redis_broker)
    second.stop()
    repeated = {key: n for key, n in sent.items() if n > 1}
    assert all(key in at_kill for key in repeated), (repeated, at_kill)  # only the kill's own

    worker = stack.start_worker()
    deadline = time.monotonic() + ROLL_TIMEOUT_S
    while True:
        with stack.ctx.session() as session:
            done = session.scalar(
                select(func.count()).select_from(Roll).where(Roll.status == "done")
            )
        if done == SCANNED:
            break
        if worker.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{done} of {SCANNED} rolls done\n{stack.diagnosis()}")
        time.sleep(0.5)
    with stack.ctx.session() as session:
        frames = Counter(session.scalars(select(Frame.roll_id)))
        assert frames == {roll_id: SCANNED_FRAMES for roll_id in planted}
    for roll_id, plan in planted.items():
        found = defects_of(stack.ctx, roll_id)
        matched, _ = match_defects(plan, found, 10.0)
        assert sorted(matched) == [0], (roll_id, found)
        boxes = [tuple(d[k] for k in ("x_mm", "y_mm", "x0_mm", "y0_mm", "x1_mm", "y1_mm"))
                 for d in found]  # fmt: skip
        assert len(set(boxes)) == len(boxes), (roll_id, found)  # no defect written twice
