"""The roll pipeline's plain functions on a real PostgreSQL and object store, without Celery."""

import io
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import tifffile
from sqlalchemy import func, select

from rollscan_testing.synthetic_roll import match_defects, write_synthetic_roll
from scheduler.submit import submit
from storage.manifest import parse_manifest
from storage.registry import activate_model, register_model
from storage.schema import Band, Defect, Frame, Model, Roll, Run
from storage.settings import Settings
from storage.zarr_rolls import open_roll
from worker.context import WorkerContext
from worker.finalize import finalize_run
from worker.ingest import ingest_frame, roll_updated
from worker.inline import InlineEnqueuer
from worker.roll_rows import RollError, register_roll
from worker.scoring import score_band

PX_PER_MM = 10.0
BAND = 1024
FRAME_ROWS, FRAMES, WIDTH = 512, 5, 768  # 2560 rows: bands of 1024, 1024, 512
PLAN = [("hole", (1024, 300)), ("knot", (400, 600)), ("broken_pick", (2200, 384))]


@pytest.fixture
def ctx(make_inline_ctx):
    return make_inline_ctx(BAND)


def _roll(tmp_path, roll_id, **kwargs):
    kwargs = {"frames": FRAMES, "frame_rows": FRAME_ROWS, "width": WIDTH, "plan": PLAN,
              "px_per_mm": PX_PER_MM, **kwargs}  # fmt: skip
    return tmp_path / roll_id, *write_synthetic_roll(tmp_path / roll_id, roll_id, **kwargs)


def _defects(ctx, roll_id):
    with ctx.session() as session:
        run = session.scalar(select(Run).where(Run.roll_id == roll_id, Run.is_current))
        rows = session.scalars(
            select(Defect).where(Defect.run_id == run.id).order_by(Defect.defect_no)
        )
        return [
            {c: getattr(d, c) for c in ("defect_no", "x_mm", "y_mm", "x0_mm", "y0_mm", "x1_mm",
                                         "y1_mm", "length_mm", "width_mm", "area_mm2", "max_score")}
            for d in rows
        ]  # fmt: skip


def test_planted_defects_come_out_at_their_positions(ctx, tmp_path, monkeypatch):
    monkeypatch.setattr("worker.finalize.INSERT_ROWS", 1)  # a statement a defect: all of them in
    folder, _, planted = _roll(tmp_path, "R-0001")
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    with ctx.session() as session:
        roll = session.get(Roll, "R-0001")
        assert roll.status == "done", roll.failure_reason
        assert roll.rows_ingested == FRAMES * FRAME_ROWS
        assert roll.length_m == pytest.approx(FRAMES * FRAME_ROWS / PX_PER_MM / 1000)
        run = session.scalar(select(Run).where(Run.roll_id == "R-0001"))
        assert (run.status, run.bands_total, run.bands_done, run.is_current) == ("done", 3, 3, True)
    found = _defects(ctx, "R-0001")
    matched, false = match_defects(planted, found, PX_PER_MM)
    assert sorted(matched) == [0, 1, 2], found
    for i, j in matched.items():
        x, y = planted[i].center_mm(PX_PER_MM)
        assert abs(found[j]["x_mm"] - x) <= 5 and abs(found[j]["y_mm"] - y) <= 5
    assert len(false) <= 1, [found[j] for j in false]
    # the hole planted across the band boundary at row 1024 is one defect, not two
    across = [d for d in found if d["y0_mm"] < BAND / PX_PER_MM < d["y1_mm"]]
    assert len(across) == 1


def test_streaming_frames_give_the_same_defects_as_all_at_once(ctx, tmp_path):
    batch_dir, manifest, _ = _roll(tmp_path, "R-batch")
    submit(ctx, str(batch_dir))
    ctx.enqueue.drain()
    stream_dir, manifest, _ = _roll(tmp_path, "R-stream")
    stream_manifest = parse_manifest({**manifest, "frames": None, "complete": False})
    with ctx.session() as session:
        register_roll(session, stream_manifest, "incoming/R-stream")
    scored_before_end = 0
    for seq in range(1, FRAMES + 1):
        key = f"incoming/R-stream/frames/{seq:06d}.tif"
        ctx.store.put(key, (stream_dir / "frames" / f"{seq:06d}.tif").read_bytes())
        assert ingest_frame(ctx, "R-stream", seq, key) == "ingested"
        scored_before_end += sum(1 for name, _, r in ctx.enqueue.drain() if r == "scored")
    assert scored_before_end >= 1  # bands are scored while later frames are still arriving
    with ctx.session() as session:
        register_roll(session, parse_manifest({**manifest, "complete": True}), "incoming/R-stream")
    roll_updated(ctx, "R-stream")
    ctx.enqueue.drain()
    assert _defects(ctx, "R-stream") == _defects(ctx, "R-batch")
    a = open_roll(ctx.store, "R-stream").read_scores(_version(ctx, "R-stream"), 0, 640)
    b = open_roll(ctx.store, "R-batch").read_scores(_version(ctx, "R-batch"), 0, 640)
    np.testing.assert_array_equal(a, b)


def test_every_band_of_a_run_is_scored_on_one_tile_grid_whichever_worker_takes_it(ctx, tmp_path):
    """Two workers set up with different ROLLSCAN_OVERLAP scored the bands of one run each on its
    own tile grid, and nothing said so. The run fixes its stride when its bands are recorded."""
    reference_dir, _, _ = _roll(tmp_path, "R-one-grid")
    submit(ctx, str(reference_dir))
    ctx.enqueue.drain()
    other = replace(ctx, settings=ctx.settings.model_copy(update={"overlap": 64}),
                    _detectors={}, _lock=threading.Lock())  # fmt: skip
    mixed_dir, _, _ = _roll(tmp_path, "R-two-workers")
    submit(ctx, str(mixed_dir))
    scored_by_other = 0
    while ctx.enqueue.queue:  # this worker ingests and finalizes; the other scores every band
        function, args = ctx.enqueue.queue.popleft()
        if function is score_band:
            scored_by_other += score_band(other, *args) == "scored"
        else:
            function(ctx, *args)
    assert scored_by_other == 3
    with ctx.session() as session:
        strides = dict(session.execute(select(Run.roll_id, Run.stride)).all())
        tile = session.scalar(select(Model.tile).where(Model.active))
    assert strides["R-two-workers"] == strides["R-one-grid"] == tile - min(32, tile // 2)
    assert _defects(ctx, "R-two-workers") == _defects(ctx, "R-one-grid")
    a = open_roll(ctx.store, "R-two-workers").read_scores(_version(ctx, "R-two-workers"), 0, 640)
    b = open_roll(ctx.store, "R-one-grid").read_scores(_version(ctx, "R-one-grid"), 0, 640)
    np.testing.assert_array_equal(a, b)


def _version(ctx, roll_id):
    with ctx.session() as session:
        return session.scalar(select(Run.model_version).where(Run.roll_id == roll_id))


def test_every_step_is_idempotent(ctx, tmp_path):
    folder, _, _ = _roll(tmp_path, "R-idem")
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    before = _defects(ctx, "R-idem")
    key = "incoming/R-idem/frames/000002.tif"
    assert ingest_frame(ctx, "R-idem", 2, key) == "unchanged"
    ctx.enqueue.drain()
    with ctx.session() as session:
        run = session.scalar(select(Run).where(Run.roll_id == "R-idem"))
        run_id = run.id
    assert score_band(ctx, run_id, 1) == "already done"
    assert finalize_run(ctx, run_id) == len(before)
    assert finalize_run(ctx, run_id) == len(before)
    assert _defects(ctx, "R-idem") == before
    with ctx.session() as session:
        assert (
            session.scalar(select(func.count()).select_from(Frame).where(Frame.roll_id == "R-idem"))
            == FRAMES
        )
        assert session.get(Run, run_id).bands_done == 3
        assert (
            session.scalar(select(func.count()).select_from(Band).where(Band.run_id == run_id)) == 3
        )


def test_a_changed_frame_is_reingested_and_its_bands_rescored(ctx, tmp_path):
    """Every band that reads the frame's rows is scored again — band 1, which holds them, and
    band 0, whose last tiles and fabric blocks reach into them — and the roll ends as if the
    new frame had come first."""
    folder, _, _ = _roll(tmp_path, "R-change", plan=[])
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    before = _defects(ctx, "R-change")
    frame = tifffile.imread(folder / "frames" / "000003.tif")
    frame[0:24, 300:360] = 255  # a flaw in a re-upload of frame 3, at band 1's very top
    key = "incoming/R-change/frames/000003.tif"
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, frame)
    ctx.store.put(key, buffer.getvalue())
    assert ingest_frame(ctx, "R-change", 3, key) == "ingested"
    queued = [(function.__name__, args[-1]) for function, args in ctx.enqueue.queue]
    assert sorted(queued) == [("score_band", 0), ("score_band", 1)]  # frame 3: rows 1024..1535
    ctx.enqueue.drain()
    after = _defects(ctx, "R-change")
    y, x = (2 * FRAME_ROWS + 12) / PX_PER_MM, 330 / PX_PER_MM
    covering = [d for d in after if d["y0_mm"] <= y <= d["y1_mm"] and d["x0_mm"] <= x <= d["x1_mm"]]
    assert len(covering) == 1
    assert not [
        d for d in before if d["y0_mm"] <= y <= d["y1_mm"] and d["x0_mm"] <= x <= d["x1_mm"]
    ]
    with ctx.session() as session:
        assert session.get(Roll, "R-change").status == "done"
        assert session.scalar(select(Run.bands_done).where(Run.roll_id == "R-change")) == 3
    # the same roll with the new frame from the start: the same map and defects, bit for bit
    fresh, _, _ = _roll(tmp_path, "R-fresh", plan=[])
    (fresh / "frames" / "000003.tif").write_bytes(buffer.getvalue())
    submit(ctx, str(fresh))
    ctx.enqueue.drain()
    assert _defects(ctx, "R-fresh") == after
    with ctx.session() as session:
        version = session.scalar(select(Run.model_version).where(Run.roll_id == "R-change"))
    rows = FRAMES * FRAME_ROWS // 4
    np.testing.assert_array_equal(
        open_roll(ctx.store, "R-change").read_scores(version, 0, rows),
        open_roll(ctx.store, "R-fresh").read_scores(version, 0, rows),
    )


def test_a_bad_frame_fails_its_roll_and_others_go_on(ctx, tmp_path):
    bad_dir, _, _ = _roll(tmp_path, "R-bad", plan=[])
    (bad_dir / "frames" / "000002.tif").write_bytes(b"II*\x00 this is not a tiff")
    good_dir, _, _ = _roll(tmp_path, "R-good", plan=[])
    submit(ctx, str(bad_dir))
    submit(ctx, str(good_dir))
    ctx.enqueue.drain()
    with ctx.session() as session:
        bad, good = session.get(Roll, "R-bad"), session.get(Roll, "R-good")
        assert bad.status == "failed" and "frame 2" in bad.failure_reason
        assert good.status == "done"
        assert session.scalar(select(Run.status).where(Run.roll_id == "R-bad")) == "failed"


def test_a_roll_without_a_model_fails_clearly(ctx, tmp_path):
    folder, _, _ = _roll(tmp_path, "R-nomodel", plan=[], fabric_type="velvet")
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    with ctx.session() as session:
        roll = session.get(Roll, "R-nomodel")
        assert roll.status == "failed"
        assert "no active model for fabric type 'velvet'" in roll.failure_reason


def test_a_folder_refused_for_its_roll_id_uploads_nothing_over_that_rolls_frames(ctx, tmp_path):
    """Another roll's folder under a registered roll's id (another fabric, a changed frame
    count) was uploaded, then refused: its frames stood under the roll's source, where a later
    `rollscan resume` took them for replaced frames and ingested them into the finished roll."""
    folder, _, _ = _roll(tmp_path, "R-taken", plan=[])
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    stored = {info.key: info.etag for info in ctx.store.iter_objects("incoming/R-taken/")}
    for i, (changes, reason) in enumerate([
        ({"fabric_type": "velvet"}, "changes fabric_type"),
        ({"frames": FRAMES - 1}, f"already complete with {FRAMES} frames"),
    ]):  # fmt: skip
        other, _, _ = _roll(tmp_path / f"other{i}", "R-taken", plan=[], seed=99, **changes)
        with pytest.raises(RollError, match=reason):
            submit(ctx, str(other))
        now = {info.key: info.etag for info in ctx.store.iter_objects("incoming/R-taken/")}
        assert now == stored
    assert not ctx.enqueue.queue


def test_two_finalizes_at_once_write_one_set_of_defects(ctx, tmp_path):
    folder, _, _ = _roll(tmp_path, "R-twice")
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    before = _defects(ctx, "R-twice")
    with ctx.session() as session:
        run_id = session.scalar(select(Run.id).where(Run.roll_id == "R-twice"))
    barrier = threading.Barrier(4)

    def finalize_together(_):
        barrier.wait()
        return finalize_run(ctx, run_id)

    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(finalize_together, range(4)))
    assert counts == [len(before)] * 4
    assert _defects(ctx, "R-twice") == before
    with ctx.session() as session:
        rows = select(func.count()).select_from(Defect).where(Defect.run_id == run_id)
        assert session.scalar(rows) == len(before)


def test_credentials_never_reach_the_logs(db_engine, s3_store, twill_model, tmp_path, caplog):
    from fixtures_s3 import FAKE_SECRET_ACCESS_KEY

    caplog.set_level(logging.DEBUG)  # every logger, botocore's wire logging included
    settings = Settings(
        band_height=BAND, data_dir=tmp_path / "data", device="cpu",
        database_url="postgresql+psycopg2://rollscan:pg-secret-do-not-log@127.0.0.1:1/x",
        s3_secret_access_key=FAKE_SECRET_ACCESS_KEY,
    )  # fmt: skip
    enqueuer = InlineEnqueuer()
    context = WorkerContext(settings, db_engine, s3_store, enqueuer, device="cpu", batch_size=8)
    enqueuer.ctx = context
    with context.session() as session:
        model, _ = register_model(session, s3_store, twill_model, fabric_type="demo-twill")
        activate_model(session, model.version)
    folder, _, _ = _roll(tmp_path, "R-secret", frames=2, plan=[])
    submit(context, str(folder))
    enqueuer.drain()
    logging.getLogger("test").info("settings: %r / %s", settings, settings.describe())
    logging.getLogger("test").info("store: %r", s3_store)
    text = caplog.text
    assert "R-secret" in text  # the capture did see the pipeline's logging
    assert FAKE_SECRET_ACCESS_KEY not in text
    assert "pg-secret-do-not-log" not in text


@pytest.mark.parametrize("redelivered", ["last band", "last frame"])
def test_a_redelivered_step_sends_the_lost_finalize_again(ctx, tmp_path, redelivered):
    folder, _, planted = _roll(tmp_path, "R-lost")
    submission = submit(ctx, str(folder))
    lost = [r for r in ctx.enqueue.drain(lose="finalize_run") if r[2] == "lost"]
    assert len(lost) == 1
    with ctx.session() as session:
        run = session.scalar(select(Run).where(Run.roll_id == "R-lost"))
        assert (run.status, run.bands_done, run.bands_total) == ("scoring", 3, 3)
    if redelivered == "last band":
        assert score_band(ctx, run.id, 2) == "already done"
    else:
        seq, key = submission.frames[-1]
        assert ingest_frame(ctx, "R-lost", seq, key) == "unchanged"
    assert [name for name, *_ in ctx.enqueue.drain()] == ["finalize_run"]
    with ctx.session() as session:
        assert session.get(Run, run.id).status == "done"
    matched, _ = match_defects(planted, _defects(ctx, "R-lost"), PX_PER_MM)
    assert sorted(matched) == list(range(len(planted)))
    assert score_band(ctx, run.id, 2) == "already done"  # a done run sends nothing more
    assert not ctx.enqueue.queue


def _open_roll(tmp_path, roll_id):
    """A roll of FRAMES frames whose manifest does not say yet how many there are."""
    folder, _, _ = _roll(tmp_path, roll_id, plan=[], complete=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["frames"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


def _complete(ctx, manifest, frames):
    with ctx.session() as session:
        register_roll(session, parse_manifest({**manifest, "frames": frames, "complete": True}),
                      "incoming/" + manifest["roll_id"])  # fmt: skip


def test_a_frame_queued_past_the_count_the_manifest_then_gives_is_skipped(ctx, tmp_path):
    """Frames 1–5 were queued while the manifest was open; it then says 4. Frame 5 is no part
    of the roll: its ingest is skipped (it recorded a band past the run's count, the finalize
    came one band early and the last count broke the run's check constraint)."""
    folder, manifest = _open_roll(tmp_path, "R-past")
    submit(ctx, str(folder))
    ingests = [task for task in ctx.enqueue.queue if task[0] is ingest_frame]
    assert [args[1] for _, args in ingests] == [1, 2, 3, 4, 5]
    ctx.enqueue.queue.clear()
    for function, args in ingests[:4]:
        assert function(ctx, *args) == "ingested"
    _complete(ctx, manifest, frames=4)
    assert ingest_frame(ctx, *ingests[4][1]) == "skipped"
    roll_updated(ctx, "R-past")
    ctx.enqueue.drain()
    with ctx.session() as session:
        roll = session.get(Roll, "R-past")
        run = session.scalar(select(Run).where(Run.roll_id == "R-past"))
        assert (roll.status, roll.rows_ingested) == ("done", 4 * FRAME_ROWS)
        assert (run.status, run.bands_done, run.bands_total) == ("done", 2, 2)
        bands = session.scalar(select(func.count()).select_from(Band).where(Band.run_id == run.id))
        assert bands == 2


def test_a_manifest_cannot_count_fewer_frames_than_are_in(ctx, tmp_path):
    folder, manifest = _open_roll(tmp_path, "R-fewer")
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    with pytest.raises(RollError, match="the manifest says 3 frames, but frame 5 is already in"):
        _complete(ctx, manifest, frames=3)


def test_a_complete_manifest_whose_announcement_was_lost_is_announced_again(ctx, tmp_path):
    """The manifest completes after every frame is in: its update records the last band and
    sends it; the message is lost (a broker away), and the update, taken again (discovery's
    cursor still says so), must send the band again — it only sent bands it recorded then."""
    folder, manifest = _open_roll(tmp_path, "R-lost")
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    _complete(ctx, manifest, frames=FRAMES)
    assert roll_updated(ctx, "R-lost") == [2]
    ctx.enqueue.queue.clear()  # lost
    assert roll_updated(ctx, "R-lost") == [2]
    ctx.enqueue.drain()
    with ctx.session() as session:
        assert session.get(Roll, "R-lost").status == "done"
