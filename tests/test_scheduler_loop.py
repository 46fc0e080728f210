"""The scheduler's loop around discovery: it backs off on a broker, database or S3 outage and
resumes without losing frames, telling transient errors from others; and the durations its
options take (`cli.arg_types.parse_duration`).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from datetime import timedelta

import boto3
import pytest
from botocore.config import Config
from fixtures_discovery import RecordingEnqueuer, ingests_of, manifest_of, put_frames, put_manifest
from kombu.exceptions import OperationalError

from cli.arg_types import parse_duration, positive_seconds
from rollscan_testing.services import free_port
from scheduler.discovery import discover_once
from scheduler.loop import run_scheduler
from storage.database import make_engine
from storage.objectstore import S3Store
from worker.context import WorkerContext
from worker.transient_errors import is_transient_error


def _run_until(ctx, done, **kwargs):
    stop = threading.Event()
    thread = threading.Thread(target=run_scheduler, args=(ctx, 0.02, stop), kwargs=kwargs)
    thread.start()
    deadline = time.monotonic() + 20
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


def test_the_loop_backs_off_on_a_broker_outage_and_resumes_without_losing_frames(rec, s3_store, caplog):  # fmt: skip
    put_manifest(s3_store, "R-0400", manifest_of("R-0400"))
    put_frames(s3_store, "R-0400", [1, 2])
    rec.enqueue.fail = 3  # the broker refuses the first three publishes
    with caplog.at_level(logging.INFO, logger="scheduler"):
        _run_until(rec, lambda: len(ingests_of(rec)) == 2, max_backoff_s=0.1)
    assert ingests_of(rec) == [("R-0400", 1), ("R-0400", 2)]
    assert caplog.text.count("pass failed (OperationalError") == 3
    assert "resumed after 3 failed pass(es)" in caplog.text


@pytest.mark.parametrize("down", ["database", "s3"])
def test_the_loop_survives_a_database_or_s3_outage(down, rec, discovery_settings, caplog):
    dead = f"127.0.0.1:{free_port()}"
    if down == "database":
        engine, store = make_engine(f"postgresql+psycopg2://x@{dead}/x"), rec.store
    else:
        engine = rec.engine
        store = S3Store(f"http://{dead}", "b", "us-east-1", "k", "s")
        config = Config(connect_timeout=0.2, retries={"total_max_attempts": 1})  # fail fast
        client = boto3.client("s3", endpoint_url=store.endpoint, region_name="us-east-1",
                              aws_access_key_id="k", aws_secret_access_key="s", config=config)  # fmt: skip
        store._client_pid = (client, os.getpid())
    ctx = WorkerContext(discovery_settings, engine, store, RecordingEnqueuer())
    with pytest.raises(Exception) as info:
        discover_once(ctx)
    assert is_transient_error(info.value)
    failures = []
    with caplog.at_level(logging.WARNING, logger="scheduler.discovery"):
        _run_until(ctx, lambda: len(failures) >= 2 or None, max_backoff_s=0.05,
                   metrics=type("M", (), {"update": lambda *a: None,
                                          "pass_failed": lambda _, kind: failures.append(kind)})())  # fmt: skip
    assert failures[:2] == ["transient", "transient"]
    assert "Traceback" not in caplog.text


def test_transient_errors_are_told_from_others():
    assert is_transient_error(OperationalError("connection refused"))
    wrapped = RuntimeError("enqueue failed")
    wrapped.__cause__ = OperationalError("broker down")
    assert is_transient_error(wrapped)
    assert not is_transient_error(ValueError("a bug"))


def test_durations_parse():
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("1h30m") == timedelta(hours=1, minutes=30)
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("off") is None and parse_duration("0") is None
    for bad in ("30 minutes", "m", "1x", ""):
        with pytest.raises(Exception, match="not a duration"):
            parse_duration(bad)
    for huge in ("99999999999d", "9" * 30):  # an OverflowError escaped argparse: a traceback
        with pytest.raises(argparse.ArgumentTypeError, match="too long a duration"):
            parse_duration(huge)


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "0", "1e9", "soon"])
def test_an_interval_that_is_no_positive_number_of_seconds_is_refused(text):
    """nan passed `<= 0` (a wait of nan returns at once: discovery passes back to back) and inf
    overflowed the loop's first wait."""
    with pytest.raises(argparse.ArgumentTypeError, match="positive number of seconds"):
        positive_seconds(text)
    assert positive_seconds("2.5") == 2.5
