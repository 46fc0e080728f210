"""Upload discovery and the scheduler loop: S3 over HTTP (moto server), real PostgreSQL.

The end-to-end test runs the pipeline in-process (InlineEnqueuer) on rolls uploaded while the
scheduler runs; the others record what discovery enqueues and run nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.config import Config
from fixtures_s3 import make_s3_store
from kombu.exceptions import OperationalError
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from cli.arg_types import parse_duration
from rollscan_testing.services import free_port
from rollscan_testing.synthetic_roll import match_defects, write_synthetic_roll
from scheduler.discovery import (
    LOCK_KEY,
    RollCursor,
    discover_once,
    mark_stalled,
)
from scheduler.loop import run_scheduler
from scheduler.scheduler_metrics import SchedulerMetrics, queue_depths, start_metrics_server
from storage.database import make_engine
from storage.manifest import parse_manifest
from storage.objectstore import LocalStore, S3Store
from storage.registry import activate_model, register_model
from storage.schema import Defect, DiscoveryCursor, Frame, Grade, Model, Roll, Run
from storage.settings import Settings
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer
from worker.roll_rows import register_roll
from worker.transient_errors import is_transient_error

PX_PER_MM, BAND, ROWS, WIDTH = 10.0, 256, 256, 256  # frames of 256 rows, bands of 256
FABRIC = "demo-twill"


@dataclass
class RecordingEnqueuer:
    """Records what would be enqueued; `fail` raises a broker error for the next n ingests."""

    calls: list[tuple] = field(default_factory=list)
    fail: int = 0

    def ingest(self, roll_id: str, seq: int, key: str) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise OperationalError("[Errno 111] Connection refused (broker)")
        self.calls.append(("ingest", roll_id, seq))

    def score(self, run_id: int, band_index: int, reprocess: bool = False) -> None:
        self.calls.append(("score", run_id, band_index))

    def finalize(self, run_id: int) -> None:
        self.calls.append(("finalize", run_id))


@pytest.fixture
def settings(tmp_path):
    return Settings(band_height=BAND, data_dir=tmp_path / "data", device="cpu", batch_size=8)


@pytest.fixture
def store(s3_server):
    return make_s3_store(s3_server)


@pytest.fixture
def rec(db_engine, store, settings):
    """A context whose enqueuer only records; a (fake) active model so rolls can have runs."""
    ctx = WorkerContext(settings, db_engine, store, RecordingEnqueuer(), device="cpu")
    with ctx.session() as session:
        session.add(Model(version="fake-1", fabric_type=FABRIC, variant="residual", teacher="t",
                          tile=128, checkpoint_uri="none", sha256="0" * 64, threshold=1.0,
                          active=True))  # fmt: skip
    return ctx


def _inline_ctx(settings, engine, store):
    enqueuer = InlineEnqueuer()
    ctx = WorkerContext(settings, engine, store, enqueuer, device="cpu", batch_size=8)
    enqueuer.ctx = ctx
    return ctx


def _manifest(roll_id, frames=None, complete=False, **extra):
    return {"roll_id": roll_id, "fabric_type": FABRIC, "width_mm": WIDTH / PX_PER_MM,
            "px_per_mm": PX_PER_MM, "frames": frames, "complete": complete, **extra}  # fmt: skip


def _put_manifest(store, roll_id, manifest):
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    store.put(f"incoming/{roll_id}/manifest.json", data)


def _put_frames(store, roll_id, seqs, folder=None):
    for seq in seqs:
        data = (folder / "frames" / f"{seq:06d}.tif").read_bytes() if folder else b"frame%d" % seq
        store.put(f"incoming/{roll_id}/frames/{seq:06d}.tif", data)


def _ingests(ctx):
    return [c[1:] for c in ctx.enqueue.calls if c[0] == "ingest"]


def _roll(ctx, roll_id):
    with ctx.session() as session:
        return session.get(Roll, roll_id)


# ------------------------------------------------------------------------- end to end


def test_uploads_during_the_run_are_discovered_once_each_across_a_restart(
    db_engine, s3_server, store, settings, twill_model, tmp_path
):
    ctx = _inline_ctx(settings, db_engine, store)
    with ctx.session() as session:
        model, _ = register_model(session, store, twill_model, fabric_type=FABRIC)
        activate_model(session, model.version)
    metrics = SchedulerMetrics(queues=())
    metrics.update(ctx)  # the latency baseline: runs finishing from now on are observed
    latency_before = REGISTRY.get_sample_value("rollscan_roll_latency_seconds_count") or 0
    kw = {"frame_rows": ROWS, "width": WIDTH, "px_per_mm": PX_PER_MM}
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a_manifest, a_planted = write_synthetic_roll(a_dir, "R-0001", frames=4, plan=[("hole", (700, 128))], **kw)  # fmt: skip
    b_manifest, b_planted = write_synthetic_roll(b_dir, "R-0002", frames=2, plan=[("knot", (256, 140))], seed=11, **kw)  # fmt: skip

    # roll A starts streaming: manifest without a frame count, frames 1-2
    _put_manifest(store, "R-0001", {**a_manifest, "frames": None, "complete": False})
    _put_frames(store, "R-0001", [1, 2], a_dir)
    report = discover_once(ctx)
    assert report.new_rolls == ["R-0001"] and report.completed == []
    assert report.frames_enqueued == [("R-0001", 1), ("R-0001", 2)]
    ctx.enqueue.drain()

    # roll B arrives whole, its keys sorting after all of A's
    _put_frames(store, "R-0002", [1, 2], b_dir)
    _put_manifest(store, "R-0002", b_manifest)
    report = discover_once(ctx)
    assert (report.new_rolls, report.completed) == (["R-0002"], ["R-0002"])
    assert report.frames_enqueued == [("R-0002", 1), ("R-0002", 2)]
    ctx.enqueue.drain()
    assert _roll(ctx, "R-0002").status == "done"

    # the scheduler restarts: a new context (new S3 client, new queue), the same database
    first_log = ctx.enqueue.log
    ctx = _inline_ctx(settings, make_engine(db_engine.url), make_s3_store(s3_server, bucket=store.bucket))  # fmt: skip
    assert not discover_once(ctx)  # nothing new: nothing repeated

    # A's last frames land after B was listed, with keys that sort before B's
    assert "incoming/R-0001/frames/000003.tif" < "incoming/R-0002/frames/000001.tif"
    _put_frames(store, "R-0001", [3, 4], a_dir)
    _put_manifest(store, "R-0001", a_manifest)  # now complete, 4 frames
    report = discover_once(ctx)
    assert report.frames_enqueued == [("R-0001", 3), ("R-0001", 4)]
    assert (report.new_rolls, report.completed) == ([], ["R-0001"])
    ctx.enqueue.drain()
    assert not discover_once(ctx)
    ctx.engine.dispose()

    ingests = Counter(args[:2] for name, args in first_log + ctx.enqueue.log if name == "ingest_frame")  # fmt: skip
    assert ingests == {("R-0001", s): 1 for s in (1, 2, 3, 4)} | {("R-0002", 1): 1, ("R-0002", 2): 1}  # fmt: skip
    with ctx.session() as session:
        for roll_id, frames, planted in (("R-0001", 4, a_planted), ("R-0002", 2, b_planted)):
            roll = session.get(Roll, roll_id)
            assert roll.status == "done", roll.failure_reason
            n = session.scalar(select(func.count()).select_from(Frame).where(Frame.roll_id == roll_id))  # fmt: skip
            assert (n, roll.rows_ingested) == (frames, frames * ROWS)
            run = session.scalar(select(Run).where(Run.roll_id == roll_id, Run.is_current))
            found = [
                {"x_mm": d.x_mm, "y_mm": d.y_mm, "x0_mm": d.x0_mm, "y0_mm": d.y0_mm,
                 "x1_mm": d.x1_mm, "y1_mm": d.y1_mm}
                for d in session.scalars(select(Defect).where(Defect.run_id == run.id))
            ]  # fmt: skip
            matched, false = match_defects(planted, found, PX_PER_MM)
            assert sorted(matched) == [0] and len(false) <= 1, (roll_id, found)
    metrics.update(ctx)
    assert REGISTRY.get_sample_value("rollscan_roll_latency_seconds_count") == latency_before + 2


# ------------------------------------------------------------------------- discovery rules


def test_a_frame_waits_for_its_manifest_and_for_the_frames_before_it(rec, store):
    _put_frames(store, "R-0100", [1, 2, 4])
    report = discover_once(rec)
    assert not report and _roll(rec, "R-0100") is None  # no manifest: nothing happens yet
    _put_manifest(store, "R-0100", _manifest("R-0100"))
    report = discover_once(rec)
    assert report.new_rolls == ["R-0100"]
    assert _ingests(rec) == [("R-0100", 1), ("R-0100", 2)]  # 4 waits for 3
    assert not discover_once(rec)
    _put_frames(store, "R-0100", [3])
    assert discover_once(rec).frames_enqueued == [("R-0100", 3), ("R-0100", 4)]

    # frame 2 re-uploaded with other content after it was ingested: enqueued again, once
    etag1 = store.head("incoming/R-0100/frames/000001.tif").etag
    with rec.session() as session:
        for seq, etag in ((1, etag1), (2, "an-older-etag")):
            session.add(Frame(roll_id="R-0100", seq=seq, key=f"k{seq}", etag=etag,
                              row_start=(seq - 1) * ROWS, rows=ROWS))  # fmt: skip
    assert discover_once(rec).frames_enqueued == [("R-0100", 2)]
    assert not discover_once(rec)

    _put_manifest(store, "R-0100", _manifest("R-0100", frames=4, complete=True))
    report = discover_once(rec)
    assert (report.completed, report.frames_enqueued) == (["R-0100"], [])
    with rec.session() as session:
        cursor = RollCursor.load(session.get(DiscoveryCursor, "roll:R-0100").cursor)
    assert (cursor.seq, cursor.closed, cursor.update) == (4, True, False)
    _put_frames(store, "R-0100", [5])  # beyond the manifest, and the roll is closed anyway
    assert not discover_once(rec)
    assert Counter(_ingests(rec)) == {("R-0100", 1): 1, ("R-0100", 2): 2, ("R-0100", 3): 1, ("R-0100", 4): 1}  # fmt: skip


def test_a_corrupt_manifest_is_reported_once_and_nothing_of_it_is_written(rec, store, caplog):
    _put_manifest(store, "R-0200", b'{"roll_id": "R-0200", "fabric_type": ')
    _put_manifest(store, "R-0201", _manifest("R-0201"))
    _put_manifest(store, "R-0202", _manifest("R-9999"))
    for roll_id in ("R-0200", "R-0201", "R-0202"):
        _put_frames(store, roll_id, [1])
    with caplog.at_level(logging.ERROR, logger="scheduler.discovery"):
        report = discover_once(rec)
    assert report.new_rolls == ["R-0201"] and _ingests(rec) == [("R-0201", 1)]
    assert len(report.problems) == 2, report.problems
    assert "incoming/R-0200/manifest.json: refused" in report.problems[0]
    assert "not valid JSON" in report.problems[0]
    assert "'R-9999' is not its folder's name 'R-0202'" in report.problems[1]
    assert "not valid JSON" in caplog.text and "R-9999" in caplog.text
    assert _roll(rec, "R-0200") is None and _roll(rec, "R-0202") is None

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="scheduler.discovery"):
        assert not discover_once(rec)  # the same bad versions are not reported again
    assert caplog.text == ""

    # a registered roll's manifest may not change its geometry: refused, the roll unchanged
    _put_manifest(store, "R-0201", _manifest("R-0201", width_mm=99.0))
    _put_manifest(store, "R-0200", _manifest("R-0200"))  # fixed
    report = discover_once(rec)
    assert report.new_rolls == ["R-0200"] and _ingests(rec)[-1] == ("R-0200", 1)
    assert len(report.problems) == 1 and "changes width_mm" in report.problems[0]
    assert _roll(rec, "R-0201").width_mm == WIDTH / PX_PER_MM


def test_idle_rolls_are_marked_stalled_and_resume_when_frames_arrive(rec, store):
    _put_manifest(store, "R-0300", _manifest("R-0300"))
    _put_frames(store, "R-0300", [1])
    # every frame of a complete roll enqueued: waiting for workers, not for the scanner
    _put_manifest(store, "R-0302", _manifest("R-0302", frames=1, complete=True))
    _put_frames(store, "R-0302", [1])
    discover_once(rec)
    with rec.session() as session:  # a complete roll with every frame in is scoring, not stalled
        register_roll(session, parse_manifest(_manifest("R-0301", frames=1, complete=True)), "x")
        session.add(Frame(roll_id="R-0301", seq=1, key="k", etag="e", row_start=0, rows=ROWS))
    now = datetime.now(UTC)
    with rec.session() as session:
        assert mark_stalled(session, timedelta(minutes=30), now) == []
    later = now + timedelta(minutes=31)
    with rec.session() as session:
        assert mark_stalled(session, timedelta(minutes=30), later) == ["R-0300"]
    roll = _roll(rec, "R-0300")
    assert roll.status == "stalled"
    assert roll.failure_reason.startswith("stalled: no new frame since ")
    assert "; 1 frames arrived, 0 ingested, manifest not complete" in roll.failure_reason
    assert _roll(rec, "R-0301").status == _roll(rec, "R-0302").status == "registered"
    assert discover_once(rec, later).stalled == []  # already stalled: not again

    _put_frames(store, "R-0300", [2])
    report = discover_once(rec)  # now: the roll has just been active again
    assert report.frames_enqueued == [("R-0300", 2)] and report.stalled == []
    roll = _roll(rec, "R-0300")
    assert (roll.status, roll.failure_reason) == ("registered", None)


def test_one_scheduler_discovers_at_a_time(rec, store):
    _put_manifest(store, "R-0600", _manifest("R-0600"))
    _put_frames(store, "R-0600", [1])
    with rec.engine.connect() as other:  # another scheduler's pass is running
        other.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
        assert not discover_once(rec) and _ingests(rec) == []
        other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
    assert discover_once(rec).frames_enqueued == [("R-0600", 1)]


# ------------------------------------------------------------------------- the loop


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


def test_the_loop_backs_off_on_a_broker_outage_and_resumes_without_losing_frames(rec, store, caplog):  # fmt: skip
    _put_manifest(store, "R-0400", _manifest("R-0400"))
    _put_frames(store, "R-0400", [1, 2])
    rec.enqueue.fail = 3  # the broker refuses the first three publishes
    with caplog.at_level(logging.INFO, logger="scheduler"):
        _run_until(rec, lambda: len(_ingests(rec)) == 2, max_backoff_s=0.1)
    assert _ingests(rec) == [("R-0400", 1), ("R-0400", 2)]
    assert caplog.text.count("pass failed (OperationalError") == 3
    assert "resumed after 3 failed pass(es)" in caplog.text


@pytest.mark.parametrize("down", ["database", "s3"])
def test_the_loop_survives_a_database_or_s3_outage(down, rec, settings, caplog):
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
    ctx = WorkerContext(settings, engine, store, RecordingEnqueuer())
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


# ------------------------------------------------------------------------- metrics, beat, cli


def test_the_metrics_endpoint_serves_the_metric_names(rec):
    SchedulerMetrics(queues=()).update(rec)
    port = free_port()
    server = start_metrics_server(port, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
    for name in ("rollscan_tiles_scored_total", "rollscan_bands_in_flight",
                 "rollscan_roll_latency_seconds_bucket", "rollscan_rolls{status=\"done\"}",
                 "rollscan_frames_enqueued_total", "rollscan_scheduler_last_pass_timestamp_seconds",
                 "rollscan_rolls_idle"):  # fmt: skip
        assert name in text, name
    assert "# TYPE rollscan_queue_depth gauge" in text


def test_metrics_listen_on_loopback_unless_told() -> None:
    """The scheduler's and the workers' /metrics name rolls and queues: not for the LAN."""
    import psutil

    from worker.task_metrics import serve_metrics

    server = start_metrics_server(free_port())
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
    port = serve_metrics(free_port())
    listening = {
        c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
    }
    assert listening == {"127.0.0.1"}
    assert Settings().metrics_addr == "127.0.0.1"


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/10", "amqp://guest:guest@127.0.0.1:5672//"])  # fmt: skip
def test_queue_depth_is_asked_of_the_broker(broker):
    import uuid

    from kombu import Connection, Exchange, Queue

    name = f"rollscan-test-{uuid.uuid4().hex[:8]}"
    try:
        conn = Connection(broker, connect_timeout=2)
        conn.ensure_connection(max_retries=1, interval_start=0)
    except Exception as exc:
        pytest.skip(f"no broker at {broker}: {exc}")
    queue = Queue(name, Exchange(name), routing_key=name)
    with conn:
        producer = conn.Producer()
        for i in range(3):
            producer.publish({"n": i}, exchange=queue.exchange, routing_key=name, declare=[queue])
        try:  # RabbitMQ counts a message once it is routed: give the publishes a moment
            deadline, depths = time.monotonic() + 5, {}
            while depths.get(name) != 3 and time.monotonic() < deadline:
                depths = queue_depths(broker, (name, f"{name}-absent"))
            assert depths == {name: 3, f"{name}-absent": 0}
        finally:
            queue(conn.default_channel).delete()
    metrics = SchedulerMetrics(queues=(name,))
    metrics._from_broker(f"redis://127.0.0.1:{free_port()}/0")  # down: NaN, no exception
    value = REGISTRY.get_sample_value("rollscan_queue_depth", {"queue": name})
    assert value != value  # NaN


def test_nightly_grading_takes_the_rolls_finished_since_the_last_one(
    db_engine, settings, tmp_path, monkeypatch
):
    from scheduler.beat import InProcessScheduler, app, configure, grade_since_last, schedule

    entry = schedule(Settings(grade_at="03:15"))["grade-nightly"]
    assert (entry["task"], entry["schedule"].hour, entry["schedule"].minute) == ("rollscan.grade_nightly", {3}, {15})  # fmt: skip
    try:
        configure(app, Settings(timezone="Europe/Paris"))
        assert app.conf.timezone == "Europe/Paris"
        assert app.amqp.router.route({}, "rollscan.grade_nightly")["queue"].name == "grade"
        assert 0 < InProcessScheduler(app=app).tick() <= 300  # nothing due, no broker asked
    finally:
        configure(app, Settings())

    def finished_roll(session, roll_id, ago=timedelta(0)):
        manifest = _manifest(roll_id, frames=1, complete=True, width_mm=1600.0)
        register_roll(session, parse_manifest(manifest), "x")
        session.get(Roll, roll_id).status, session.get(Roll, roll_id).length_m = "done", 50.0
        session.add(Run(roll_id=roll_id, model_version="fake-1", purpose="live", status="done",
                        bands_total=1, bands_done=1, is_current=True,
                        finished_at=datetime.now(UTC) - ago))  # fmt: skip

    with Session(db_engine) as session, session.begin():
        session.add(Model(version="fake-1", fabric_type=FABRIC, variant="residual", teacher="t",
                          tile=128, checkpoint_uri="none", sha256="0" * 64, threshold=1.0))  # fmt: skip
        finished_roll(session, "R-0500", ago=timedelta(hours=1))
    grade = lambda: [r.roll_id for r in _in_session(db_engine, grade_since_last)]  # noqa: E731
    assert grade() == ["R-0500"]
    assert grade() == []
    with Session(db_engine) as session, session.begin():
        finished_roll(session, "R-0501")
    assert grade() == ["R-0501"]

    # the nightly task itself, configured by the environment: ROLLSCAN_GRADING_RULES applies
    import worker.tasks
    from scheduler.beat import grade_nightly

    rules = tmp_path / "rules.toml"
    rules.write_text(f'[fabric_types.{FABRIC}]\nacceptance = [["site-first", 40]]\n')
    monkeypatch.setenv("ROLLSCAN_DATABASE_URL", db_engine.url.render_as_string(False))
    monkeypatch.setenv("ROLLSCAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ROLLSCAN_GRADING_RULES", str(rules))
    monkeypatch.setattr(worker.tasks, "_context", None)
    with Session(db_engine) as session, session.begin():
        finished_roll(session, "R-0502")
    try:
        assert grade_nightly() == 2  # R-0502, and R-0501 again: within the clock margin
    finally:
        if worker.tasks._context is not None:
            worker.tasks._context.engine.dispose()
    with Session(db_engine) as session:
        assert session.scalar(select(Grade.grade).where(Grade.roll_id == "R-0502")) == "site-first"


def _in_session(engine, function):
    with Session(engine) as session, session.begin():
        return function(session)


def test_durations_parse():
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("1h30m") == timedelta(hours=1, minutes=30)
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("off") is None and parse_duration("0") is None
    for bad in ("30 minutes", "m", "1x", ""):
        with pytest.raises(Exception, match="not a duration"):
            parse_duration(bad)


def test_a_folder_name_with_a_newline_is_ignored_and_logged_escaped(
    db_engine, settings, tmp_path, caplog
):
    """`^…$` accepted "R-1\\n" (a trailing newline) as a roll id, and names went raw into the
    log: an uploader could forge log lines. The name is refused and shown escaped, once."""
    store = LocalStore(tmp_path / "objects")
    ctx = WorkerContext(settings, db_engine, store, RecordingEnqueuer(), device="cpu")
    forged = "R-1\n2026-01-01 00:00:00 INFO roll R-9 done"
    for name in ("R-1\n", forged):  # as a scanner's file share could name them
        folder = tmp_path / "objects" / "incoming" / name
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps(_manifest("R-1", frames=1)))
    caplog.set_level("INFO", logger="scheduler.discovery")
    for _ in range(2):
        report = discover_once(ctx)
        assert not report and _roll(ctx, "R-1") is None
    messages = [r.getMessage() for r in caplog.records if r.name == "scheduler.discovery"]
    assert len([m for m in messages if "not a roll id" in m]) == 2, messages  # once each
    assert not any("\n" in m for m in messages), messages
