"""Reprocessing finished rolls with a new model version, on a real PostgreSQL and local store.

The second model is the session's `twill_model` with a lower calibrated threshold: another
checkpoint (another sha256) whose defects measurably differ — they grow — on the same rolls.
"""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime

import numpy as np
import pytest
import tifffile
from sqlalchemy import func, select, text

import worker.app
import worker.tasks
from cli.reprocess_command import read_roll_ids
from distill.checkpoint import load_model, save_checkpoint
from distill.torch_model import ReverseDistillation
from results.grade_store import grade_rolls
from rollscan_testing.synthetic_roll import write_synthetic_roll
from scheduler.reprocess import reprocess, select_rolls, start_reprocess_run
from scheduler.submit import submit
from storage.registry import checkpoint_key, register_model
from storage.schema import Band, Defect, Grade, Model, Roll, Run, TaskDelivery
from storage.zarr_rolls import open_roll
from worker.app import ROUTES
from worker.deliveries import GIVEN_UP, Delivery, note_delivery_waiting, run_counted
from worker.ingest import ingest_frame
from worker.scoring import score_band

# 1024 rows × 384 px at 4 px/mm (256 × 96 mm): two bands of 512, defects clear of the selvage
PX_PER_MM, BAND = 4.0, 512
FRAME_ROWS, FRAMES, WIDTH = 256, 4, 384
PLAN = [("hole", (512, 190)), ("knot", (800, 200))]
FABRIC, V1, V2 = "demo-twill", "twill-v1", "twill-v2"


@pytest.fixture
def ctx(make_inline_ctx):
    return make_inline_ctx(BAND, (V1, V2))


def _done_roll(ctx, tmp_path, roll_id):
    write_synthetic_roll(tmp_path / roll_id, roll_id, frames=FRAMES, frame_rows=FRAME_ROWS,
                         width=WIDTH, plan=PLAN, px_per_mm=PX_PER_MM)  # fmt: skip
    submit(ctx, str(tmp_path / roll_id))
    ctx.enqueue.drain()
    with ctx.session() as session:
        assert session.get(Roll, roll_id).status == "done"
        grade_rolls(session, roll_id=roll_id)


def _view(ctx, sql):
    with ctx.session() as session:
        return [tuple(row) for row in session.execute(text(sql))]


def _current(ctx):
    """(roll, model, defects, total area, grade points, defect points) from the users' views."""
    return _view(
        ctx,
        "SELECT g.roll_id, g.model_version, count(d.defect_no), coalesce(sum(d.area_mm2), 0), "
        "g.points, coalesce(sum(d.points), 0) FROM roll_grades g "
        "LEFT JOIN current_defects d ON d.roll_id = g.roll_id "
        "GROUP BY g.roll_id, g.model_version, g.points ORDER BY g.roll_id",
    )


def _run_task(ctx, index):
    """Run one queued task, as a worker would take it from the broker."""
    function, args = ctx.enqueue.queue[index]
    del ctx.enqueue.queue[index]
    return function.__name__, function(ctx, *args)


def _rollscan(ctx, env_context, data_dir, args, **env) -> int:
    """`rollscan ARGS` in this process on the test's database, its worker context made afresh."""
    from cli.main import main

    env_context(ctx.engine, data_dir, **env)
    return main(args)


def test_reprocess_switches_over_when_complete_resumes_and_regrades(ctx, tmp_path):
    for roll_id in ("R-a", "R-b"):
        _done_roll(ctx, tmp_path, roll_id)
    before = _current(ctx)
    assert [(r[0], r[1]) for r in before] == [("R-a", V1), ("R-b", V1)]
    assert all(r[2] >= 1 and r[4] == r[5] for r in before), before  # graded defects
    with ctx.session() as session:
        completed = dict(session.execute(select(Roll.id, Roll.completed_at)).all())
        v1_defects = session.scalar(select(func.count()).select_from(Defect))
        rolls = select_rolls(session, model_version=V2)
    assert rolls == ["R-a", "R-b"]

    def workers_then_ctrl_c():  # the queue holds R-a's bands 0, 1 and R-b's bands 0, 1
        assert _run_task(ctx, 0) == ("score_band", "scored")
        assert _current(ctx) == before  # half a run: users still see v1's defects and grade
        assert [_run_task(ctx, 0)[0] for _ in range(2)] == ["score_band", "score_band"]
        assert _run_task(ctx, -1)[0] == "finalize_run"  # R-a's last band enqueued it
        raise KeyboardInterrupt  # before the driver saw R-a finished and graded it

    with pytest.raises(KeyboardInterrupt):
        reprocess(ctx, rolls, V2, max_in_flight=2, progress=False, wait=workers_then_ctrl_c)
    ctx.enqueue.queue.clear()  # R-b's band 1 is lost (a broker restarted without persistence)
    a, b = _current(ctx)
    assert a[:2] == ("R-a", V2) and a[4] is None  # complete: current, not graded yet
    assert b == before[1]  # R-b's run is half done: v1's defects and grade
    with ctx.session() as session:
        runs = dict(
            session.execute(select(Run.roll_id, Run.id).where(Run.model_version == V2)).all()
        )
        run_b = session.get(Run, runs["R-b"])
        assert (run_b.purpose, run_b.status, run_b.is_current) == ("reprocess", "scoring", False)
        assert (run_b.bands_done, run_b.bands_total) == (1, 2)
        assert select_rolls(session, model_version=V2) == ["R-b"]
    assert start_reprocess_run(ctx, "R-b", V2) == (runs["R-b"], [1])  # idempotent

    mark = len(ctx.enqueue.log)
    out = io.StringIO()
    report = reprocess(ctx, ["R-b"], V2, out=out)  # run again: resumes
    assert (report.done, report.failed) == (["R-b"], {})
    assert "1/1" in out.getvalue()  # the progress bar's done / total
    scored = [args for name, args in ctx.enqueue.log[mark:] if name == "score_band"]
    assert scored == [(runs["R-b"], 1)]  # only the missing band

    after = _current(ctx)
    assert [(r[0], r[1]) for r in after] == [("R-a", V2), ("R-b", V2)]
    for old, new in zip(before, after, strict=True):
        assert new[3] > old[3]  # the lower threshold: larger defects
        assert new[4] is not None and new[4] == new[5] and new[4] >= old[4]  # regraded
    with ctx.session() as session:
        # v1's runs, defects and grades are kept, queryable by run; the rolls' dates stay
        assert session.scalar(select(func.count()).select_from(Grade)) == 4
        v1_runs = select(Run.id).where(Run.model_version == V1)
        assert session.scalar(select(func.count()).where(Defect.run_id.in_(v1_runs))) == v1_defects
        assert dict(session.execute(select(Roll.id, Roll.completed_at)).all()) == completed
        assert select_rolls(session, model_version=V2) == []


def test_a_stalled_reprocess_says_what_to_check_once_per_stall(ctx, tmp_path):
    """No worker takes the bands for a while: the driver says so (it cannot tell absent workers
    from a busy queue, so it resends nothing), once per stall — again after progress stalls anew."""
    _done_roll(ctx, tmp_path, "R-s")
    now, polls = [0.0], []

    def workers_absent_then_slow():
        polls.append(now[0])
        if len(polls) == 1:  # band 1's message ran out of its retries (a store away)
            with ctx.session() as session:
                run_id = session.scalar(select(Run.id).where(Run.model_version == V2))
            delivery = Delivery("score", f"{run_id}/1", f"band 1 of run {run_id}", run_id=run_id)
            note_delivery_waiting(ctx, delivery, "band 1 gave up after 12 retries")
        if len(polls) == 4:  # after the first warning, band 0 is scored: progress
            assert _run_task(ctx, 0) == ("score_band", "scored")
        elif len(polls) == 7:
            ctx.enqueue.drain()
        now[0] += 400.0

    out = io.StringIO()
    report = reprocess(ctx, ["R-s"], V2, progress=False, out=out, wait=workers_absent_then_slow,
                       clock=lambda: now[0], stall_s=600.0)  # fmt: skip
    assert (report.done, report.failed) == (["R-s"], {})
    lines = [line for line in out.getvalue().splitlines() if "no band of the" in line]
    # nothing scored from 0 s: one line at 800 s, not again at 1,200; band 0 scored by 1,600 s,
    # then nothing: a second line at 2,400 s; then every band
    assert len(lines) == 2, out.getvalue()
    assert "no band of the 1 run(s) in flight scored for 13 min" in lines[0]
    assert "-Q reprocess" in lines[0] and "run the same command again" in lines[0]
    assert lines[0].endswith("; roll R-s: waiting: band 1 gave up after 12 retries"), lines[0]


def test_a_reprocess_run_that_failed_starts_again_when_asked(ctx, tmp_path):
    """Its band 1 killed its worker too often, so the run failed alone; reprocessing the roll
    again scores that band (not band 0, scored before) and switches the roll over."""
    _done_roll(ctx, tmp_path, "R-c")
    run_id, missing = start_reprocess_run(ctx, "R-c", V2)
    assert missing == [0, 1]
    assert score_band(ctx, run_id, 0) == "scored"
    band_1 = Delivery("score", f"{run_id}/1", f"band 1 of run {run_id}", run_id=run_id)
    with ctx.session() as session:  # what three deliveries killed with their worker leave
        session.add(TaskDelivery(task="score", key=band_1.key, unfinished=3))
    assert run_counted(ctx, band_1, lambda: pytest.fail("must not run")) == GIVEN_UP
    with ctx.session() as session:
        failed = session.get(Run, run_id)
        assert (failed.status, failed.is_current) == ("failed", False)
        assert "died during each of 3 deliveries" in failed.error
    ctx.enqueue.queue.clear()
    mark = len(ctx.enqueue.log)
    report = reprocess(ctx, ["R-c"], V2, progress=False)
    assert (report.done, report.failed) == (["R-c"], {})
    assert [args for name, args in ctx.enqueue.log[mark:] if name == "score_band"] == [(run_id, 1)]
    with ctx.session() as session:
        run = session.get(Run, run_id)
        assert (run.status, run.error, run.is_current, run.bands_done) == ("done", None, True, 2)
    assert [r[:2] for r in _current(ctx)] == [("R-c", V2)]


def _replace_with_a_flaw(ctx, tmp_path, roll_id: str, seq: int) -> tuple[str, bytes]:
    """Upload frame `seq` of the roll again with a white flaw on it: (its key, its bytes)."""
    frame = tifffile.imread(tmp_path / roll_id / "frames" / f"{seq:06d}.tif")
    frame[100:124, 60:120] = 255
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, frame)
    key = f"incoming/{roll_id}/frames/{seq:06d}.tif"
    ctx.store.put(key, buffer.getvalue())
    return key, buffer.getvalue()


def _reprocessed_from_the_start(ctx, tmp_path, roll_id: str, seq: int, data: bytes) -> None:
    """The same roll with frame `seq` = `data` from the start, done and reprocessed with v2."""
    write_synthetic_roll(tmp_path / roll_id, roll_id, frames=FRAMES, frame_rows=FRAME_ROWS,
                         width=WIDTH, plan=PLAN, px_per_mm=PX_PER_MM)  # fmt: skip
    (tmp_path / roll_id / "frames" / f"{seq:06d}.tif").write_bytes(data)
    submit(ctx, str(tmp_path / roll_id))
    ctx.enqueue.drain()
    assert reprocess(ctx, [roll_id], V2, progress=False).done == [roll_id]


def _map(ctx, roll_id, version):
    return open_roll(ctx.store, roll_id).read_scores(version, 0, FRAMES * FRAME_ROWS // 4)


def test_a_frame_changed_after_a_reprocess_rescores_every_run_and_keeps_the_newer_model(
    ctx, tmp_path
):
    """The roll was reprocessed with v2 (current); then a frame is uploaded again with a flaw.
    Both runs' bands reading it are scored again — v2's on the reprocess queue — and v2 stays
    the roll's current run: its map and defects are those of the roll scanned with the new
    frame from the start, and the live v1 run, finalized again, does not take the roll back."""
    _done_roll(ctx, tmp_path, "R-d")
    assert reprocess(ctx, ["R-d"], V2, progress=False).done == ["R-d"]
    with ctx.session() as session:
        completed = session.get(Roll, "R-d").completed_at
    key, data = _replace_with_a_flaw(ctx, tmp_path, "R-d", 3)  # in band 1, clear of the plan
    mark = len(ctx.enqueue.routed)
    assert ingest_frame(ctx, "R-d", 3, key) == "ingested"
    with ctx.session() as session:
        runs = dict(
            session.execute(select(Run.model_version, Run.id).where(Run.roll_id == "R-d")).all()
        )
    routed = sorted(ctx.enqueue.routed[mark:])
    assert routed == [("reprocess", (runs[V2], 0)), ("reprocess", (runs[V2], 1)),
                      ("score", (runs[V1], 0)), ("score", (runs[V1], 1))]  # fmt: skip
    # v2's run finishes first; v1's, finalized after it, must not take the roll back
    while v2 := [i for i, (_, args) in enumerate(ctx.enqueue.queue) if args[0] == runs[V2]]:
        _run_task(ctx, v2[0])
    with ctx.session() as session:
        assert session.get(Run, runs[V2]).status == "done"
    ctx.enqueue.drain()
    (current,) = _current(ctx)
    assert (current[1], current[4]) == (V2, None)  # its old defects' grade is gone
    with ctx.session() as session:
        grade_rolls(session, roll_id="R-d")
        statuses = dict(session.execute(select(Run.model_version, Run.status)).all())
        finished = session.get(Roll, "R-d").completed_at
    assert statuses == {V1: "done", V2: "done"}
    assert finished == completed  # not "finished today": `reprocess --since` still selects it
    (current,) = _current(ctx)
    assert current[1] == V2 and current[4] is not None and current[4] == current[5]

    # the same roll with the new frame from the start, reprocessed with v2 likewise
    _reprocessed_from_the_start(ctx, tmp_path, "R-e", 3, data)
    for version in (V1, V2):
        np.testing.assert_array_equal(_map(ctx, "R-d", version), _map(ctx, "R-e", version))
    boxes = _view(
        ctx,
        "SELECT roll_id, x0_mm, y0_mm, x1_mm, y1_mm, max_score FROM current_defects "
        "ORDER BY roll_id, y0_mm, x0_mm",
    )
    assert [b[1:] for b in boxes if b[0] == "R-d"] == [b[1:] for b in boxes if b[0] == "R-e"]
    y, x = (2 * FRAME_ROWS + 112) / PX_PER_MM, 90 / PX_PER_MM
    assert any(b[0] == "R-d" and b[1] <= x <= b[3] and b[2] <= y <= b[4] for b in boxes)


@pytest.mark.parametrize("live_first", [True, False], ids=["live-first", "give-up-first"])
def test_a_current_reprocess_run_that_fails_after_a_changed_frame_hands_the_roll_back(
    ctx, tmp_path, live_first
):
    """v2 reprocessed the roll (current); a changed frame reopens both runs; v2's band 1 is given
    up. Its defects read the old pixels, so the live run, finalized on the new ones, becomes
    current — whether it finalized before the give-up or after."""
    roll_id = f"R-h{int(live_first)}"
    _done_roll(ctx, tmp_path, roll_id)
    assert reprocess(ctx, [roll_id], V2, progress=False).done == [roll_id]
    key, _ = _replace_with_a_flaw(ctx, tmp_path, roll_id, 3)
    assert ingest_frame(ctx, roll_id, 3, key) == "ingested"
    with ctx.session() as session:
        runs = dict(
            session.execute(select(Run.model_version, Run.id).where(Run.roll_id == roll_id)).all()
        )

    def live_run_rescored():
        while v1 := [i for i, (_, args) in enumerate(ctx.enqueue.queue) if args[0] == runs[V1]]:
            _run_task(ctx, v1[0])

    def v2_band_1_given_up():
        band_1 = Delivery("score", f"{runs[V2]}/1", "band 1", run_id=runs[V2])
        with ctx.session() as session:  # what three deliveries killed with their worker leave
            session.add(TaskDelivery(task="score", key=band_1.key, unfinished=3))
        assert run_counted(ctx, band_1, lambda: pytest.fail("must not run")) == GIVEN_UP

    for step in (live_run_rescored, v2_band_1_given_up)[:: 1 if live_first else -1]:
        step()
    ctx.enqueue.queue.clear()
    with ctx.session() as session:
        state = {
            version: (run.status, run.is_current)
            for version, run in session.execute(
                select(Run.model_version, Run).where(Run.roll_id == roll_id)
            )
        }
    assert state == {V1: ("done", True), V2: ("failed", False)}
    (current,) = [row for row in _current(ctx) if row[0] == roll_id]
    assert current[1] == V1
    y, x = (2 * FRAME_ROWS + 112) / PX_PER_MM, 90 / PX_PER_MM  # frame 3's new flaw is shown
    boxes = _view(ctx, f"SELECT x0_mm, y0_mm, x1_mm, y1_mm FROM current_defects "
                       f"WHERE roll_id = '{roll_id}'")  # fmt: skip
    assert any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes), boxes


def test_a_frame_changed_while_a_reprocess_run_is_failed_is_scored_again_when_it_restarts(
    ctx, tmp_path
):
    """The failed run keeps its scored bands to be started again; a frame changed meanwhile
    sends those that read it back (they are not scored while the run is failed), so the run,
    started again, finalizes on the new pixels and not on bands scored on the old ones."""
    _done_roll(ctx, tmp_path, "R-f")
    run_id, _ = start_reprocess_run(ctx, "R-f", V2)
    ctx.enqueue.queue.clear()
    assert score_band(ctx, run_id, 0) == "scored"
    with ctx.session() as session:
        run = session.get(Run, run_id)
        run.status, run.error = "failed", "band 1: its worker died during each of 3 deliveries"
    key, data = _replace_with_a_flaw(ctx, tmp_path, "R-f", 1)
    mark = len(ctx.enqueue.routed)
    assert ingest_frame(ctx, "R-f", 1, key) == "ingested"
    assert [r for r in ctx.enqueue.routed[mark:] if r[0] == "reprocess"] == []  # failed: not yet
    ctx.enqueue.drain()
    with ctx.session() as session:
        assert session.get(Band, (run_id, 0)).status == "pending"
    mark = len(ctx.enqueue.log)
    assert reprocess(ctx, ["R-f"], V2, progress=False).done == ["R-f"]
    scored = sorted(args for name, args in ctx.enqueue.log[mark:] if name == "score_band")
    assert scored == [(run_id, 0), (run_id, 1)]
    _reprocessed_from_the_start(ctx, tmp_path, "R-g", 1, data)
    np.testing.assert_array_equal(_map(ctx, "R-f", V2), _map(ctx, "R-g", V2))


def _bare_roll(session, roll_id, fabric=FABRIC, status="done", completed=None):
    session.add(
        Roll(id=roll_id, fabric_type=fabric, width_mm=100.0, px_per_mm_x=4.0, px_per_mm_y=4.0,
             status=status, complete=True, completed_at=completed)
    )  # fmt: skip


def test_selection_filters_dry_run_and_cli(ctx, twill_model, tmp_path, env_context, capsys):
    jan, feb, mar = (datetime(2026, m, 10, tzinfo=UTC) for m in (1, 2, 3))
    with ctx.session() as session:
        _bare_roll(session, "R-jan", completed=jan)
        _bare_roll(session, "R-mar", completed=mar)
        _bare_roll(session, "R-feb-done-v2", completed=feb)
        _bare_roll(session, "R-denim", fabric="denim", completed=feb)
        _bare_roll(session, "R-live", status="scoring")
        session.flush()
        session.add(Run(roll_id="R-feb-done-v2", model_version=V2, purpose="live", status="done",
                        is_current=True))  # fmt: skip
        model, card = load_model(twill_model)
        # a DG-variant student (untrained: the selection never scores) beside the same bank
        dg = ReverseDistillation(model.teacher, "dg", sigma=card.sigma)
        dg.set_scoring(model.memory, model.fusion)
        card.variant = "dg"
        generic = save_checkpoint(tmp_path / "generic.pt", dg, card)
        register_model(session, ctx.store, generic, fabric_type=None, version="generic-dg")

    with ctx.session() as session:
        assert select_rolls(session, model_version=V2) == ["R-jan", "R-mar"]
        assert select_rolls(session, model_version=V2, since=feb) == ["R-mar"]
        assert select_rolls(session, model_version=V2, until=feb) == ["R-jan"]
        assert select_rolls(session, model_version=V2, since=jan, until=mar) == ["R-jan"]
        assert select_rolls(session, model_version=V2, roll_ids=["R-mar", "R-denim"]) == ["R-mar"]
        with pytest.raises(ValueError, match=r"2 unknown roll id\(s\): R-nope, R-zzz"):
            select_rolls(session, model_version=V2, roll_ids=["R-jan", "R-nope", "R-zzz"])
        with pytest.raises(ValueError, match="inspects fabric type 'demo-twill', not 'denim'"):
            select_rolls(session, model_version=V2, fabric_type="denim")
        with pytest.raises(ValueError, match="generic model: name the fabric type"):
            select_rolls(session, model_version="generic-dg")
        assert select_rolls(session, model_version="generic-dg", fabric_type="denim") == ["R-denim"]
        with pytest.raises(ValueError, match="unknown model version 'v9'"):
            select_rolls(session, model_version="v9")

    # a roll that cannot be reprocessed is reported, the others go on
    with pytest.raises(ValueError, match="R-live is scoring"):
        start_reprocess_run(ctx, "R-live", V2)
    report = reprocess(ctx, ["R-jan", "R-live"], V2, progress=False)
    assert report.done == [] and "no stored image" in report.failed["R-jan"]

    def counts():
        with ctx.session() as session:
            return [session.scalar(select(func.count()).select_from(t)) for t in (Run, Band, Grade)]

    written = counts()
    out = io.StringIO()
    reprocess(ctx, ["R-jan", "R-mar"], V2, dry_run=True, out=out)
    assert out.getvalue().splitlines() == ["2 roll(s) would be reprocessed with twill-v2", "R-jan",
                                           "R-mar"]  # fmt: skip

    listing = tmp_path / "rolls.txt"
    listing.write_text("# rolls of lot 2026-01\nR-jan\n\nR-denim  # other fabric\n")
    assert read_roll_ids(listing) == ["R-jan", "R-denim"]
    from cli.main import main

    env_context(ctx.engine, tmp_path / "data")
    args = ["reprocess", "--model", V2, "--rolls-from", str(listing), "--dry-run"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 roll(s) would be reprocessed with twill-v2\nR-jan\n" in printed
    assert "1 listed roll(s) skipped" in printed and "R-denim" in printed
    listing.write_text("R-jan\nR-unknown\n")
    assert main(args) == 2
    assert "1 unknown roll id(s): R-unknown" in capsys.readouterr().err
    assert counts() == written


def test_cli_reprocesses_through_the_celery_tasks_on_the_reprocess_queue(
    ctx, tmp_path, monkeypatch, env_context, capsys
):
    """`rollscan reprocess` as configured by the environment: Celery in eager mode (no broker),
    the default band height (2048) unlike the stored image's (512), which the run must follow."""

    assert worker.app.app.conf.task_always_eager
    assert ROUTES["rollscan.score_reprocess"] == {"queue": "reprocess"}
    assert ROUTES["rollscan.score"] == {"queue": "score"}
    _done_roll(ctx, tmp_path, "R-cli")
    sent = []
    for name in ("score", "score_reprocess"):
        task = getattr(worker.tasks, name)
        send = task.apply_async  # bound to the task: records the route taken, then runs it

        def spy(args, _name=name, _send=send, **options):
            sent.append((_name, tuple(args)))
            return _send(args, **options)

        monkeypatch.setattr(task, "apply_async", spy)
    args = ["reprocess", "--model", V2, "--no-progress"]
    # ROLLSCAN_DATA_DIR: the objects of `local_store`
    assert _rollscan(ctx, env_context, tmp_path, args, ROLLSCAN_DEVICE="cpu") == 0
    assert "reprocessed 1 of 1 roll(s) with twill-v2" in capsys.readouterr().out
    with ctx.session() as session:
        run = session.scalar(select(Run).where(Run.model_version == V2))
        assert (run.status, run.is_current, run.bands_total) == ("done", True, 2)
    assert sent == [("score_reprocess", (run.id, 0)), ("score_reprocess", (run.id, 1))]
    (row,) = _current(ctx)
    assert row[1] == V2 and row[4] is not None and row[4] == row[5]


def test_a_band_that_fails_for_good_fails_its_run_with_the_reason(
    ctx, tmp_path, env_context, capsys
):
    """A band whose task raised an error no retry mends (here v2's checkpoint, damaged in the
    store) was acknowledged and its run waited for ever, the reason in a worker's log only."""
    _done_roll(ctx, tmp_path, "R-bad")
    with ctx.session() as session:
        model = session.get(Model, V2)
        ctx.store.put(checkpoint_key(model.sha256), b"not the checkpoint it was")
    args = ["reprocess", "--model", V2, "--no-progress"]
    code = _rollscan(ctx, env_context, tmp_path, args, ROLLSCAN_DEVICE="cpu")
    assert code in (1, 2), capsys.readouterr()
    with ctx.session() as session:
        run = session.scalar(select(Run).where(Run.model_version == V2))
        assert run.status == "failed" and "RegistryError" in run.error, run.error
        assert "band 0 of run" in run.error and "sha256" in run.error, run.error
        assert session.get(Roll, "R-bad").status == "done"  # a reprocess run fails alone
        assert session.scalar(select(func.count()).select_from(TaskDelivery)) == 0
    (row,) = _current(ctx)
    assert row[1] == V1


def test_a_roll_whose_run_fails_in_process_leaves_the_next_rolls_to_be_reprocessed(
    ctx, tmp_path, env_context, capsys, caplog
):
    """In-process (no broker) the first roll's failed band came out of the command as its
    error, and the rolls after it were never started."""
    for roll_id in ("R-1", "R-2"):
        _done_roll(ctx, tmp_path, roll_id)
    shard = next(ctx.store.iter_objects("rolls/R-1.zarr/image/c/")).key
    ctx.store.put(shard, b"\0" * 64)  # its pixels unreadable: no retry mends that
    args = ["reprocess", "--model", V2, "--max-in-flight", "1", "--no-progress"]  # R-1 first
    with caplog.at_level(logging.ERROR, logger="worker.deliveries"):
        assert _rollscan(ctx, env_context, tmp_path, args, ROLLSCAN_DEVICE="cpu") == 1
    assert "reprocessed 1 of 2 roll(s) with twill-v2" in capsys.readouterr().out
    assert "roll R-1 (reprocess run " in caplog.text  # it said "roll (run 3)"
    with ctx.session() as session:
        runs = dict(
            session.execute(select(Run.roll_id, Run.status).where(Run.model_version == V2)).all()
        )
        assert runs == {"R-1": "failed", "R-2": "done"}
        assert session.get(Roll, "R-1").status == "done"  # a reprocess run fails alone


def test_running_the_cli_again_after_an_interrupt_grades_what_finished_meanwhile(
    ctx, tmp_path, env_context, capsys
):
    """Interrupted, the driver left runs the workers then finished: done with the model, so no
    longer selected, and ungraded. Run again as the interrupt message says, the command found
    nothing to reprocess and returned before grading them: no grade until the nightly one."""
    _done_roll(ctx, tmp_path, "R-h")
    run_id, missing = start_reprocess_run(ctx, "R-h", V2)
    for band in missing:  # what the driver sent before it was interrupted
        ctx.enqueue.score(run_id, band, reprocess=True)
    ctx.enqueue.drain()  # the workers finish the run; the driver is gone
    (current,) = _current(ctx)
    assert (current[1], current[4]) == (V2, None)
    args = ["reprocess", "--model", V2, "--no-progress"]
    assert _rollscan(ctx, env_context, tmp_path / "data", args) == 0
    assert "graded 1 run(s) finished since an interrupted run" in capsys.readouterr().out
    (current,) = _current(ctx)
    assert current[1] == V2 and current[4] is not None and current[4] == current[5]


def test_command_line_dates_are_the_sites(ctx, tmp_path, env_context, capsys):
    """`--since 2026-01-01` at a Paris site (ROLLSCAN_TIMEZONE) starts at midnight in Paris,
    not in the process's zone (a container's UTC): a roll completed at 00:30 Paris time on
    January 1st is January's, one at 23:30 on January 31st too, one at 00:30 on February 1st
    is not."""
    from zoneinfo import ZoneInfo

    paris = ZoneInfo("Europe/Paris")
    with ctx.session() as session:
        for roll_id, moment in (("R-jan-first", datetime(2026, 1, 1, 0, 30, tzinfo=paris)),
                                ("R-jan-last", datetime(2026, 1, 31, 23, 30, tzinfo=paris)),
                                ("R-feb", datetime(2026, 2, 1, 0, 30, tzinfo=paris))):  # fmt: skip
            _bare_roll(session, roll_id, completed=moment)
    args = [
        "reprocess",
        "--model",
        V2,
        "--since",
        "2026-01-01",
        "--until",
        "2026-02-01",
        "--dry-run",
    ]
    assert (
        _rollscan(ctx, env_context, tmp_path / "data", args, ROLLSCAN_TIMEZONE="Europe/Paris") == 0
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["2 roll(s) would be reprocessed with twill-v2", "R-jan-first", "R-jan-last"]


def test_the_stall_warning_takes_a_duration_as_the_schedulers_does():
    from datetime import timedelta

    from cli.main import build_parser

    def stall(*given):
        return build_parser().parse_args(["reprocess", "--model", "m", *given]).stall_after

    assert stall() == timedelta(minutes=10)
    assert stall("--stall-after", "30m") == timedelta(minutes=30)
    assert stall("--stall-after", "90") == timedelta(seconds=90)
    assert stall("--stall-after", "off") is None  # never
