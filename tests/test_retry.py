"""`rollscan resume --retry` (`scheduler.resume.retry_roll`) in the corners of a roll's life: a roll
failed after it was done, or by work whose worker died, another roll's counts beside it, and
discovery going on with it — and which run a roll shows when runs are asked for again (the
one asked for last, once done) — on a real PostgreSQL and local object store, without a broker.
The plain cases (no model, a corrupt frame) are in tests/test_resume.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import tifffile
from sqlalchemy import func, select

from results.defect_tables import unscored_reason
from results.roll_report import write_roll_report
from rollscan_testing.synthetic_roll import write_synthetic_roll
from scheduler.discovery import discover_once
from scheduler.reprocess import reprocess, select_rolls, start_reprocess_run
from scheduler.resume import resume_roll, retry_roll
from scheduler.submit import submit
from storage.registry import activate_model
from storage.schema import Defect, Frame, Grade, Model, Roll, Run, TaskDelivery
from worker.context import WorkerContext
from worker.deliveries import GIVEN_UP, Delivery, run_counted
from worker.ingest import ingest_frame
from worker.roll_rows import fail_roll
from worker.scoring import score_band

PX_PER_MM, BAND = 4.0, 512
FRAME_ROWS, FRAMES, WIDTH = 256, 4, 384  # two bands
PLAN = [("hole", (512, 190)), ("knot", (800, 200))]
FABRIC, V1, V2, V3 = "demo-twill", "twill-v1", "twill-v2", "twill-v3"


@pytest.fixture
def ctx(make_inline_ctx) -> WorkerContext:
    return make_inline_ctx(BAND, (V1, V2, V3))


def _write(tmp_path: Path, roll_id: str) -> Path:
    write_synthetic_roll(tmp_path / roll_id, roll_id, frames=FRAMES, frame_rows=FRAME_ROWS,
                         width=WIDTH, plan=PLAN, px_per_mm=PX_PER_MM)  # fmt: skip
    return tmp_path / roll_id


def _done_roll(ctx: WorkerContext, tmp_path: Path, roll_id: str) -> None:
    submit(ctx, str(_write(tmp_path, roll_id)))
    ctx.enqueue.drain()
    assert _roll(ctx, roll_id).status == "done"


def _roll(ctx: WorkerContext, roll_id: str) -> Roll:
    with ctx.session() as session:
        roll = session.get(Roll, roll_id)
        session.expunge(roll)
        return roll


def _runs(ctx: WorkerContext, roll_id: str) -> dict[str, tuple]:
    with ctx.session() as session:
        runs = session.scalars(select(Run).where(Run.roll_id == roll_id))
        return {r.model_version: (r.id, r.status, r.is_current) for r in runs}


def _give_up(ctx: WorkerContext, task: str, key: str, run_id: int) -> None:
    """Its worker died `max_deliveries` times: the next delivery gives up (fails the roll)."""
    with ctx.session() as session:
        session.add(TaskDelivery(task=task, key=key, unfinished=ctx.settings.max_deliveries))
    delivery = Delivery(task, key, f"{task} {key}", run_id=run_id)
    assert run_counted(ctx, delivery, lambda: pytest.fail("a given-up task must not run")) == (
        GIVEN_UP
    )


def _change_frame(ctx: WorkerContext, tmp_path: Path, roll_id: str, seq: int) -> None:
    """A finished roll's frame written again, with a flaw, and ingested: its runs reopen."""
    name = f"{seq:06d}.tif"
    frame = tifffile.imread(tmp_path / roll_id / "frames" / name)
    frame[100:124, 60:120] = 255
    changed = io.BytesIO()
    tifffile.imwrite(changed, frame)
    key = f"incoming/{roll_id}/frames/{name}"
    ctx.store.put(key, changed.getvalue())
    assert ingest_frame(ctx, roll_id, seq, key) == "ingested"


def _broken_upload(ctx: WorkerContext, roll_id: str, seq: int) -> tuple[str, bytes]:
    """Frame `seq` written again half-written and ingested: the roll fails. Its key and the
    frame that was there, to put back."""
    key = f"incoming/{roll_id}/frames/{seq:06d}.tif"
    good = ctx.store.get(key)
    ctx.store.put(key, b"II*\0 half-written")
    assert ingest_frame(ctx, roll_id, seq, key) == "failed"
    return key, good


def _run_work_of(ctx: WorkerContext, run_id: int) -> None:
    """The queued bands, then the finalize, of one run (the others' wait)."""
    queue = ctx.enqueue.queue
    while work := [item for item in queue if item[1][0] == run_id]:
        queue.remove(work[0])
        work[0][0](ctx, *work[0][1])


def test_a_live_run_reopened_by_a_changed_frame_does_not_take_the_roll_back(ctx, tmp_path):
    """Done, reprocessed with v2 (current), a frame changed (both runs reopened), v2 done again,
    the live run's band given up: started again, the live run finishes without taking the roll
    from v2, and the roll's completion date stays."""
    _done_roll(ctx, tmp_path, "R-t")
    assert reprocess(ctx, ["R-t"], V2, progress=False).done == ["R-t"]
    completed = _roll(ctx, "R-t").completed_at
    _change_frame(ctx, tmp_path, "R-t", 3)
    v1, v2 = _runs(ctx, "R-t")[V1][0], _runs(ctx, "R-t")[V2][0]
    _run_work_of(ctx, v2)
    assert _runs(ctx, "R-t")[V2][1:] == ("done", True)
    ctx.enqueue.queue.clear()
    _give_up(ctx, "score", f"{v1}/1", v1)
    assert _roll(ctx, "R-t").status == "failed"
    retry_roll(ctx, "R-t")
    ctx.enqueue.drain()
    assert _roll(ctx, "R-t").status == "done"
    assert _runs(ctx, "R-t") == {V1: (v1, "done", False), V2: (v2, "done", True)}
    assert _roll(ctx, "R-t").completed_at == completed


def test_the_run_asked_for_last_is_current_and_an_earlier_one_can_be_asked_back(ctx, tmp_path):
    """Reprocessed with v2, then v3 (current); a frame changed; v2's band given up. `rollscan
    reprocess --model v2` again finishes v2 and makes it current: it was asked for last. Asked
    for again, v3 — and then the live run's v1 — take the roll back at once, nothing rescored."""
    _done_roll(ctx, tmp_path, "R-v")
    for version in (V2, V3):
        assert reprocess(ctx, ["R-v"], version, progress=False).done == ["R-v"]
    _change_frame(ctx, tmp_path, "R-v", 3)
    runs = _runs(ctx, "R-v")
    _run_work_of(ctx, runs[V3][0])
    _give_up(ctx, "score", f"{runs[V2][0]}/1", runs[V2][0])
    ctx.enqueue.drain()  # the live run's work, and what is left of v2's (skipped: failed)
    assert _runs(ctx, "R-v")[V2][1] == "failed" and _runs(ctx, "R-v")[V3][1:] == ("done", True)
    assert reprocess(ctx, ["R-v"], V2, progress=False).done == ["R-v"]
    assert {v: r[1:] for v, r in _runs(ctx, "R-v").items()} == {
        V1: ("done", False),
        V2: ("done", True),
        V3: ("done", False),
    }
    for version in (V3, V1):
        assert reprocess(ctx, ["R-v"], version, progress=False).done == ["R-v"]
        assert not ctx.enqueue.queue  # done runs: nothing scored again
        assert {v for v, r in _runs(ctx, "R-v").items() if r[2]} == {version}
    with ctx.session() as session:
        graded = session.scalar(select(func.count()).select_from(Grade).where(
            Grade.run_id == _runs(ctx, "R-v")[V1][0]))  # fmt: skip
    assert graded == 1  # the roll's grade is its current run's


def test_an_older_models_reprocess_finishing_late_leaves_the_roll_to_the_newer_one(ctx, tmp_path):
    """v2's reprocess of the roll is under way when v3 is asked for and finishes first: v2's run
    finishing afterwards does not take the roll from v3, and v3's selection skips the roll."""
    _done_roll(ctx, tmp_path, "R-o")
    run_v2, bands = start_reprocess_run(ctx, "R-o", V2)
    assert reprocess(ctx, ["R-o"], V3, progress=False).done == ["R-o"]
    for band in bands:
        score_band(ctx, run_v2, band)
    ctx.enqueue.drain()  # v2's finalize
    assert {v: r[1:] for v, r in _runs(ctx, "R-o").items()} == {
        V1: ("done", False),
        V2: ("done", False),
        V3: ("done", True),
    }
    with ctx.session() as session:
        assert select_rolls(session, model_version=V3) == []
        assert select_rolls(session, model_version=V2) == ["R-o"]


def test_a_done_roll_failed_by_a_frame_then_put_back_is_done_again(ctx, tmp_path):
    """A finished roll's frame replaced by a corrupt one fails the roll (its live run stays
    done); the frame that was there put back, the retried roll is done, not waiting for ever."""
    _done_roll(ctx, tmp_path, "R-s")
    key = "incoming/R-s/frames/000002.tif"
    good = ctx.store.get(key)
    ctx.store.put(key, b"II*\0 half-written")
    assert resume_roll(ctx, "R-s").frames == [2]
    ctx.enqueue.drain()
    assert _roll(ctx, "R-s").status == "failed"
    ctx.store.put(key, good)
    resumed = retry_roll(ctx, "R-s")
    assert (resumed.frames, resumed.bands, resumed.finalizes) == ([], [], [])
    assert _roll(ctx, "R-s").status == "done"
    assert str(resume_roll(ctx, "R-s")) == "roll R-s: nothing to resume"


def test_a_failed_roll_keeps_its_first_reason_until_retried(ctx, tmp_path):
    """In-process a band is scored inside the ingest of the frame that completed it: the band's
    failure, passing through that frame's task, was recorded again as the frame's."""
    submit(ctx, str(_write(tmp_path, "R-why")))
    ctx.enqueue.queue.clear()
    with ctx.session() as session:
        fail_roll(session, "R-why", "band 1 of run 1: OSError: the first cause")
        fail_roll(session, "R-why", "frame 4 (incoming/R-why/frames/000004.tif): OSError: it again")
    assert _roll(ctx, "R-why").failure_reason == "band 1 of run 1: OSError: the first cause"
    retry_roll(ctx, "R-why")
    with ctx.session() as session:
        fail_roll(session, "R-why", "frame 2: a new cause")
    assert _roll(ctx, "R-why").failure_reason == "frame 2: a new cause"


def test_a_given_up_finalize_is_sent_again_and_said(ctx, tmp_path):
    submit(ctx, str(_write(tmp_path, "R-f")))
    ctx.enqueue.drain(lose="finalize_run")
    run_id = _runs(ctx, "R-f")[V1][0]
    _give_up(ctx, "finalize", str(run_id), run_id)
    assert _roll(ctx, "R-f").status == "failed"
    resumed = retry_roll(ctx, "R-f")
    assert (resumed.frames, resumed.bands, resumed.finalizes) == ([], [], [run_id])
    ctx.enqueue.drain()
    assert _roll(ctx, "R-f").status == "done"


def test_a_retry_forgets_its_own_rolls_death_counts_only(ctx):
    """Frame keys are matched as text: "A_1/" once also matched roll AB1's (LIKE's wildcard)."""
    with ctx.session() as session:
        for roll_id, status in [("A_1", "failed"), ("AB1", "ingesting")]:
            session.add(Roll(id=roll_id, fabric_type=FABRIC, width_mm=96.0, px_per_mm_x=4.0,
                             px_per_mm_y=4.0, status=status))  # fmt: skip
        session.add_all([TaskDelivery(task="ingest", key="AB1/2", unfinished=2),
                         TaskDelivery(task="ingest", key="A_1/2", unfinished=3)])  # fmt: skip
    retry_roll(ctx, "A_1")
    with ctx.session() as session:
        assert session.get(TaskDelivery, ("ingest", "AB1/2")) is not None
        assert session.get(TaskDelivery, ("ingest", "A_1/2")) is None


def _failed_while_scanned(ctx, tmp_path, roll_id):
    """A roll whose scan has begun (frames 1 and 2, its manifest open), failed by discovery's
    first pass for want of a model; its complete manifest and `upload(*seqs)` of its frames."""
    with ctx.session() as session:
        session.get(Model, V1).active = False
    folder = _write(tmp_path, roll_id)
    manifest = json.loads((folder / "manifest.json").read_text())

    def upload(*seqs: int) -> None:
        for seq in seqs:
            name = f"{seq:06d}.tif"
            ctx.store.put(f"incoming/{roll_id}/frames/{name}",
                          (folder / "frames" / name).read_bytes())  # fmt: skip

    ctx.store.put(f"incoming/{roll_id}/manifest.json",
                  json.dumps({**manifest, "complete": False, "frames": None}).encode())  # fmt: skip
    upload(1, 2)
    discover_once(ctx, stall_after=None)
    ctx.enqueue.drain()
    assert _roll(ctx, roll_id).status == "failed"
    return manifest, upload


def test_discovery_goes_on_with_a_roll_started_again(ctx, tmp_path):
    """Discovery closes a failed roll's cursor; started again, the roll's later frames and its
    complete manifest must still be found."""
    manifest, upload = _failed_while_scanned(ctx, tmp_path, "R-d")
    discover_once(ctx, stall_after=None)  # the next pass closes its cursor
    with ctx.session() as session:
        activate_model(session, V1)
    retry_roll(ctx, "R-d")
    ctx.enqueue.drain()
    upload(3, 4)  # the scanner goes on
    _assert_the_scan_finishes(ctx, "R-d", manifest)


def _assert_the_scan_finishes(ctx, roll_id, manifest):
    """The scanner's complete manifest: discovery takes it and the roll's frames, and it ends."""
    ctx.store.put(f"incoming/{roll_id}/manifest.json", json.dumps(manifest).encode())
    discover_once(ctx, stall_after=None)
    ctx.enqueue.drain()
    with ctx.session() as session:
        frames = session.scalar(select(func.count()).where(Frame.roll_id == roll_id))
    roll = _roll(ctx, roll_id)
    assert (roll.status, roll.complete, frames) == ("done", True, FRAMES)


def test_a_roll_started_again_while_a_discovery_pass_sends_its_frames_stays_listed(ctx, tmp_path):
    """The pass read the roll failed; `resume --retry` started it again while the pass sent a
    frame (a broker publish retried for a minute); the pass then saved its cursor closed, from
    the status it had read: the roll's later frames and manifest were never taken."""
    manifest, upload = _failed_while_scanned(ctx, tmp_path, "R-race")
    upload(3)
    queue = ctx.enqueue

    class RetriedWhileSending:  # the operator's retry lands while the pass publishes frame 3
        def ingest(self, roll_id: str, seq: int, key: str) -> None:
            if seq == 3:
                ctx.enqueue = queue
                with ctx.session() as session:
                    activate_model(session, V1)
                retry_roll(ctx, "R-race")
            queue.ingest(roll_id, seq, key)

        def __getattr__(self, name: str):
            return getattr(queue, name)

    ctx.enqueue = RetriedWhileSending()
    try:
        discover_once(ctx, stall_after=None)
    finally:
        ctx.enqueue = queue
    ctx.enqueue.drain()
    upload(4)  # the scanner goes on
    _assert_the_scan_finishes(ctx, "R-race", manifest)


def test_a_command_asks_when_it_starts_not_when_its_driver_reaches_the_roll(ctx, tmp_path):
    """`reprocess --model v2` begins (its driver busy with other rolls); `--model v3`, begun
    later, finishes the roll first: v2's driver reaching it afterwards does not take it."""
    _done_roll(ctx, tmp_path, "R-d")
    with ctx.session() as session:
        v2_began = session.scalar(select(func.now()))
    assert reprocess(ctx, ["R-d"], V3, progress=False).done == ["R-d"]
    run_v2, bands = start_reprocess_run(ctx, "R-d", V2, v2_began)
    for band in bands:
        ctx.enqueue.score(run_v2, band, reprocess=True)
    ctx.enqueue.drain()
    assert {v: r[1:] for v, r in _runs(ctx, "R-d").items()} == {
        V1: ("done", False),
        V2: ("done", False),
        V3: ("done", True),
    }


def test_a_reprocess_says_which_rolls_show_a_model_asked_for_after_it(ctx, tmp_path):
    """`reprocess --model v2` said "reprocessed 1 of 1" of a roll that `--model v3`, asked for
    while v2's bands were scored, took: the roll shows v3, which v2's report now says."""
    _done_roll(ctx, tmp_path, "R-s")
    later = []

    def wait() -> None:  # v3 asked for while v2's bands wait in the queue
        if not later:
            later.append(reprocess(ctx, ["R-s"], V3, progress=False))
        ctx.enqueue.drain()

    report = reprocess(ctx, ["R-s"], V2, progress=False, wait=wait)
    assert later[0].done == ["R-s"] and later[0].shown_elsewhere == {}
    assert report.done == ["R-s"] and report.shown_elsewhere == {"R-s": V3}
    assert {v for v, r in _runs(ctx, "R-s").items() if r[2]} == {V3}


def test_a_reprocess_run_failed_with_its_roll_gives_the_roll_back_and_can_be_asked_again(
    ctx, tmp_path
):
    """v2 current; a frame changed (both runs reopened), the live run done again, v2's bands
    lost; a broken upload of another frame fails the roll and v2 with it. Retried once the frame
    is put back, the live run shows the roll again (not v2's defects of the old pixels), and
    `rollscan reprocess --model v2` selects the roll and makes v2 current again."""
    _done_roll(ctx, tmp_path, "R-x")
    assert reprocess(ctx, ["R-x"], V2, progress=False).done == ["R-x"]
    _change_frame(ctx, tmp_path, "R-x", 3)
    _run_work_of(ctx, _runs(ctx, "R-x")[V1][0])
    ctx.enqueue.queue.clear()
    key, good = _broken_upload(ctx, "R-x", 2)
    ctx.store.put(key, good)
    retry_roll(ctx, "R-x")
    ctx.enqueue.drain()
    assert _roll(ctx, "R-x").status == "done"
    assert {v: r[1:] for v, r in _runs(ctx, "R-x").items()} == {
        V1: ("done", True),
        V2: ("failed", False),
    }
    with ctx.session() as session:
        assert select_rolls(session, model_version=V2) == ["R-x"]
    assert reprocess(ctx, ["R-x"], V2, progress=False).done == ["R-x"]
    assert _runs(ctx, "R-x")[V2][1:] == ("done", True)


def test_a_model_asked_for_while_the_roll_shows_it_keeps_the_roll_from_an_earlier_request(
    ctx, tmp_path
):
    """`reprocess --model v2` interrupted with its bands queued; `--model v1` (the model the
    roll shows) asked for after it: v2's run finishing later does not take the roll."""
    _done_roll(ctx, tmp_path, "R-k")
    run_v2, bands = start_reprocess_run(ctx, "R-k", V2)
    for band in bands:
        ctx.enqueue.score(run_v2, band, reprocess=True)
    with ctx.session() as session:
        assert select_rolls(session, model_version=V1) == ["R-k"]  # v2's run is open
    assert reprocess(ctx, ["R-k"], V1, progress=False).done == ["R-k"]
    ctx.enqueue.drain()  # v2's bands and finalize
    assert {v: r[1:] for v, r in _runs(ctx, "R-k").items()} == {
        V1: ("done", True),
        V2: ("done", False),
    }
    with ctx.session() as session:
        assert select_rolls(session, model_version=V1) == []


def test_a_failed_roll_shows_the_finished_run_asked_for_last_never_a_failed_one(ctx, tmp_path):
    """v2, then v3 (current); a frame changed, v2 done again; a broken upload fails the roll and
    v3 with it: v2 shows the roll (v3's defects read the old frame), and keeps it when the live
    run finishes after the retry. A roll whose only run failed says so, not its old defects."""
    _done_roll(ctx, tmp_path, "R-m")
    for version in (V2, V3):
        assert reprocess(ctx, ["R-m"], version, progress=False).done == ["R-m"]
    _change_frame(ctx, tmp_path, "R-m", 3)
    _run_work_of(ctx, _runs(ctx, "R-m")[V2][0])
    ctx.enqueue.queue.clear()
    key, good = _broken_upload(ctx, "R-m", 2)
    assert {v: r[1:] for v, r in _runs(ctx, "R-m").items()} == {
        V1: ("failed", False),
        V2: ("done", True),
        V3: ("failed", False),
    }
    ctx.store.put(key, good)
    retry_roll(ctx, "R-m")
    ctx.enqueue.drain()
    assert _roll(ctx, "R-m").status == "done"
    assert {v for v, r in _runs(ctx, "R-m").items() if r[2]} == {V2}

    _done_roll(ctx, tmp_path, "R-n")
    _change_frame(ctx, tmp_path, "R-n", 3)
    ctx.enqueue.queue.clear()
    _broken_upload(ctx, "R-n", 2)
    with ctx.session() as session:
        assert unscored_reason(session, "R-n").startswith("roll R-n: its current run failed: ")
        assert session.scalar(
            select(func.count()).select_from(Defect).where(Defect.roll_id == "R-n")
        )
        page = write_roll_report(session, ctx.store, "R-n", tmp_path / "page").read_text()
    assert "No defects to show: roll R-n: its current run failed: " in page
    assert '<tr id="d1">' not in page and "Not graded yet (its current run is failed)" in page


def test_work_out_of_retries_is_said_where_it_waits_and_forgotten_when_it_finishes(ctx, tmp_path):
    """A task out of transient retries notes why on what waits for it (`note_delivery_waiting`,
    "waiting: …"): a live band on its roll, which stays open; a reprocess band on its run, the
    done roll untouched. Each note goes once the work finishes."""
    from worker.deliveries import note_delivery_waiting

    submit(ctx, str(_write(tmp_path, "R-w")))
    while ctx.enqueue.queue[0][0].__name__ != "score_band":  # the roll's frames ingested
        function, args = ctx.enqueue.queue.popleft()
        function(ctx, *args)
    live = ctx.enqueue.queue[0][1][0]
    note_delivery_waiting(ctx, Delivery("score", f"{live}/0", "band 0", run_id=live), "gave up")
    roll = _roll(ctx, "R-w")
    assert (roll.status, roll.failure_reason) == ("ingesting", "waiting: gave up")
    ctx.enqueue.drain()
    roll = _roll(ctx, "R-w")
    assert (roll.status, roll.failure_reason) == ("done", None)

    run_v2, bands = start_reprocess_run(ctx, "R-w", V2)
    score_band(ctx, run_v2, bands[0])
    for band in reversed(bands):  # the first was scored by another copy meanwhile: not noted
        delivery = Delivery("score", f"{run_v2}/{band}", f"band {band}", run_id=run_v2)
        note_delivery_waiting(ctx, delivery, f"band {band} gave up")
    with ctx.session() as session:
        assert session.get(Run, run_v2).error == f"waiting: band {bands[1]} gave up"
    roll = _roll(ctx, "R-w")
    assert (roll.status, roll.failure_reason) == ("done", None)
    for band in bands[1:]:
        score_band(ctx, run_v2, band)
    ctx.enqueue.drain()
    with ctx.session() as session:
        assert (session.get(Run, run_v2).status, session.get(Run, run_v2).error) == ("done", None)
