"""Score one band: read its rows plus halo, tile, run the model in batches, max-stitch, store;
measure where the fabric lies across the band's rows and store that too.

A band is the unit of work: one task writes one band's score shard (¼ resolution, float16), so
no two writers ever share a shard. Scoring a band twice writes the same values and counts once.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import update

from storage.fabric_extents import store_extents
from storage.schema import Band, Model, Roll, Run
from worker.context import WorkerContext, lock_bands
from worker.fabric_mask import measure_band
from worker.ingest import finalize_due, roll_arrays, run_tiling
from worker.task_metrics import band_scored
from worker.tiling import BandStitcher, band_read_window, band_tiles, cut_tiles, downsample_max

log = logging.getLogger(__name__)
SCORE_SCALE = 4

# one reader thread per process: the next batch's tiles are cut while the model computes; one
# stitcher thread: the last batch's maps are merged while the model computes the next
_prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollscan-prefetch")
_stitch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollscan-stitch")


def band_map(
    detector, pixels: np.ndarray, window_row0: int, origins: list[tuple[int, int]],
    band_start: int, band_stop: int, width: int, tile: int, margin: int, roll_rows: int,
) -> np.ndarray:  # fmt: skip
    """Full-resolution map of a band: tiles scored in batches, each batch merged by maximum
    into the band map as it comes (one band map in memory, not every tile map as well).

    Cutting the next batch and merging the last one run beside the model (numpy releases the
    GIL), so the model waits for neither."""
    batch = detector.batch_size
    chunks = [origins[i : i + batch] for i in range(0, len(origins), batch)]
    stitcher = BandStitcher(band_start, band_stop, width, tile, margin=margin, roll_rows=roll_rows)
    future = _prefetch.submit(cut_tiles, pixels, window_row0, chunks[0], tile)
    merged = None
    for k, chunk in enumerate(chunks):
        tiles = future.result()
        if k + 1 < len(chunks):
            future = _prefetch.submit(cut_tiles, pixels, window_row0, chunks[k + 1], tile)
        maps = detector.predict(tiles).maps
        if merged is not None:
            merged.result()  # one merge at a time: the stitcher is not thread-safe
        merged = _stitch.submit(stitcher.add, maps, chunk)
    merged.result()
    return stitcher.result()


def score_band(ctx: WorkerContext, run_id: int, band_index: int) -> str:
    """Score a band; returns "scored", "already done" or "skipped" (failed run)."""
    with ctx.session() as session:
        run = session.get(Run, run_id)
        band = session.get(Band, (run_id, band_index))
        if run is None or band is None:
            raise ValueError(f"run {run_id} has no band {band_index}")
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
        start, stop = band.row_start, band.row_stop
        tile, stride = run_tiling(ctx, session, run)
        read_start, read_stop = band_read_window(start, stop, rows, tile, stride)
        lock_bands(session, roll.id, arrays.bands_of_rows(read_start, read_stop), shared=True)
        pixels = arrays.read_rows(read_start, read_stop)
        roll_id, scales = roll.id, (roll.px_per_mm_x, roll.px_per_mm_y)
    # the fabric's edges are measured beside the model (it needs only the pixels)
    extents = _stitch.submit(measure_band, pixels, read_start, start, stop)
    detector = ctx.detector(model)
    origins = band_tiles(start, stop, rows, width, tile, stride)
    margin = (tile - stride) // 2
    full = band_map(detector, pixels, read_start, origins, start, stop, width, tile, margin, rows)
    quarter = downsample_max(full, SCORE_SCALE)
    partial = stop - start < arrays.band_height  # only the roll's last band can be short
    arrays.write_band_scores(model.version, band_index, quarter, length=rows if partial else None)
    with ctx.session() as session:
        store_extents(session, roll_id, scales, extents.result())
        counted = session.execute(
            update(Band)
            .where(Band.run_id == run_id, Band.band_index == band_index, Band.status != "done")
            .values(status="done", max_score=float(full.max()), scored_at=datetime.now(UTC),
                    attempts=Band.attempts + 1)
            .returning(Band.band_index)
        ).first()  # fmt: skip
        finalize = False
        if counted is not None:
            done, total = session.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(bands_done=Run.bands_done + 1)
                .returning(Run.bands_done, Run.bands_total)
            ).one()
            finalize = total is not None and done == total
    log.info(
        "run %s band %s scored (%d tiles, max %.3f)", run_id, band_index, len(origins), full.max()
    )
    band_scored(len(origins))
    if finalize:
        ctx.enqueue.finalize(run_id)
    return "scored"
