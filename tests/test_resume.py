"""`rollscan resume`: the work of a roll whose messages were lost is sent again, exactly what is
missing, on a real PostgreSQL and local object store (the broker's loss is `drain(lose=…)`)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from fixtures_roll import assert_same_defects, defects_of
from sqlalchemy import func, select, text, update

from rollscan_testing.synthetic_roll import match_defects, write_synthetic_roll
from scheduler.resume import idle_rolls, resume_roll, retry_roll
from scheduler.submit import submit
from storage.registry import activate_model
from storage.schema import Frame, Model, Roll, Run

PX_PER_MM, BAND = 4.0, 512
FRAME_ROWS, FRAMES, WIDTH = 256, 4, 384  # two bands
PLAN = [("hole", (512, 190)), ("knot", (800, 200))]
HOUR = timedelta(hours=1)


@pytest.fixture
def ctx(make_inline_ctx):
    return make_inline_ctx(BAND)


def _submit(ctx, tmp_path, roll_id):
    _, planted = write_synthetic_roll(tmp_path / roll_id, roll_id, frames=FRAMES,
                                      frame_rows=FRAME_ROWS, width=WIDTH, plan=PLAN,
                                      px_per_mm=PX_PER_MM)  # fmt: skip
    submit(ctx, str(tmp_path / roll_id))
    return planted


def _state(ctx, roll_id):
    with ctx.session() as session:
        roll = session.get(Roll, roll_id)
        run = session.scalar(select(Run).where(Run.roll_id == roll_id))
        frames = len(session.scalars(select(Frame.seq).where(Frame.roll_id == roll_id)).all())
        return roll.status, run and (run.status, run.bands_done, run.bands_total), frames


def _assert_planted(ctx, roll_id, planted):
    found = defects_of(ctx, roll_id)
    matched, _ = match_defects(planted, found, PX_PER_MM)
    assert sorted(matched) == list(range(len(planted))), found


def test_lost_frames_are_sent_again_and_the_roll_completes(ctx, tmp_path):
    planted = _submit(ctx, tmp_path, "R-frames")
    ctx.enqueue.drain(lose="ingest_frame")  # the broker lost every frame
    assert _state(ctx, "R-frames")[2] == 0
    with ctx.session() as session:
        assert idle_rolls(session, HOUR) == []  # just submitted: not idle
        assert idle_rolls(session, HOUR, now=_later(session)) == ["R-frames"]
    assert resume_roll(ctx, "R-frames", dry_run=True).frames == [1, 2, 3, 4]
    assert not ctx.enqueue.queue  # a dry run sends nothing
    resumed = resume_roll(ctx, "R-frames")
    assert (resumed.frames, resumed.bands, resumed.finalizes) == ([1, 2, 3, 4], [], [])
    ctx.enqueue.drain()
    assert _state(ctx, "R-frames") == ("done", ("done", 2, 2), FRAMES)
    _assert_planted(ctx, "R-frames", planted)
    again = resume_roll(ctx, "R-frames")  # a done roll waits for nothing
    assert str(again) == "roll R-frames: nothing to resume" and not ctx.enqueue.queue
    with ctx.session() as session:
        assert idle_rolls(session, HOUR, now=_later(session)) == []
    # but a frame of it replaced, whose ingest the broker lost, is sent again (it said "nothing
    # to resume": the roll kept the defects and grade of the old pixels)
    key = "incoming/R-frames/frames/000002.tif"
    ctx.store.put(key, ctx.store.get("incoming/R-frames/frames/000003.tif"))
    assert resume_roll(ctx, "R-frames").frames == [2]
    assert [args for function, args in ctx.enqueue.queue] == [("R-frames", 2, key)]


def test_lost_bands_and_a_lost_finalize_are_sent_again(ctx, tmp_path):
    planted = _submit(ctx, tmp_path, "R-bands")
    ctx.enqueue.drain(lose="score_band")
    assert _state(ctx, "R-bands") == ("ingesting", ("scoring", 0, 2), FRAMES)
    resumed = resume_roll(ctx, "R-bands")
    assert [band for _, band in resumed.bands] == [0, 1] and resumed.frames == []
    ctx.enqueue.drain(lose="finalize_run")
    assert _state(ctx, "R-bands")[1] == ("scoring", 2, 2)
    resumed = resume_roll(ctx, "R-bands")
    assert (resumed.bands, len(resumed.finalizes)) == ([], 1)
    ctx.enqueue.drain()
    assert _state(ctx, "R-bands")[:2] == ("done", ("done", 2, 2))
    _assert_planted(ctx, "R-bands", planted)


def test_the_scheduler_metrics_count_and_log_idle_rolls(ctx, tmp_path, caplog):
    from prometheus_client import REGISTRY

    from scheduler.scheduler_metrics import SchedulerMetrics

    _submit(ctx, tmp_path, "R-idle")
    ctx.enqueue.drain(lose="score_band")
    metrics = SchedulerMetrics(queues=())
    metrics.update(ctx)
    assert REGISTRY.get_sample_value("rollscan_rolls_idle") == 0  # it moved a moment ago
    with ctx.session() as session:  # two hours pass
        session.execute(
            update(Roll).where(Roll.id == "R-idle").values(updated_at=func.now() - 2 * HOUR)
        )
        session.execute(
            update(Run).where(Run.roll_id == "R-idle").values(created_at=func.now() - 2 * HOUR)
        )
    with caplog.at_level(logging.WARNING, logger="scheduler.scheduler_metrics"):
        metrics.update(ctx)
        metrics.update(ctx)  # still idle: said once
    assert REGISTRY.get_sample_value("rollscan_rolls_idle") == 1
    assert caplog.text.count("no progress for 1:00:00: R-idle") == 1
    assert "rollscan resume" in caplog.text
    resume_roll(ctx, "R-idle")
    ctx.enqueue.drain()
    metrics.update(ctx)
    assert REGISTRY.get_sample_value("rollscan_rolls_idle") == 0


def test_an_unknown_roll_is_refused(ctx):
    with pytest.raises(ValueError, match="unknown roll 'R-none'"):
        resume_roll(ctx, "R-none")


def test_cli_resumes_idle_rolls(ctx, tmp_path, env_context, capsys):
    """`rollscan resume` as configured by the environment: Celery in eager mode (no broker)."""
    from cli.main import main

    _submit(ctx, tmp_path, "R-cli")
    ctx.enqueue.drain(lose="score_band")
    assert main(["resume"]) == 2
    assert "name the rolls to resume" in capsys.readouterr().err
    # the data dir holds the objects of `local_store`
    env_context(ctx.engine, tmp_path, ROLLSCAN_BAND_HEIGHT=str(BAND), ROLLSCAN_DEVICE="cpu")
    assert main(["resume", "--idle", "2h"]) == 0
    assert "no roll has been idle for 2:00:00" in capsys.readouterr().out
    assert main(["resume", "R-cli", "--dry-run"]) == 0
    assert "(dry run) roll R-cli: sent again 0 frames, 2 bands, 0 finalizes" in (
        capsys.readouterr().out
    )
    assert main(["resume", "R-cli"]) == 0  # eager: the bands and the finalize run here
    capsys.readouterr()
    assert main(["resume", "R-cli", "--retry"]) == 1
    assert "roll R-cli has not failed (status done)" in capsys.readouterr().err
    assert main(["resume", "--retry", "--idle", "2h"]) == 2
    assert "it takes neither --idle nor --dry-run" in capsys.readouterr().err
    assert _state(ctx, "R-cli")[:2] == ("done", ("done", 2, 2))


def _failure(ctx, roll_id):
    with ctx.session() as session:
        return session.get(Roll, roll_id).failure_reason


def test_a_roll_failed_for_want_of_a_model_is_started_again_once_one_is_active(ctx, tmp_path):
    """The commonest failure: frames of a fabric with no active model. Once one is activated,
    the roll is started again and comes out whole, its defects those of a roll that never
    failed."""
    with ctx.session() as session:  # the fabric's model not active yet
        (model,) = session.scalars(select(Model).where(Model.active))
        model.active = False
    planted = _submit(ctx, tmp_path, "R-new")
    ctx.enqueue.drain()
    assert _state(ctx, "R-new")[0] == "failed" and "no active model" in _failure(ctx, "R-new")
    retry_roll(ctx, "R-new")  # nothing fixed yet: it fails again, for the same reason
    ctx.enqueue.drain()
    assert _state(ctx, "R-new")[0] == "failed" and "no active model" in _failure(ctx, "R-new")
    with ctx.session() as session:
        activate_model(session, model.version)
    resumed = retry_roll(ctx, "R-new")
    assert (resumed.frames, resumed.bands) == ([1, 2, 3, 4], [])  # it failed at its first frame
    ctx.enqueue.drain()
    assert _state(ctx, "R-new") == ("done", ("done", 2, 2), FRAMES)
    assert _failure(ctx, "R-new") is None
    _assert_planted(ctx, "R-new", planted)
    reference = _submit(ctx, tmp_path, "R-ref")  # the same roll, of a fabric with its model
    ctx.enqueue.drain()
    assert reference == planted
    assert_same_defects(defects_of(ctx, "R-new"), defects_of(ctx, "R-ref"))
    with pytest.raises(ValueError, match="has not failed \\(status done\\)"):
        retry_roll(ctx, "R-new")


def test_a_roll_failed_by_a_corrupt_frame_is_started_again_once_it_is_replaced(ctx, tmp_path):
    planted = _submit(ctx, tmp_path, "R-bad")
    key = "incoming/R-bad/frames/000003.tif"
    good = ctx.store.get(key)
    ctx.store.put(key, b"II*\0 a scanner's half-written frame")
    ctx.enqueue.drain()
    assert _state(ctx, "R-bad")[0] == "failed" and "frame 3" in _failure(ctx, "R-bad")
    retry_roll(ctx, "R-bad")
    ctx.enqueue.drain()
    assert _state(ctx, "R-bad")[0] == "failed" and "frame 3" in _failure(ctx, "R-bad")
    ctx.store.put(key, good)  # the scanner wrote it again
    assert retry_roll(ctx, "R-bad").frames == [3, 4]
    ctx.enqueue.drain()
    assert _state(ctx, "R-bad") == ("done", ("done", 2, 2), FRAMES)
    found = defects_of(ctx, "R-bad")
    _assert_planted(ctx, "R-bad", planted)
    assert [d["defect_no"] for d in found] == list(range(1, len(found) + 1))  # none twice


def _later(session):
    return session.scalar(select(func.now())) + 2 * HOUR


def _inline_depths(ctx):
    """The messages waiting in the in-process queue, by the Celery queue each would go to (no
    reprocess run here: a band goes to `score`)."""
    names = {"ingest_frame": "ingest", "score_band": "score", "finalize_run": "finalize"}
    depths: dict[str, int] = {}
    for function, _ in ctx.enqueue.queue:
        depths[names[function.__name__]] = depths.get(names[function.__name__], 0) + 1
    return depths


def test_the_scheduler_sends_again_the_work_of_a_roll_idle_with_nothing_of_it_queued(
    ctx, tmp_path, caplog
):
    """A lost message left its roll waiting until an operator ran `rollscan resume`; the
    scheduler now does, once the roll has been idle long enough and the queues its work goes to
    are empty (a backlog is never doubled)."""
    from scheduler.auto_resume import BUSY_RECHECK, AutoResume
    from scheduler.discovery import LOCK_KEY

    planted = _submit(ctx, tmp_path, "R-auto")
    ctx.enqueue.drain(lose="score_band")  # the broker lost both bands
    _submit(ctx, tmp_path, "R-broken")
    ctx.enqueue.drain(lose="ingest_frame")
    _submit(ctx, tmp_path, "R-queued")  # another roll's frames wait in the ingest queue
    with ctx.session() as session:  # its source cannot be listed: an error of its own
        session.get(Roll, "R-broken").source = "../elsewhere/"
    auto = AutoResume(2 * HOUR, lambda: _inline_depths(ctx))
    assert auto.run(ctx) == []  # it moved a moment ago
    with ctx.session() as session:
        later = _later(session) + timedelta(minutes=1)
    with ctx.engine.connect() as other:  # another scheduler's pass: it sends, not this one
        other.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
        queued = len(ctx.enqueue.queue)
        assert auto.run(ctx, now=later) == [] and len(ctx.enqueue.queue) == queued
        other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
    with caplog.at_level(logging.ERROR, logger="scheduler.auto_resume"):
        resumed = auto.run(ctx, now=later)  # the broken roll stops neither the pass nor the others
    assert [r.bands for r in resumed] == [[(_run_id(ctx, "R-auto"), b) for b in (0, 1)]]
    assert "roll R-broken: its work could not be sent again" in caplog.text
    # another scheduler, its pass after this one's, before a band is scored: the roll moved
    other = AutoResume(2 * HOUR, lambda: {})
    assert [r.roll_id for r in other.run(ctx, now=later + timedelta(seconds=10))] == ["R-queued"]
    # sent once: not again while its bands are queued, nor on the next pass
    assert auto.run(ctx, now=later + timedelta(minutes=1)) == []
    ctx.enqueue.drain()
    assert _state(ctx, "R-auto")[:2] == ("done", ("done", 2, 2))
    _assert_planted(ctx, "R-auto", planted)
    # a roll whose lost frames might wait behind a backlog of frames is not sent them yet
    _submit(ctx, tmp_path, "R-lost")
    ctx.enqueue.drain(lose="ingest_frame")
    _submit(ctx, tmp_path, "R-busy")
    with ctx.session() as session:
        later = _later(session) + timedelta(minutes=1)
    with caplog.at_level(logging.INFO, logger="scheduler.auto_resume"):
        assert auto.run(ctx, now=later) == []
    assert "roll R-lost: idle for 2:00:00, but ingest hold messages" in caplog.text
    ctx.enqueue.drain()  # the backlog (R-busy's frames) is worked off
    assert auto.run(ctx, now=later + timedelta(minutes=1)) == []  # asked again after 10 min
    assert [r.frames for r in auto.run(ctx, now=later + BUSY_RECHECK)] == [[1, 2, 3, 4]]
    ctx.enqueue.drain()
    assert _state(ctx, "R-lost") == ("done", ("done", 2, 2), FRAMES)


def _run_id(ctx, roll_id):
    with ctx.session() as session:
        return session.scalar(select(Run.id).where(Run.roll_id == roll_id))
