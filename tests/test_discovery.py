"""Upload discovery on S3 over HTTP (moto server) and a real PostgreSQL, and the nightly
grading the scheduler process also runs. The loop around discovery: test_scheduler_loop.py;
the metrics: test_scheduler_metrics.py; folder names: test_discovery_names.py.

The end-to-end test runs the pipeline in-process (InlineEnqueuer) on rolls uploaded while the
scheduler runs; the others record what discovery enqueues (tests/fixtures_discovery.py) and
run nothing.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from fixtures_discovery import (
    FABRIC,
    PX_PER_MM,
    ROWS,
    WIDTH,
    ingests_of,
    manifest_of,
    put_frames,
    put_manifest,
    roll_row,
)
from fixtures_s3 import make_s3_store
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from rollscan_testing.synthetic_roll import match_defects, write_synthetic_roll
from scheduler.discovery import LOCK_KEY, discover_once, list_roll
from scheduler.roll_cursors import RollCursor
from scheduler.scheduler_metrics import SchedulerMetrics
from scheduler.stalls import mark_stalled
from scheduler.submit import read_prefix
from storage.database import make_engine
from storage.manifest import parse_manifest
from storage.registry import activate_model, register_model
from storage.schema import Defect, DiscoveryCursor, Frame, Grade, Model, Roll, Run
from storage.settings import Settings
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer
from worker.roll_rows import register_roll

DOWN = "127.0.0.1:1"  # nothing listens on port 1


def _inline_ctx(settings, engine, store):
    enqueuer = InlineEnqueuer()
    ctx = WorkerContext(settings, engine, store, enqueuer, device="cpu", batch_size=8)
    enqueuer.ctx = ctx
    return ctx


# ------------------------------------------------------------------------- end to end


def test_uploads_during_the_run_are_discovered_once_each_across_a_restart(
    db_engine, s3_server, s3_store, discovery_settings, twill_model, tmp_path
):
    ctx = _inline_ctx(discovery_settings, db_engine, s3_store)
    with ctx.session() as session:
        model, _ = register_model(session, s3_store, twill_model, fabric_type=FABRIC)
        activate_model(session, model.version)
    metrics = SchedulerMetrics(queues=())
    metrics.update(ctx)  # the latency baseline: runs finishing from now on are observed
    latency_before = REGISTRY.get_sample_value("rollscan_roll_latency_seconds_count") or 0
    kw = {"frame_rows": ROWS, "width": WIDTH, "px_per_mm": PX_PER_MM}
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a_manifest, a_planted = write_synthetic_roll(a_dir, "R-0001", frames=4, plan=[("hole", (700, 128))], **kw)  # fmt: skip
    b_manifest, b_planted = write_synthetic_roll(b_dir, "R-0002", frames=2, plan=[("knot", (256, 140))], seed=11, **kw)  # fmt: skip

    # roll A starts streaming: manifest without a frame count, frames 1-2
    put_manifest(s3_store, "R-0001", {**a_manifest, "frames": None, "complete": False})
    put_frames(s3_store, "R-0001", [1, 2], a_dir)
    report = discover_once(ctx)
    assert report.new_rolls == ["R-0001"] and report.completed == []
    assert report.frames_enqueued == [("R-0001", 1), ("R-0001", 2)]
    ctx.enqueue.drain()

    # roll B arrives whole, its keys sorting after all of A's
    put_frames(s3_store, "R-0002", [1, 2], b_dir)
    put_manifest(s3_store, "R-0002", b_manifest)
    report = discover_once(ctx)
    assert (report.new_rolls, report.completed) == (["R-0002"], ["R-0002"])
    assert report.frames_enqueued == [("R-0002", 1), ("R-0002", 2)]
    ctx.enqueue.drain()
    assert roll_row(ctx, "R-0002").status == "done"

    # the scheduler restarts: a new context (new S3 client, new queue), the same database
    first_log = ctx.enqueue.log
    ctx = _inline_ctx(discovery_settings, make_engine(db_engine.url), make_s3_store(s3_server, bucket=s3_store.bucket))  # fmt: skip
    assert not discover_once(ctx)  # nothing new: nothing repeated

    # A's last frames land after B was listed, with keys that sort before B's
    assert "incoming/R-0001/frames/000003.tif" < "incoming/R-0002/frames/000001.tif"
    put_frames(s3_store, "R-0001", [3, 4], a_dir)
    put_manifest(s3_store, "R-0001", a_manifest)  # now complete, 4 frames
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


def test_a_frame_waits_for_its_manifest_and_for_the_frames_before_it(rec, s3_store):
    put_frames(s3_store, "R-0100", [1, 2, 4])
    report = discover_once(rec)
    assert not report and roll_row(rec, "R-0100") is None  # no manifest: nothing happens yet
    put_manifest(s3_store, "R-0100", manifest_of("R-0100"))
    report = discover_once(rec)
    assert report.new_rolls == ["R-0100"]
    assert ingests_of(rec) == [("R-0100", 1), ("R-0100", 2)]  # 4 waits for 3
    assert not discover_once(rec)
    put_frames(s3_store, "R-0100", [3])
    assert discover_once(rec).frames_enqueued == [("R-0100", 3), ("R-0100", 4)]

    # frame 2 re-uploaded with other content after it was ingested: enqueued again, once
    etag1 = s3_store.head("incoming/R-0100/frames/000001.tif").etag
    with rec.session() as session:
        for seq, etag in ((1, etag1), (2, "an-older-etag")):
            session.add(Frame(roll_id="R-0100", seq=seq, key=f"k{seq}", etag=etag,
                              row_start=(seq - 1) * ROWS, rows=ROWS))  # fmt: skip
    assert discover_once(rec).frames_enqueued == [("R-0100", 2)]
    assert not discover_once(rec)

    put_manifest(s3_store, "R-0100", manifest_of("R-0100", frames=4, complete=True))
    report = discover_once(rec)
    assert (report.completed, report.frames_enqueued) == (["R-0100"], [])
    with rec.session() as session:
        cursor = RollCursor.load(session.get(DiscoveryCursor, "roll:R-0100").cursor)
    # every frame sent, but open until the roll is done: a frame written again meanwhile is seen
    assert (cursor.seq, cursor.closed, cursor.update) == (4, False, False)
    put_frames(s3_store, "R-0100", [5])  # beyond the manifest
    assert not discover_once(rec)
    with rec.session() as session:
        session.get(Roll, "R-0100").status = "done"
    assert not discover_once(rec)
    with rec.session() as session:
        assert RollCursor.load(session.get(DiscoveryCursor, "roll:R-0100").cursor).closed
    assert Counter(ingests_of(rec)) == {("R-0100", 1): 1, ("R-0100", 2): 2, ("R-0100", 3): 1, ("R-0100", 4): 1}  # fmt: skip


def test_a_corrupt_manifest_is_reported_once_and_nothing_of_it_is_written(rec, s3_store, caplog):
    put_manifest(s3_store, "R-0200", b'{"roll_id": "R-0200", "fabric_type": ')
    put_manifest(s3_store, "R-0201", manifest_of("R-0201"))
    put_manifest(s3_store, "R-0202", manifest_of("R-9999"))
    for roll_id in ("R-0200", "R-0201", "R-0202"):
        put_frames(s3_store, roll_id, [1])
    with caplog.at_level(logging.ERROR, logger="scheduler.discovery"):
        report = discover_once(rec)
    assert report.new_rolls == ["R-0201"] and ingests_of(rec) == [("R-0201", 1)]
    assert len(report.problems) == 2, report.problems
    assert "incoming/R-0200/manifest.json: refused" in report.problems[0]
    assert "not valid JSON" in report.problems[0]
    assert "'R-9999' is not its folder's name 'R-0202'" in report.problems[1]
    assert "not valid JSON" in caplog.text and "R-9999" in caplog.text
    assert roll_row(rec, "R-0200") is None and roll_row(rec, "R-0202") is None

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="scheduler.discovery"):
        assert not discover_once(rec)  # the same bad versions are not reported again
    assert caplog.text == ""

    # a registered roll's manifest may not change its geometry: refused, the roll unchanged
    put_manifest(s3_store, "R-0201", manifest_of("R-0201", width_mm=99.0))
    put_manifest(s3_store, "R-0200", manifest_of("R-0200"))  # fixed
    report = discover_once(rec)
    assert report.new_rolls == ["R-0200"] and ingests_of(rec)[-1] == ("R-0200", 1)
    assert len(report.problems) == 1 and "changes width_mm" in report.problems[0]
    assert roll_row(rec, "R-0201").width_mm == WIDTH / PX_PER_MM


def test_idle_rolls_are_marked_stalled_and_resume_when_frames_arrive(rec, s3_store):
    put_manifest(s3_store, "R-0300", manifest_of("R-0300"))
    put_frames(s3_store, "R-0300", [1])
    # every frame of a complete roll enqueued: waiting for workers, not for the scanner
    put_manifest(s3_store, "R-0302", manifest_of("R-0302", frames=1, complete=True))
    put_frames(s3_store, "R-0302", [1])
    discover_once(rec)
    with rec.session() as session:  # a complete roll with every frame in is scoring, not stalled
        register_roll(session, parse_manifest(manifest_of("R-0301", frames=1, complete=True)), "x")
        session.add(Frame(roll_id="R-0301", seq=1, key="k", etag="e", row_start=0, rows=ROWS))
    now = datetime.now(UTC)
    with rec.session() as session:
        assert mark_stalled(session, timedelta(minutes=30), now) == []
    later = now + timedelta(minutes=31)
    with rec.session() as session:
        assert mark_stalled(session, timedelta(minutes=30), later) == ["R-0300"]
    roll = roll_row(rec, "R-0300")
    assert roll.status == "stalled"
    assert roll.failure_reason.startswith("stalled: no new frame since ")
    assert "; 1 frames arrived in order, 0 ingested, manifest not complete" in roll.failure_reason
    assert roll_row(rec, "R-0301").status == roll_row(rec, "R-0302").status == "registered"
    assert discover_once(rec, later).stalled == []  # already stalled: not again

    put_frames(s3_store, "R-0300", [2])
    report = discover_once(rec)  # now: the roll has just been active again
    assert report.frames_enqueued == [("R-0300", 2)] and report.stalled == []
    roll = roll_row(rec, "R-0300")
    assert (roll.status, roll.failure_reason) == ("registered", None)


def test_a_stalled_roll_names_the_frame_its_later_frames_wait_for(rec, s3_store):
    """Frame 2 never came, 3–5 did: the reason said "1 of 5 frames arrived" — as if four were
    still to come from the scanner — and not which one to upload again."""
    put_manifest(s3_store, "R-0310", manifest_of("R-0310", frames=5, complete=True))
    put_frames(s3_store, "R-0310", [1, 3, 4, 5])
    put_manifest(s3_store, "R-0311", manifest_of("R-0311", frames=3, complete=True))
    put_frames(s3_store, "R-0311", [1, 3])
    s3_store.put("incoming/R-0311/frames/2.tif", s3_store.get("incoming/R-0311/frames/000003.tif"))
    s3_store.put("incoming/R-0311/frames/02.tif", s3_store.get("incoming/R-0311/frames/000003.tif"))
    discover_once(rec)
    assert ("R-0310", 3) not in ingests_of(rec)  # frames after a gap wait for it
    later = datetime.now(UTC) + timedelta(minutes=31)
    assert sorted(discover_once(rec, later).stalled) == ["R-0310", "R-0311"]
    reason = roll_row(rec, "R-0310").failure_reason
    assert (
        "; 1 of 5 frames arrived in order, 0 ingested; frame 2 is missing: 3 later frame(s), up to 5, wait for it"
        in reason
    )
    reason = roll_row(rec, "R-0311").failure_reason
    assert "; frame 2 is given by two objects: 1 later frame(s), up to 3, wait for it" in reason


def test_a_roll_whose_row_another_session_holds_holds_up_no_other(rec, s3_store, monkeypatch):
    """A transaction left open on one roll's row (or a finalize of a long roll) held the whole
    pass — no new roll registered anywhere — for as long as it lasted, and said nothing."""
    import threading

    import scheduler.discovery

    monkeypatch.setattr(scheduler.discovery, "ROLL_LOCK_WAIT_S", 0.5)
    put_manifest(s3_store, "R-0320", manifest_of("R-0320"))
    put_frames(s3_store, "R-0320", [1])
    discover_once(rec)
    put_frames(s3_store, "R-0320", [2])  # and the scanner completes its manifest: registered
    put_manifest(s3_store, "R-0320", manifest_of("R-0320", frames=2, complete=True))  # FOR UPDATE
    put_manifest(s3_store, "R-0321", manifest_of("R-0321"))
    put_frames(s3_store, "R-0321", [1])
    reports: list = []
    with rec.engine.connect() as holder:  # an operator's psql, left open
        holder.execute(text("SELECT 1 FROM rolls WHERE id = 'R-0320' FOR UPDATE"))
        passing = threading.Thread(target=lambda: reports.append(discover_once(rec)), daemon=True)
        passing.start()
        passing.join(timeout=120)
        assert not passing.is_alive(), "the pass waited for the held roll"
        holder.rollback()
    assert reports[0].new_rolls == ["R-0321"] and ("R-0321", 1) in ingests_of(rec)
    assert roll_row(rec, "R-0320").complete is False  # left for the next pass
    discover_once(rec)  # released: the held roll's manifest is taken, its frame sent
    with rec.session() as session:
        cursor = session.get(DiscoveryCursor, "roll:R-0320")
        assert RollCursor.load(cursor.cursor).seq == 2
    assert roll_row(rec, "R-0320").complete is True


def test_one_scheduler_discovers_at_a_time(rec, s3_store):
    put_manifest(s3_store, "R-0600", manifest_of("R-0600"))
    put_frames(s3_store, "R-0600", [1])
    with rec.engine.connect() as other:  # another scheduler's pass is running
        other.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
        assert not discover_once(rec) and ingests_of(rec) == []
        other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
    assert discover_once(rec).frames_enqueued == [("R-0600", 1)]


# ------------------------------------------------------------------------- the nightly beat


def test_nightly_grading_takes_the_rolls_finished_since_the_last_one(
    db_engine, discovery_settings, tmp_path, env_context
):
    from scheduler.beat import InProcessScheduler, app, configure, grade_since_last, schedule

    entry = schedule(Settings(grade_at="03:15"))["grade-nightly"]
    assert (entry["task"], entry["schedule"].hour, entry["schedule"].minute) == ("rollscan.grade_nightly", {3}, {15})  # fmt: skip
    assert str(app.timezone) == "UTC"  # read, so Celery caches it
    try:
        configure(app, Settings(timezone="Europe/Paris"))
        # the beat's own zone, not only the setting's: a cached zone kept the gradings at UTC's
        assert (app.conf.timezone, str(app.timezone)) == ("Europe/Paris", "Europe/Paris")
        assert app.amqp.router.route({}, "rollscan.grade_nightly")["queue"].name == "grade"
        assert 0 < InProcessScheduler(app=app).tick() <= 300  # nothing due, no broker asked
    finally:
        configure(app, Settings())
    assert str(app.timezone) == "UTC"

    def finished_roll(session, roll_id, ago=timedelta(0)):
        manifest = manifest_of(roll_id, frames=1, complete=True, width_mm=1600.0)
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
    from scheduler.beat import grade_nightly

    rules = tmp_path / "rules.toml"
    rules.write_text(f'[fabric_types.{FABRIC}]\nacceptance = [["site-first", 40]]\n')
    env_context(db_engine, tmp_path / "data", ROLLSCAN_GRADING_RULES=str(rules))
    with Session(db_engine) as session, session.begin():
        finished_roll(session, "R-0502")
    assert grade_nightly() == 2  # R-0502, and R-0501 again: within the clock margin
    with Session(db_engine) as session:
        assert session.scalar(select(Grade.grade).where(Grade.roll_id == "R-0502")) == "site-first"


def test_the_embedded_beat_makes_up_a_missed_night_and_retries_a_failed_grading(
    db_engine, tmp_path, env_context
):
    """Its schedule lived in memory: a scheduler down over the grading time (a deploy) skipped
    that night, and a grading that failed (the database restarting at that minute) waited for
    the next night. Now the last grading's time comes from the database, and a failure is
    tried again after a back-off."""
    from scheduler.beat import (
        GRADING_RETRY,
        InProcessScheduler,
        app,
        configure,
        grade_since_last,
        last_grading,
    )

    def mark() -> datetime | None:
        with Session(db_engine) as session:
            return last_grading(session)

    def use_database(database) -> None:
        env_context(database, tmp_path / "data")

    use_database(db_engine)
    configure(app, Settings(grade_at="02:00", timezone="Europe/Paris"))
    now = [1000.0]
    try:
        _in_session(db_engine, grade_since_last)  # graded once, two days ago
        two_days_ago = datetime.now(UTC) - timedelta(days=2)
        with Session(db_engine) as session, session.begin():
            cursor = session.get(DiscoveryCursor, "grading")
            cursor.updated_at = two_days_ago
        assert mark() == two_days_ago
        # a restart: yesterday's 02:00 passed since the last grading, so it runs at once
        beat = InProcessScheduler(app=app, lazy=False, last_run=mark, clock=lambda: now[0])
        beat.tick()
        assert mark() > two_days_ago + timedelta(days=1)
        before = mark()
        InProcessScheduler(app=app, lazy=False, last_run=mark, clock=lambda: now[0]).tick()
        assert mark() == before  # once: a second restart has nothing to make up

        with Session(db_engine) as session, session.begin():
            session.get(DiscoveryCursor, "grading").updated_at = two_days_ago
        use_database(f"postgresql+psycopg2://postgres@{DOWN}/rollscan")  # down at 02:00
        beat = InProcessScheduler(app=app, lazy=False, last_run=mark, clock=lambda: now[0])
        beat.tick()
        use_database(db_engine)  # back a moment later
        now[0] += GRADING_RETRY.delay(0) / 2
        beat.tick()
        assert mark() == two_days_ago  # not before the back-off
        now[0] += GRADING_RETRY.delay(0)
        beat.tick()
        assert mark() > two_days_ago + timedelta(days=1)  # the same night, not the next
    finally:
        configure(app, Settings())


def _in_session(engine, function):
    with Session(engine) as session, session.begin():
        return function(session)


def test_frames_written_again_numbered_twice_or_nested_are_taken_as_discovery_lists_them(
    rec, s3_store
):
    """A frame written again after every frame went out is seen while the roll is not done; a
    version re-sent and then written back is sent again when it returns; two objects numbered
    alike are reported once and neither is taken until one goes; a frame in a subfolder of
    frames/ is no frame, for `submit` as for discovery."""
    put_manifest(s3_store, "R-0300", manifest_of("R-0300", frames=3, complete=True))
    put_frames(s3_store, "R-0300", [1, 2, 3])
    assert discover_once(rec).frames_enqueued == [("R-0300", s) for s in (1, 2, 3)]
    with rec.session() as session:  # ingested as listed
        for seq in (1, 2, 3):
            etag = s3_store.head(f"incoming/R-0300/frames/{seq:06d}.tif").etag
            session.add(Frame(roll_id="R-0300", seq=seq, key=f"k{seq}", etag=etag,
                              row_start=(seq - 1) * ROWS, rows=ROWS))  # fmt: skip
    assert not discover_once(rec)
    key = "incoming/R-0300/frames/000003.tif"
    s3_store.put(key, b"frame 3, fixed")  # the scanner sends it again: the roll is scoring
    assert discover_once(rec).frames_enqueued == [("R-0300", 3)]
    s3_store.put(key, b"frame3")  # back to the version ingested before that ingest ran
    assert not discover_once(rec)
    s3_store.put(key, b"frame 3, fixed")  # and the fixed one again: sent again
    assert discover_once(rec).frames_enqueued == [("R-0300", 3)]

    put_manifest(s3_store, "R-0301", manifest_of("R-0301"))
    put_frames(s3_store, "R-0301", [1, 2, 3])
    s3_store.put("incoming/R-0301/frames/2.tif", b"another frame 2")
    report = discover_once(rec)
    assert report.frames_enqueued == [("R-0301", 1)]  # 2 is whose? 3 waits for it
    assert report.problems == [
        "roll R-0301: 1 frame number(s) given by several objects (2: ['incoming/R-0301/frames/"
        "000002.tif', 'incoming/R-0301/frames/2.tif']): none of them is taken until one is removed"
    ]
    assert not discover_once(rec)  # reported once
    s3_store.delete("incoming/R-0301/frames/2.tif")
    assert discover_once(rec).frames_enqueued == [("R-0301", 2), ("R-0301", 3)]

    s3_store.put("incoming/R-0301/frames/old/000004.tif", b"a rejected frame 4")
    assert list_roll(s3_store, "incoming/R-0301")[1].keys() == {1, 2, 3}
    assert [seq for seq, _ in read_prefix(s3_store, "incoming/R-0301")[1].frames] == [1, 2, 3]


def test_a_roll_submitted_while_the_scheduler_runs_is_sent_once_and_a_redelivery_sends_its_own_bands(
    rec, tmp_path
):
    """`rollscan submit FOLDER` uploads to the folder discovery lists: its next pass sent every
    frame again (it counted only the frames ingested), and each copy's ingest announced every
    band waiting to be scored — 20 frames of one band each made 420 score messages."""
    import numpy as np
    import tifffile

    from scheduler.submit import submit
    from worker.ingest import ingest_frame

    frames = 8
    folder = tmp_path / "R-0500"
    (folder / "frames").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest_of("R-0500", frames, True)))
    noise = np.random.default_rng(3)
    for seq in range(1, frames + 1):
        tifffile.imwrite(folder / "frames" / f"{seq:06d}.tif",
                         noise.integers(0, 255, (ROWS, WIDTH), dtype=np.uint8))  # fmt: skip
    submit(rec, str(folder))
    assert ingests_of(rec) == [("R-0500", seq) for seq in range(1, frames + 1)]
    assert not discover_once(rec, stall_after=None).frames_enqueued
    for seq in range(1, frames + 1):  # an ingest worker, before any band is scored
        assert (
            ingest_frame(rec, "R-0500", seq, f"incoming/R-0500/frames/{seq:06d}.tif") == "ingested"
        )
    scores = Counter(c[2] for c in rec.enqueue.calls if c[0] == "score")
    assert set(scores.values()) == {1}
    # a copy of frame 2 (a redelivery): the bands beside its rows only, not all eight
    rec.enqueue.calls.clear()
    assert ingest_frame(rec, "R-0500", 2, "incoming/R-0500/frames/000002.tif") == "unchanged"
    again = sorted(c[2] for c in rec.enqueue.calls if c[0] == "score")
    assert again and set(again) <= {0, 1, 2} and len(again) < len(scores)


def test_a_folder_with_nothing_new_is_listed_less_often_and_seen_again(rec, s3_store):
    """Open folders were listed whole every pass, for ever: 1,500 stalled rolls, refused
    manifests or folders that are no roll made a 10-second pass take 34 s."""
    t = [0.0]

    def passes(at: float):
        t[0] = at
        return discover_once(rec, stall_after=None, clock=lambda: t[0])

    put_frames(s3_store, "R-0600", [1, 2])  # frames, no manifest yet
    put_manifest(s3_store, "R-0601", manifest_of("R-0601"))
    assert passes(0).new_rolls == ["R-0601"]
    for at in (100, 200, 400):  # nothing new in R-0600 for 400 s: listed every pass until 300 s
        assert not passes(at)
    put_manifest(s3_store, "R-0600", manifest_of("R-0600"))
    put_frames(s3_store, "R-0601", [1])
    report = passes(450)  # R-0600 quiet for 450 s, listed 50 s ago: not again within 112 s
    assert report.new_rolls == [] and report.frames_enqueued == []  # R-0601 too: quiet as long
    report = passes(540)  # quiet 540 s, listed 140 s ago (≥ 540 / 4)
    assert report.new_rolls == ["R-0600"]
    assert sorted(report.frames_enqueued) == [("R-0600", 1), ("R-0600", 2), ("R-0601", 1)]
    put_frames(s3_store, "R-0600", [3])
    assert passes(550).frames_enqueued == [("R-0600", 3)]  # active again: every pass


def test_a_redelivery_announces_the_bands_its_rows_made_ready_however_far_the_model_reads(
    rec, tmp_path
):
    """A band is ready once the rows reach its end plus the model's reach, which may pass a
    band's height (a 512 tile over bands of 256): the copy of a last frame whose score messages
    the broker refused announced bands within one band height only, and one was never scored."""
    import numpy as np
    import tifffile
    from kombu.exceptions import OperationalError

    from worker.ingest import ingest_frame

    with rec.session() as session:
        session.execute(text("UPDATE models SET tile = 512"))
    with rec.session() as session:
        register_roll(session, parse_manifest(manifest_of("R-0700", 4, True)), "incoming/R-0700")
    noise = np.random.default_rng(5)
    keys = []
    for seq in range(1, 5):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, noise.integers(0, 255, (ROWS, WIDTH), dtype=np.uint8))
        keys.append(f"incoming/R-0700/frames/{seq:06d}.tif")
        rec.store.put(keys[-1], buffer.getvalue())
    for seq in (1, 2, 3):
        assert ingest_frame(rec, "R-0700", seq, keys[seq - 1]) == "ingested"
    refused = [1]

    def score(run_id: int, band_index: int, reprocess: bool = False) -> None:
        if refused.pop() if refused else False:
            raise OperationalError("[Errno 111] Connection refused (broker)")
        rec.enqueue.calls.append(("score", run_id, band_index))

    rec.enqueue.score = score
    with pytest.raises(OperationalError):
        ingest_frame(rec, "R-0700", 4, keys[3])  # committed; its score messages not sent
    assert ingest_frame(rec, "R-0700", 4, keys[3]) == "unchanged"  # the task's retry
    with rec.session() as session:
        pending = session.scalars(text(
            "SELECT band_index FROM bands JOIN runs ON runs.id = bands.run_id "
            "WHERE runs.roll_id = 'R-0700' AND bands.status = 'pending'"
        )).all()  # fmt: skip
    announced = {c[2] for c in rec.enqueue.calls if c[0] == "score"}
    assert pending and set(pending) <= announced
