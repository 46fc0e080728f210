"""Finalize a run: threshold the roll's score map on the fabric (the extents measured while
scoring), find defects across bands, store them. The run records the threshold it applied
and the roll's own estimate of it (`worker.roll_threshold`).

Runs in one transaction with the run's row locked, so two finalize tasks for one run produce
one set of defects. Finalizing a run already done changes nothing; a run reopened by a
re-uploaded frame is finalized again, and then its defects are replaced, not added to. A run
becomes the roll's current run only here, when it is complete and was asked for after the
current one (`worker.roll_rows.asked_last`): until then the previous run's defects and grade
stay what users see; a run reopened by a changed frame keeps whatever place it had.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import delete, func, insert, select

from storage.fabric_extents import roll_extents
from storage.schema import WAITING, Defect, Grade, Model, Roll, Run
from storage.zarr_rolls import RollArrays
from worker.band_scores import SCORE_SCALE
from worker.components import DefectFinder
from worker.context import WorkerContext
from worker.fabric_mask import Extent, quarter_fabric_mask
from worker.roll_layout import roll_arrays
from worker.roll_rows import asked_last, make_current
from worker.roll_threshold import BlockPeaks, run_threshold

log = logging.getLogger(__name__)
INSERT_ROWS = 10_000  # defect rows a statement inserts


def finalize_run(ctx: WorkerContext, run_id: int) -> int | None:
    """Write the run's defects; returns their number, or None when the run is not ready."""
    with ctx.session() as session:
        roll_id = session.scalar(select(Run.roll_id).where(Run.id == run_id))
        if roll_id is None:
            raise ValueError(f"unknown run {run_id}")
        # the roll's row first, then the run's: the order ingest and a failing roll take them
        roll = session.get(Roll, roll_id, with_for_update=True)
        run = session.get(Run, run_id, with_for_update=True)
        if run.status == "done":
            # a repeated finalize (redelivered, or sent again by `resume`): the defects stay
            # as they are, with their ids and the points the grading wrote on them
            return session.scalar(
                select(func.count()).select_from(Defect).where(Defect.run_id == run_id)
            )
        if run.status == "failed" or run.bands_total is None or run.bands_done < run.bands_total:
            log.info("run %s not ready to finalize (%s, %s/%s bands)", run_id, run.status,
                     run.bands_done, run.bands_total)  # fmt: skip
            return None
        model = session.get(Model, run.model_version)
        arrays = roll_arrays(ctx, roll)
        extents = [Extent(*e) for e in roll_extents(session, roll.id)]
        rows = -(-roll.rows_ingested // SCORE_SCALE)
        block_peaks = BlockPeaks(max(1, model.tile // SCORE_SCALE))
        mode, fpr = ctx.settings.roll_threshold, model.metrics.get("target_fpr")
        # `model` knows its threshold before reading: the peaks are gathered in the same pass as
        # the defects; `max` needs the roll's own estimate first, so it reads the map twice
        one_pass = mode == "model"
        threshold = model.threshold
        if not one_pass:
            for q0, scores in _fabric_bands(arrays, model.version, extents, rows):
                block_peaks.add_band(scores, q0)
            threshold, own = run_threshold(mode, model.threshold, block_peaks.peaks(), fpr)
        finder = DefectFinder(
            threshold=threshold,
            px_per_mm_x=roll.px_per_mm_x,
            px_per_mm_y=roll.px_per_mm_y,
            scale=SCORE_SCALE,
            merge_gap_mm=ctx.settings.merge_gap_mm,
            image_px=(roll.rows_ingested, roll.width_px) if roll.width_px else None,
        )
        for q0, scores in _fabric_bands(arrays, model.version, extents, rows):
            finder.add_band(scores, q0)
            if one_pass:
                block_peaks.add_band(scores, q0)
        defects = finder.finish()
        if one_pass:
            threshold, own = run_threshold(mode, model.threshold, block_peaks.peaks(), fpr)
        session.execute(delete(Defect).where(Defect.run_id == run_id))
        # a run finalized again (a changed frame) loses the grade of its old defects: the roll
        # reads "not graded" until the nightly grading, not the points of defects now gone
        session.execute(delete(Grade).where(Grade.run_id == run_id))
        # in slices: a roll of 300,000 specks built every row's parameters at once (+600 MB)
        for first in range(0, len(defects), INSERT_ROWS):
            session.execute(
                insert(Defect),
                [
                    {"run_id": run_id, "roll_id": roll.id, "defect_no": d.defect_no,
                     "x_mm": d.x_mm, "y_mm": d.y_mm, "x0_mm": d.x0_mm, "y0_mm": d.y0_mm,
                     "x1_mm": d.x1_mm, "y1_mm": d.y1_mm, "length_mm": d.length_mm,
                     "width_mm": d.width_mm, "area_mm2": d.area_mm2, "max_score": d.max_score,
                     "mean_score": d.mean_score}
                    for d in defects[first : first + INSERT_ROWS]
                ],
            )  # fmt: skip
        now, first = datetime.now(UTC), run.finished_at is None
        if asked_last(session, run):
            make_current(session, run)
        run.status, run.finished_at, run.error = "done", now, None
        run.threshold, run.roll_threshold = threshold, own
        roll.status, roll.updated_at = "done", now
        if (roll.failure_reason or "").startswith(WAITING):  # a task's, that waited: it is over
            roll.failure_reason = None
        if (run.purpose == "live" and first) or roll.completed_at is None:
            # a reprocess run, or a run finalized again after a changed frame, leaves the roll's
            # completion date alone: the archive does not become "finished today", and
            # `reprocess --since/--until` keeps selecting it
            roll.completed_at = now
        roll.length_m = roll.rows_ingested / roll.px_per_mm_y / 1000.0
    log.info("run %s finalized: %d defects on roll %s (threshold %.4g; model's %.4g, roll's %s)",
             run_id, len(defects), roll.id, threshold, model.threshold, own)  # fmt: skip
    return len(defects)


def _fabric_bands(
    arrays: RollArrays, version: str, extents: list[Extent], rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    """The roll's ¼-res score map band by band, −inf off the fabric (the table beside the
    fabric is never a defect, nor part of the roll's own score statistics)."""
    quarter_band = arrays.band_height // SCORE_SCALE
    for q0 in range(0, rows, quarter_band):
        q1 = min(q0 + quarter_band, rows)
        scores = arrays.read_scores(version, q0, q1)
        if extents:
            scores = np.where(quarter_fabric_mask(extents, q0, q1, scores.shape[1], SCORE_SCALE),
                              scores, -np.inf)  # fmt: skip
        yield q0, scores
