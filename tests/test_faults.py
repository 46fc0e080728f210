"""Faults on real services while a roll is in flight: the roll completes, nothing is lost and
nothing is duplicated (issue 7).

Each test runs the broker tests' roll (tests/fixtures_roll.py) through a real `celery worker`
and breaks one service mid-roll: a PostgreSQL server of the test's own is restarted, the S3
server is cut off behind a TCP relay, a Redis broker of the test's own is restarted. Shared
services are never stopped (other test sessions may use them). Every test first proves that the
fault hit the roll (the worker's log shows the retry or the lost connection), then that the roll
came out whole: every frame ingested, every band scored once, the reference defects.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fault_servers import RedisServer, TcpRelay
from fixtures_celery import VISIBILITY_S, Stack
from fixtures_roll import (
    ROLL_ID,
    ROLL_TIMEOUT_S,
    assert_planted_found,
    assert_roll_done,
    assert_same_defects,
    defects_of,
    wait_until_done,
)  # fmt: skip
from sqlalchemy import make_url

from scheduler.submit import submit
from storage.database import upgrade
from storage.embedded_pg import start_embedded, stop_embedded

SCORE_RECEIVED = r"Task rollscan\.score\[([0-9a-f-]+)\] received"
OUTAGE_S = 6  # longer than a band takes: the band's closing writes meet the outage


def retried(task: str, log: str) -> bool:
    return re.search(rf"rollscan\.{task}\(.*\): transient error, retry in", log) is not None


def check_roll(stack: Stack, roll, reference: list[dict]) -> None:
    assert_roll_done(stack, ROLL_ID)
    found = defects_of(stack.ctx, ROLL_ID)
    assert_planted_found(found, roll[1])
    assert_same_defects(found, reference)


@dataclass
class OwnPostgres:
    data_dir: Path
    url: str

    def restart(self, down_s: float) -> None:
        stop_embedded(self.data_dir)  # fast mode: open sessions are terminated
        time.sleep(down_s)
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
    own_postgres.restart(down_s=OUTAGE_S)
    wait_until_done(stack, ROLL_ID, [worker])
    assert retried("score", worker.log()), worker.tail()
    check_roll(stack, celery_roll, celery_reference)


def test_an_s3_outage_during_ingest_skips_no_frame(
    s3_relay, make_stack, redis_broker, celery_roll, celery_reference
):
    stack = make_stack(redis_broker)
    worker = stack.start_worker(s3_endpoint=f"http://127.0.0.1:{s3_relay.port}")
    s3_relay.cut()
    submit(stack.ctx, str(celery_roll[0]))  # the test itself reaches S3 directly
    worker.wait_for_log(r"rollscan\.ingest\(.*\): transient error, retry in", ROLL_TIMEOUT_S)
    time.sleep(OUTAGE_S)
    s3_relay.restore()
    wait_until_done(stack, ROLL_ID, [worker])
    check_roll(stack, celery_roll, celery_reference)


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
    check_roll(stack, celery_roll, celery_reference)
