"""Score one band: read its rows plus halo, tile, run the model in batches, max-stitch, store;
measure where the fabric lies across the band's rows and store that too.

A band is the unit of work: one task writes one band's score shard (¼ resolution, float16), so
no two writers ever share a shard. Scoring a band twice writes the same values and counts once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from sqlalchemy import update

from distill.input_fit import input_misfit
from storage.fabric_extents import store_extents
from storage.schema import Band, Model, Roll, Run
from worker.band_scores import band_scores
from worker.context import WorkerContext, lock_bands
from worker.fabric_mask import WindowFabric, band_window
from worker.ingest import finalize_due
from worker.roll_layout import roll_arrays, run_tiling
from worker.roll_rows import RollError
from worker.task_metrics import band_scored
from worker.tiling import band_tiles, fabric_band_tiles

log = logging.getLogger(__name__)


def score_band(ctx: WorkerContext, run_id: int, band_index: int) -> str:
    """Score a band; returns "scored", "already done", "skipped" (failed run), "stale" (a
    changed frame sent the band back while it was scored: the score sent then scores it) or
    "no such band"."""
    with ctx.session() as session:
        run = session.get(Run, run_id)
        band = session.get(Band, (run_id, band_index))
        if run is None or band is None:
            # bands are recorded before their message is sent, so this one is from before a
            # database restore (which hands its run ids out again, to other rolls) or made by
            # hand: failing the run's roll for it failed a roll that had nothing to do with it
            log.warning("run %s has no band %s: a message from before a database restore? "
                        "dropped", run_id, band_index)  # fmt: skip
            return "no such band"
        if run.status == "failed":
            return "skipped"
        if band.status == "done":
            if finalize_due(run):  # a redelivery: the worker died before sending the finalize
                ctx.enqueue.finalize(run_id)
            return "already done"
        roll = session.get(Roll, run.roll_id)
        model = session.get(Model, run.model_version)
        arrays = roll_arrays(ctx, roll)
        rows, width = roll.rows_ingested, roll.width_px
        start, stop, generation = band.row_start, band.row_stop, band.generation
        tile, stride = run_tiling(ctx, session, run)
        read_start, read_stop = band_window(start, stop, rows, tile, stride)
        lock_bands(session, roll.id, arrays.bands_of_rows(read_start, read_stop), shared=True)
        pixels = arrays.read_rows(read_start, read_stop)
        roll_id, scales = roll.id, (roll.px_per_mm_x, roll.px_per_mm_y)
        fabric_type, channels = roll.fabric_type, roll.channels
    detector = ctx.detector(model)
    # before anything is written: a roll unlike the model's training tiles came out one
    # roll-wide defect, graded reject (a reprocess run fails alone, the roll keeps its results)
    if (misfit := input_misfit(detector.trained_input, channels, scales, pixels)) is not None:
        raise RollError(
            f"model {model.version} cannot score roll {roll_id}: {misfit}. Register and activate "
            f"a model of fabric type {fabric_type!r} trained on its rolls as they are scanned"
        )
    # the fabric's edges, measured block by block as the tile rows reaching them are laid out
    # on the fabric and cut (on the reader thread)
    fabric = WindowFabric(pixels, read_start)

    def tiles() -> Iterator[tuple[int, ...]]:
        if detector.tile_layout == "fabric":  # trained on tiles starting at the fabric's edge
            return fabric_band_tiles(start, stop, rows, width, tile, stride, fabric.span)
        return iter(band_tiles(start, stop, rows, width, tile, stride))

    margin = (tile - stride) // 2
    quarter, peak = band_scores(
        detector, pixels, read_start, tiles(), start, stop, width, tile, margin, rows, fabric
    )
    scored = sum(1 for _ in tiles())  # counted again: every block is measured by now
    partial = stop - start < arrays.band_height  # only the roll's last band can be short
    with ctx.session() as session:
        # rows locked in the order ingest takes them: the roll's (the extents' key), the band's,
        # the run's. The band's row is held while its map is written: a changed frame that
        # sends the band back waits for it, and one that came first has raised its generation.
        store_extents(session, roll_id, scales, fabric.extents(start, stop))
        band = session.get(Band, (run_id, band_index), with_for_update=True, populate_existing=True)
        stale, done_before = band.generation != generation, band.status == "done"
        if stale or done_before:
            session.rollback()  # nor its extents: stale, or already stored by that delivery
            if not stale:  # another delivery of it, on the same pixels, came first — and may
                # have died before it sent the finalize, which this one must send then
                if finalize_due(session.get(Run, run_id, populate_existing=True)):
                    ctx.enqueue.finalize(run_id)
                return "already done"
            log.info("run %s band %s: a frame it reads changed while it was scored; the score "
                     "sent after the change scores it", run_id, band_index)  # fmt: skip
            return "stale"
        arrays.write_band_scores(
            model.version, band_index, quarter, length=rows if partial else None
        )
        band.status, band.max_score, band.scored_at = "done", peak, datetime.now(UTC)
        band.attempts += 1
        done, total = session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(bands_done=Run.bands_done + 1)
            .returning(Run.bands_done, Run.bands_total)
        ).one()
        finalize = total is not None and done == total
    log.info("run %s band %s scored (%d tiles, max %.3f)", run_id, band_index, scored, peak)
    band_scored(scored)
    if finalize:
        ctx.enqueue.finalize(run_id)
    return "scored"
