"""The fabric's edges through the pipeline: measured while scoring, stored in PostgreSQL,
nothing reported off the fabric, the measured width in SQL and in grading."""

import logging
from dataclasses import replace

import numpy as np
import pytest
from fixtures_celery import FABRIC
from sqlalchemy import func, select, text

from distill.checkpoint import load_model, read_checkpoint, save_checkpoint
from results.grade_store import grade_run
from results.grading import choose_width
from results.roll_report import write_roll_report
from rollscan_testing.synthetic_roll import match_defects, write_synthetic_roll
from scheduler.submit import submit
from storage.fabric_extents import roll_extents, store_extents, unseen_mm
from storage.registry import activate_model, register_model
from storage.schema import Band, Defect, FabricExtent, Grade, Model, Roll, Run
from storage.zarr_rolls import open_roll
from worker.fabric_mask import UNSEEN_REACH, Extent, quarter_fabric_mask
from worker.roll_layout import run_tiling
from worker.task_metrics import tiles_scored_total
from worker.tiling import band_tiles, downsample_max

PX_PER_MM, BAND, WIDTH = 10.0, 1024, 768
LEFT, RIGHT = 96, 128  # table columns on each side: the fabric is [96, 640)
PLAN = [("hole", (1024, 300)), ("knot", (400, 560))]


@pytest.fixture
def ctx(make_inline_ctx):
    return make_inline_ctx(BAND)


def _scored_roll(ctx, tmp_path, roll_id: str, grey: int):
    folder = tmp_path / roll_id
    _, planted = write_synthetic_roll(
        folder, roll_id, frames=4, frame_rows=512, width=WIDTH, plan=PLAN, px_per_mm=PX_PER_MM,
        table=(LEFT, RIGHT, grey),
    )  # fmt: skip
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    return planted


def _with_tile_layout(ctx, checkpoint, layout: str, tmp_path) -> None:
    """The context's fabric type scored by a copy of its model whose card names `layout`."""
    model, card = load_model(checkpoint)
    _, state = read_checkpoint(checkpoint)
    path = save_checkpoint(
        tmp_path / f"{layout}.pt", model,
        replace(card, train_config={**card.train_config, "tile_layout": layout}),
        state.get("calibration_tiles"),
    )  # fmt: skip
    with ctx.session() as session:
        version, _ = register_model(session, ctx.store, path, fabric_type=FABRIC)
        activate_model(session, version.version)


@pytest.mark.parametrize("layout", ["grid", "fabric"])
@pytest.mark.parametrize("grey", [15, 245], ids=["dark table", "white table"])
def test_nothing_is_reported_off_the_fabric_and_its_edges_are_in_sql(
    ctx, tmp_path, grey, layout, twill_model
):
    roll_id = f"R-table-{grey}-{layout}"
    _with_tile_layout(ctx, twill_model, layout, tmp_path)
    before = tiles_scored_total()
    planted = _scored_roll(ctx, tmp_path, roll_id, grey)
    scored = tiles_scored_total() - before
    with ctx.session() as session:
        extents = session.scalars(select(FabricExtent).where(FabricExtent.roll_id == roll_id)).all()
        run = session.scalar(select(Run).where(Run.roll_id == roll_id, Run.is_current))
        found = [
            {c: getattr(d, c) for c in ("x0_mm", "y0_mm", "x1_mm", "y1_mm")}
            for d in session.scalars(select(Defect).where(Defect.run_id == run.id))
        ]
        bands = session.execute(
            select(Band.row_start, Band.row_stop).where(Band.run_id == run.id)
        ).all()
        tile, stride = run_tiling(ctx, session, run)
        widths = session.execute(
            text("SELECT blocks_measured, min_width_mm, median_width_mm, manifest_width_mm "
                 "FROM roll_widths WHERE roll_id = :r"), {"r": roll_id},
        ).one()  # fmt: skip
    # every block of every band measured once, edges within a cell of the truth
    assert [(e.row_start, e.row_stop) for e in extents] == [
        (r, r + 256) for r in range(0, 2048, 256)
    ]
    for e in extents:
        assert abs(e.left_px - LEFT) <= 16 and abs(e.right_px - (WIDTH - RIGHT)) <= 16
        assert e.left_mm == pytest.approx(e.left_px / PX_PER_MM)
        assert e.width_mm == pytest.approx((e.right_px - e.left_px) / PX_PER_MM)
    fabric_mm = (WIDTH - LEFT - RIGHT) / PX_PER_MM
    assert widths.blocks_measured == 8
    assert widths.median_width_mm == pytest.approx(fabric_mm, abs=3.2)
    assert widths.manifest_width_mm == WIDTH / PX_PER_MM
    # the table is never a defect; the planted ones are still found
    left_edge, right_edge = LEFT / PX_PER_MM, (WIDTH - RIGHT) / PX_PER_MM
    assert all(d["x1_mm"] > left_edge - 1.6 and d["x0_mm"] < right_edge + 1.6 for d in found)
    assert all(d["x0_mm"] >= left_edge - 1.6 and d["x1_mm"] <= right_edge + 1.6 for d in found), (
        found
    )
    matched, _ = match_defects(planted, found, PX_PER_MM)
    assert sorted(matched) == [0, 1], found

    # the worker laid the tiles as the model's card says: on the fabric, the fabric's first
    # columns are mapped by the tile that starts at its edge (rows of the second tile row)
    with ctx.session() as session:
        model = session.get(Model, run.model_version)
    left = extents[0].left_px
    r, margin, q0 = stride, (tile - stride) // 2, extents[0].left_px // 4 + 1
    arrays = open_roll(ctx.store, roll_id)
    alone = ctx.detector(model).predict(arrays.read_rows(r, r + tile)[:, left : left + tile])
    expected = downsample_max(alone.maps[0][margin : tile - margin, q0 * 4 - left :][:, :24])
    stored = arrays.read_scores(model.version, (r + margin) // 4, (r + tile - margin) // 4)
    stored = stored[:, q0 : q0 + 6].astype(np.float32)
    # the same map but for rounding: float16 steps in float32; in bf16 (`auto` on a CPU with
    # native bf16) the tile scored in another batch rounds otherwise, ~0.003 here — the grid's
    # other tile differs by tens
    assert np.allclose(stored, expected, rtol=1e-2, atol=1e-2) == (layout == "fabric")
    assert scored == sum(len(band_tiles(*b, 2048, WIDTH, tile, stride)) for b in bands) or (
        layout == "fabric"
    )


def test_grading_takes_the_measured_width_when_the_manifest_disagrees(ctx, tmp_path, caplog):
    roll_id = "R-graded"
    _scored_roll(ctx, tmp_path, roll_id, 15)
    with ctx.session() as session, caplog.at_level(logging.WARNING):
        run = session.scalar(select(Run).where(Run.roll_id == roll_id, Run.is_current))
        grade_run(session, run.id)
        grade = session.get(Grade, (roll_id, run.id, "astm_d5430"))
    # 76.8 mm in the manifest, ≈ 54.4 mm measured: beyond 5 %, so the measured width grades
    assert grade.details["width_source"] == "measured"
    assert grade.details["measured_width_mm"] == pytest.approx(54.4, abs=3.2)
    assert grade.details["fabric_left_mm"] == pytest.approx(LEFT / PX_PER_MM, abs=1.6)
    assert "measured fabric width" in caplog.text


def test_the_graded_width_is_the_median_width_the_view_and_report_show(ctx):
    """The fabric narrows by 100 mm on most blocks, on alternate sides: the median edges lie
    1,400 mm apart, the blocks' median width is 1,400 mm (6.7 % under the manifest's 1,500);
    grading had taken the medians' difference (1,500: "manifest") where the view said 1,400."""
    with ctx.session() as session:
        session.add(Roll(id="R-narrow", fabric_type=FABRIC, width_mm=1500.0, px_per_mm_x=1.0,
                         px_per_mm_y=1.0, length_m=91.44, status="done"))  # fmt: skip
        session.flush()
        edges = [(0, 1400), (100, 1500), (0, 1500), (0, 1400), (100, 1500)]
        store_extents(session, "R-narrow", (1.0, 1.0), [
            Extent(i * 256, (i + 1) * 256, left, right) for i, (left, right) in enumerate(edges)
        ])  # fmt: skip
        version = session.scalar(select(Model.version).where(Model.fabric_type == FABRIC))
        run = Run(roll_id="R-narrow", model_version=version, purpose="live", status="done",
                  is_current=True, finished_at=func.now())  # fmt: skip
        session.add(run)
        session.flush()
        grade_run(session, run.id)
        details = session.get(Grade, ("R-narrow", run.id, "astm_d5430")).details
        view = session.execute(
            text("SELECT median_width_mm FROM roll_widths WHERE roll_id = 'R-narrow'")
        ).scalar()
    assert view == 1400.0
    assert (details["measured_width_mm"], details["width_source"]) == (1400.0, "measured")


def test_choose_width_keeps_the_manifest_within_tolerance():
    assert choose_width(1600.0, None, 0.05) == (1600.0, 0.0, 1600.0, "manifest")
    assert choose_width(1600.0, (20.0, 1640.0, 1620.0), 0.05) == (1600.0, 20.0, 1640.0, "manifest")
    assert choose_width(1600.0, (20.0, 1420.0, 1400.0), 0.05) == (1400.0, 20.0, 1420.0, "measured")
    # the median width decides, not the median edges' difference (a fabric narrowing on
    # alternate sides: the two differ)
    assert choose_width(1500.0, (50.0, 1550.0, 1400.0), 0.05) == (1400.0, 50.0, 1550.0, "measured")
    # exactly 5 % off is not "more than" 5 %, whatever the rounding (16002 px at 10 px/mm
    # against 1524 mm read as beyond it)
    for measured in (16002 / 10, 14478 / 10):
        assert choose_width(1524.0, (0.0, measured, measured), 0.05)[3] == "manifest"
    assert choose_width(1524.0, (0.0, 1600.3, 1600.3), 0.05)[3] == "measured"


def test_the_quarter_mask_keeps_every_quarter_pixel_that_touches_the_fabric():
    extents = [Extent(0, 256, 10, 101), Extent(256, 512, 0, 128)]
    mask = quarter_fabric_mask(extents, 0, 128, 32, 4)
    assert mask[:64, 2:26].all() and not mask[:64, :2].any() and not mask[:64, 26:].any()
    assert mask[64:].all()  # a block with no margin: fabric from side to side
    # rows no extent covers (a roll scored before extents existed) stay fabric
    assert quarter_fabric_mask(extents, 128, 160, 32, 4).all()
    assert np.array_equal(quarter_fabric_mask([], 0, 4, 8, 4), np.ones((4, 8), bool))
    # rows without fabric, and the fabric's rows within UNSEEN_REACH of them, band by band
    extents = [Extent(0, 256, 0, 128), Extent(256, 300, 0, 0), Extent(300, 512, 0, 128)]
    reach = UNSEEN_REACH // 4
    for q0, q1 in ((0, 128), (0, 50), (90, 128)):
        rows = ~quarter_fabric_mask(extents, q0, q1, 32, 4).any(axis=1)
        unseen = [q for q in range(q0, q1) if 64 - reach <= q < 75 + reach]
        assert np.flatnonzero(rows).tolist() == [q - q0 for q in unseen], (q0, q1)


def test_where_the_camera_saw_no_fabric_nothing_is_reported_and_nothing_graded(ctx, tmp_path):
    """Dark frames — the line running before the fabric's start, the lights off mid-roll — were
    taken for fabric from side to side: one roll-wide defect each, the roll graded reject for
    what the camera never saw. They are stored as rows without fabric — to the row where the
    fabric starts or ends within a block —, no defect lies in them or at their ends, the roll is
    graded on the length seen, and SQL, the grade and the report say so."""
    roll_id, dark = "R-dark", [(0, 600), (1024, 1300)]
    folder = tmp_path / roll_id
    _, planted = write_synthetic_roll(
        folder, roll_id, frames=4, frame_rows=512, width=WIDTH, px_per_mm=PX_PER_MM, dark=dark,
        plan=[("hole", (800, 300)), ("knot", (1800, 560))],
    )  # fmt: skip
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    with ctx.session() as session:
        extents = session.scalars(
            select(FabricExtent)
            .where(FabricExtent.roll_id == roll_id)
            .order_by(FabricExtent.row_start)
        ).all()  # fmt: skip
        run = session.scalar(select(Run).where(Run.roll_id == roll_id, Run.is_current))
        found = [
            {c: getattr(d, c) for c in ("x0_mm", "y0_mm", "x1_mm", "y1_mm")}
            for d in session.scalars(select(Defect).where(Defect.run_id == run.id))
        ]
        widths = session.execute(
            text("SELECT blocks_measured, min_width_mm, median_width_mm, unseen_mm "
                 "FROM roll_widths WHERE roll_id = :r"), {"r": roll_id},
        ).one()  # fmt: skip
        graded = grade_run(session, run.id)
        grade = session.get(Grade, (roll_id, run.id, "astm_d5430"))
        session.commit()
        report = write_roll_report(session, ctx.store, roll_id, tmp_path / "report")
    unseen = [(e.row_start, e.row_stop) for e in extents if e.width_mm == 0]
    assert unseen == [(0, 256), (256, 512), (512, 600), (1024, 1280), (1280, 1300)]
    assert all(e.left_px == e.right_px == 0 for e in extents if e.width_mm == 0)
    # the planted flaws found, and nothing else: not in the dark rows, not at their ends
    matched, _ = match_defects(planted, found, PX_PER_MM)
    assert sorted(matched) == [0, 1] and len(found) == 2, found
    # the widths over the fabric alone, the length not seen beside them
    assert widths.blocks_measured == 10
    assert widths.min_width_mm == widths.median_width_mm == WIDTH / PX_PER_MM
    # not inspected: the dark rows and the 64 rows of fabric beside each stretch of them
    unseen = (600 + UNSEEN_REACH + 276 + 2 * UNSEEN_REACH) / PX_PER_MM
    assert widths.unseen_mm == pytest.approx(unseen)
    assert graded.unseen_m == grade.details["unseen_m"] == pytest.approx(unseen / 1000)
    assert grade.yards == pytest.approx((204.8 - unseen) / 914.4)  # the length inspected
    assert "not inspected over 0.11 m" in report.read_text()


@pytest.mark.parametrize(("rows", "px_per_mm"), [(512, 1.0), (10031, 10.0), (2039, 4.0)])
def test_a_roll_where_no_fabric_was_seen_is_not_graded(ctx, rows, px_per_mm):
    """Nor graded "A" because its length less the length not seen came out 1e-13 mm."""
    roll_id = f"R-black-{rows}"
    with ctx.session() as session:
        session.add(Roll(id=roll_id, fabric_type=FABRIC, width_mm=100.0, px_per_mm_x=1.0,
                         px_per_mm_y=px_per_mm, rows_ingested=rows,
                         length_m=rows / px_per_mm / 1000.0, status="done"))  # fmt: skip
        session.flush()
        blocks = [Extent(r, min(r + 256, rows), 0, 0) for r in range(0, rows, 256)]
        store_extents(session, roll_id, (1.0, px_per_mm), blocks)
        version = session.scalar(select(Model.version).where(Model.fabric_type == FABRIC))
        run = Run(roll_id=roll_id, model_version=version, purpose="live", status="done",
                  is_current=True, finished_at=func.now())  # fmt: skip
        session.add(run)
        session.flush()
        with pytest.raises(ValueError, match=r"no fabric was seen over its \d+\.\d\d m"):
            grade_run(session, run.id)
        assert session.get(Grade, (roll_id, run.id, "astm_d5430")) is None


def test_a_band_measured_again_replaces_the_extents_of_its_rows(ctx):
    """A frame sent again with fabric where it had been dark: the block, split before, is one
    extent now — the empty one left beside it had hidden a flaw there."""
    with ctx.session() as session:
        session.add(Roll(id="R-again", fabric_type=FABRIC, width_mm=100.0, px_per_mm_x=1.0,
                         px_per_mm_y=1.0, rows_ingested=1024, status="scoring"))  # fmt: skip
        session.flush()
        first = [Extent(0, 512, 0, 90), Extent(512, 900, 0, 90), Extent(900, 1024, 0, 0)]
        store_extents(session, "R-again", (1.0, 1.0), first)
        store_extents(
            session, "R-again", (1.0, 1.0), [Extent(512, 768, 0, 90), Extent(768, 1024, 0, 90)]
        )
        assert roll_extents(session, "R-again") == [
            (0, 512, 0, 90),
            (512, 768, 0, 90),
            (768, 1024, 0, 90),
        ]
        assert unseen_mm(session, "R-again") == 0.0
