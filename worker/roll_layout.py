"""A roll's zarr arrays as the pipeline opens them, and the grids its rows are read on: the
widths its first frame may have, the tile size and stride of a run."""

from __future__ import annotations

import math

from sqlalchemy.orm import Session

from storage.objectstore import ObjectNotFound
from storage.schema import Model, Roll, Run
from storage.settings import Settings
from storage.zarr_rolls import RollArrays, create_roll, open_roll, roll_exists, roll_prefix
from worker.context import WorkerContext
from worker.roll_rows import RollError


def roll_arrays(ctx: WorkerContext, roll: Roll) -> RollArrays:
    """The roll's arrays, created with its first frame. RollError when rows are recorded as
    ingested and the image is gone: a store restored from a snapshot older than the database
    was given a new, empty image, and its bands scored zeros into wrong defects, silently. (A
    group whose own metadata alone is missing is written again, its image kept.)"""
    if roll_exists(ctx.store, roll.id):
        try:
            return open_roll(ctx.store, roll.id)
        except ObjectNotFound:  # a group without its image: a creation killed half-way,
            pass  # which create_roll completes
    if roll.rows_ingested and not ctx.store.exists(f"{roll_prefix(roll.id)}/image/zarr.json"):
        raise RollError(
            f"roll {roll.id}: its image ({roll_prefix(roll.id)}) is not in the object store, "
            f"though {roll.rows_ingested} rows of it were ingested: the store was restored from "
            "a snapshot older than the database, or the roll was deleted from it (see 'Back up "
            "and restore' in docs/deployment.md)"
        )
    return create_roll(
        ctx.store,
        roll.id,
        width=roll.width_px,
        channels=roll.channels,
        band_height=ctx.settings.band_height,
        # the scanner's free-form meta in a key of its own: it cannot replace the roll's id
        # or fabric type in the group's attributes
        manifest={"roll_id": roll.id, "fabric_type": roll.fabric_type, "meta": roll.meta or {}},
        exist_ok=True,
    )


def frame_width_range(settings: Settings, roll: Roll) -> tuple[int, int]:
    """The widths (px, inclusive) a roll's first frame may have: the manifest's width_mm ×
    px_per_mm.x within the tolerance (the camera may see a little beside the fabric), and
    never more than `max_frame_width`. Later frames must match the first exactly."""
    expected = roll.width_mm * roll.px_per_mm_x
    tolerance = settings.frame_width_tolerance
    low = max(1, math.floor(expected * (1 - tolerance)))
    return low, min(settings.max_frame_width, math.ceil(expected * (1 + tolerance)))


def run_tiling(ctx: WorkerContext, session: Session, run: Run) -> tuple[int, int]:
    """(tile, stride) of a run: the model's own tile size, which its threshold was calibrated at,
    and the stride the run fixed (`fix_run_stride`), else this worker's overlap.

    The student's attention normalises over the tile's width, so a model's scores are only
    comparable to its threshold at the tile size it was trained on.
    """
    tile = session.get(Model, run.model_version).tile
    if run.stride is not None:
        return tile, run.stride
    return tile, tile - min(ctx.settings.overlap, tile // 2)


def fix_run_stride(ctx: WorkerContext, session: Session, run: Run) -> None:
    """Fix the run's stride from this worker's overlap unless it has one: every band of the run
    is then scored on one tile grid, whichever worker takes it (workers set up apart mixed
    grids within a run). Called with the run's row locked, before its first bands exist."""
    if run.stride is None:
        run.stride = run_tiling(ctx, session, run)[1]
