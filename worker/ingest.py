"""Ingest: one scanner frame (TIFF in the object store) → rows of the roll's zarr image.

Idempotent per (roll, frame seq, ETag): the same object again is a no-op; a changed object is
re-ingested and the bands it touches are scored again. Frames are numbered 1, 2, … along the
roll; frame k's rows start where frame k − 1's end, so frame k waits for frame k − 1.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from storage.objectstore import (
    InvalidKeyError,
    ObjectChanged,
    ObjectNotFound,
    version_as_file,
)
from storage.schema import Band, Frame, Roll, Run
from storage.zarr_rolls import RollArrays
from worker.changed_frames import bands_reading, hold_bands, runs_of_pixels, send_bands_back
from worker.context import RetryLater, WorkerContext, lock_bands
from worker.fabric_mask import block_reach
from worker.frames import FrameError, decode_frame_with_header, max_frame_bytes
from worker.roll_layout import fix_run_stride, frame_width_range, roll_arrays, run_tiling
from worker.roll_rows import RollError, fail_roll, live_run
from worker.tiling import band_ready

log = logging.getLogger(__name__)


def locked_live_run(session: Session, roll: Roll) -> Run:
    """The roll's live run, its row locked until the transaction ends and read afresh.

    Scoring counts a band with ``bands_done = bands_done + 1 RETURNING`` and sends the finalize
    when that reaches `bands_total`. Ingest sets `bands_total` (and takes bands back): holding
    the row makes a concurrent count wait and then see the total, and makes the counters
    read here current, so exactly one of the two sees "every band done"."""
    run = live_run(session, roll)
    session.refresh(run, with_for_update=True)
    return run


def fully_ingested(session: Session, roll: Roll) -> bool:
    """The manifest says complete and every one of its frames is in."""
    if not roll.complete or roll.frames_total is None:
        return False
    count = session.scalar(select(func.count()).select_from(Frame).where(Frame.roll_id == roll.id))
    return count >= roll.frames_total


def advance_run(
    ctx: WorkerContext, session: Session, roll: Roll, run: Run, arrays: RollArrays | None = None
) -> list[int]:
    """Record the bands that are ready to score and not yet recorded; return them.

    Also fixes the run's band count once the whole roll is in. Called after every frame (with
    the roll's `arrays`, open already) and when a manifest turns complete.
    """
    if run.status in ("done", "failed"):
        return []
    if arrays is None and roll.rows_ingested:
        arrays = roll_arrays(ctx, roll)
    # the roll's own bands (its zarr shards'), whatever ROLLSCAN_BAND_HEIGHT says since
    height = ctx.settings.band_height if arrays is None else arrays.band_height
    fix_run_stride(ctx, session, run)
    tile, stride = run_tiling(ctx, session, run)
    rows, complete = roll.rows_ingested, fully_ingested(session, roll)
    if complete and rows == 0:
        fail_roll(session, roll.id, "the roll is complete but has no rows")
        return []
    last_band = -(-rows // height) - 1
    known = set(session.scalars(select(Band.band_index).where(Band.run_id == run.id)))
    # a band also waits for the whole blocks of rows its tiles reach into: their fabric masks
    # are measured on whole blocks (`worker.fabric_mask.block_window`), which a tile not a
    # multiple of 256 px would otherwise let it read cut short
    reach = block_reach(tile)
    ready = [
        b
        for b in range(last_band + 1)
        if b not in known and band_ready(b, height, rows, complete, reach, stride)
    ]
    if ready:
        values = [
            {"run_id": run.id, "band_index": b, "row_start": b * height,
             "row_stop": min((b + 1) * height, rows)}
            for b in ready
        ]  # fmt: skip
        inserted = session.scalars(
            insert(Band).values(values).on_conflict_do_nothing().returning(Band.band_index)
        )
        ready = sorted(inserted)
    if complete and run.bands_total is None:
        run.bands_total = last_band + 1
    if run.status == "pending" and (ready or known):
        run.status = "scoring"
    return ready


def finalize_due(run: Run) -> bool:
    """Every band is scored but the run is not finalized: its finalize must be sent (again).

    A worker may die, or lose its broker, between committing a step and sending the next
    one; the step's redelivery then finds its work done and must send the next step itself."""
    return (
        run.status not in ("done", "failed")
        and run.bands_total is not None
        and run.bands_done == run.bands_total
    )


def _enqueue_next(
    ctx: WorkerContext, run_id: int, reprocess: bool, bands: list[int], finalize: bool
) -> None:
    for band in bands:
        ctx.enqueue.score(run_id, band, reprocess=reprocess)
    if finalize and not bands:
        ctx.enqueue.finalize(run_id)


def ingest_frame(ctx: WorkerContext, roll_id: str, seq: int, key: str) -> str:
    """Ingest one frame; returns "ingested", "unchanged", "skipped" or "failed".

    A roll that cannot go on (a bad frame, no model for its fabric) is marked failed with the
    reason, and "failed" is returned: the task succeeds, and other rolls go on.
    """
    try:
        return _ingest_frame(ctx, roll_id, seq, key)
    except RollError as exc:
        with ctx.session() as session:
            fail_roll(session, roll_id, str(exc))
        log.warning("roll %s failed: %s", roll_id, exc)
        return "failed"


def _etag_now(ctx: WorkerContext, key: str) -> str | None:
    try:
        return ctx.store.head(key).etag
    except ObjectNotFound:
        return None


def _past_the_end(roll: Roll, seq: int) -> bool:
    """A frame a complete manifest's count leaves out (queued before the manifest said how many
    there are): not part of the roll — its band would lie past the run's band count. (An open
    roll's count may still grow.)"""
    if not roll.complete or roll.frames_total is None or seq <= roll.frames_total:
        return False
    log.warning("roll %s: frame %d skipped, past the manifest's %d frames", roll.id, seq,
                roll.frames_total)  # fmt: skip
    return True


def _roll_failed(ctx: WorkerContext, roll_id: str, reason: str) -> str:
    with ctx.session() as session:
        fail_roll(session, roll_id, reason)
    log.warning("roll %s failed: %s", roll_id, reason)
    return "failed"


def _frame_failed(
    ctx: WorkerContext, roll_id: str, seq: int, key: str, etag: str | None, reason: str
) -> str:
    """Fail the roll for frame `seq`'s version `etag` (None: no object) — unless that version is
    no longer the one there, or the frame is no longer the roll's. A delivery still reading a
    version since replaced (a slow decode, a late copy beside `resume --retry`) failed the roll
    the good version had meanwhile finished; a stray frame past a complete manifest's count,
    deleted by the scanner, failed it too."""
    with ctx.session() as session:
        roll = session.get(Roll, roll_id, with_for_update=True)  # as the ingest that commits
        if roll is not None and (roll.status == "failed" or _past_the_end(roll, seq)):
            return "skipped"
        if etag is None and session.get(Frame, (roll_id, seq)) is not None:
            # a late copy of the message: the frame is in, its object since cleaned away
            log.info("roll %s frame %d: %s is gone; the frame was ingested", roll_id, seq, key)
            return "unchanged"
        if _etag_now(ctx, key) != etag:
            raise RetryLater(f"roll {roll_id} frame {seq}: {key} changed while it was checked")
        fail_roll(session, roll_id, reason)
    log.warning("roll %s failed: %s", roll_id, reason)
    return "failed"


def _ingest_frame(ctx: WorkerContext, roll_id: str, seq: int, key: str) -> str:
    if seq < 1:
        raise ValueError(f"frame numbers start at 1, not {seq}")
    try:
        info = ctx.store.head(key)
    except ObjectNotFound:
        return _frame_failed(ctx, roll_id, seq, key, None, f"frame {seq}: object {key} not found")
    except InvalidKeyError as exc:
        return _roll_failed(ctx, roll_id, f"frame {seq}: {exc}")
    limit = max_frame_bytes(ctx.settings.max_frame_pixels)
    if info.size > limit:  # refused before a byte of it is read
        reason = (
            f"frame {seq} ({key}): the object has {info.size} bytes, more than any frame "
            f"within ROLLSCAN_MAX_FRAME_PIXELS={ctx.settings.max_frame_pixels} can have "
            f"({limit}); not read"
        )
        return _frame_failed(ctx, roll_id, seq, key, info.etag, reason)
    with ctx.session() as session:
        roll = session.get(Roll, roll_id)
        if roll is None:
            raise ValueError(f"unknown roll {roll_id!r}: register its manifest first")
        if roll.status == "failed" or _past_the_end(roll, seq):
            return "skipped"
        previous = session.get(Frame, (roll_id, seq))
        if previous is not None and previous.etag == info.etag:
            # a redelivery: the frame is in; make sure the bands it completed, or sent back in
            # any run, were announced — those beside its rows only: every band waiting in the
            # queue, sent again by each copy, grew the queue by frames × bands
            live_run(session, roll)
            rows = (previous.row_start, previous.row_start + previous.rows)
            pending = [
                (run.id, run.purpose == "reprocess",
                 pending_bands(session, run.id, rows, block_reach(run_tiling(ctx, session, run)[0])),
                 finalize_due(run))
                for run in runs_of_pixels(session, roll.id) if run.status != "failed"
            ]  # fmt: skip
        else:
            pending = None
            if seq == 1:
                row_start = 0
            else:
                before = session.get(Frame, (roll_id, seq - 1))
                if before is None:
                    raise RetryLater(f"roll {roll_id}: frame {seq - 1} is not in yet")
                row_start = before.row_start + before.rows
            expect_width, expect_channels, bits = roll.width_px, roll.channels, roll.bits_per_sample
            widths = frame_width_range(ctx.settings, roll) if expect_width is None else None
            expected_px = roll.width_mm * roll.px_per_mm_x
    if pending is not None:
        for step in pending:
            _enqueue_next(ctx, *step)
        return "unchanged"

    try:
        with version_as_file(ctx.store, info) as source:
            pixels, header = decode_frame_with_header(
                source,
                max_pixels=ctx.settings.max_frame_pixels,
                expect_width=expect_width,
                expect_channels=expect_channels,
                expect_bits=bits,
                width_range=widths,
            )
    except ObjectChanged as exc:  # re-uploaded while read: take the new one from its head
        raise RetryLater(f"roll {roll_id} frame {seq}: {exc}") from None
    except FrameError as exc:
        reason = f"frame {seq} ({key}): {exc}"
        if widths is not None and "px wide" in str(exc):
            reason += (
                f" (the manifest's width_mm × px_per_mm.x is {expected_px:.0f} px, ± "
                f"{ctx.settings.frame_width_tolerance:.0%}; at most ROLLSCAN_MAX_FRAME_WIDTH "
                f"= {ctx.settings.max_frame_width})"
            )
        return _frame_failed(ctx, roll_id, seq, key, info.etag, reason)
    if seq == 1 and bits is None and header.bits == 16 and int(pixels.max(initial=0)) < 16:
        # 16-bit samples that never exceed 4095: a 12-bit camera's data in 16-bit samples, which
        # the fixed `>> 8` turns into 16 grey levels — every roll of such a line came out one
        # roll-long defect, graded reject, without a word. (A roll begun before the depth was
        # kept is not judged by a later frame, which may be a dark tail.)
        reason = (
            f"frame {seq} ({key}): its 16-bit samples never exceed 4095, which leaves 16 grey "
            "levels of 256: 12-bit data in 16-bit samples? Scale it to the full 16-bit range (or "
            "send 8-bit frames) at the scanner. (A first frame all but black — a dark leader — "
            "reads the same: start the scan on the fabric)"
        )
        return _frame_failed(ctx, roll_id, seq, key, info.etag, reason)

    with ctx.session() as session:
        roll = session.get(Roll, roll_id, with_for_update=True)  # one frame of a roll at a time
        if roll.status == "failed" or _past_the_end(roll, seq):  # a manifest may have come in
            return "skipped"
        # read again under the lock: another upload of this frame may have come in meanwhile
        previous = session.get(Frame, (roll_id, seq), populate_existing=True)
        if previous is not None and previous.etag == info.etag:
            return "unchanged"  # that delivery wrote these pixels and announced their bands
        if _etag_now(ctx, key) != info.etag:
            # replaced again while it was read: a later delivery ingests the newer version, and
            # this one, committed after it, would have written older pixels over newer
            raise RetryLater(f"roll {roll_id} frame {seq}: {key} was replaced while it was read")
        if previous is not None and previous.rows != pixels.shape[0]:
            fail_roll(
                session,
                roll_id,
                f"frame {seq} was replaced by one of {pixels.shape[0]} rows "
                f"instead of {previous.rows}: every later frame would move",
            )
            return "failed"
        if expect_width is None and roll.width_px is not None:
            # another delivery of frame 1 came in meanwhile: this one was decoded without the
            # roll's geometry, which the retry checks (a frame of another width fails the roll)
            raise RetryLater(f"roll {roll_id}: its first frame came in while frame {seq} was read")
        if roll.width_px is None:
            roll.width_px, roll.channels = pixels.shape[1], pixels.shape[2]
        if roll.bits_per_sample is None:  # also a roll begun before the depth was kept
            roll.bits_per_sample = header.bits
        arrays = roll_arrays(ctx, roll)
        stop = row_start + pixels.shape[0]
        if stop > arrays.capacity_rows:
            fail_roll(
                session,
                roll_id,
                f"frame {seq} would end at row {stop}, past the {arrays.capacity_rows} rows a "
                f"roll's image holds ({arrays.capacity_rows / roll.px_per_mm_y / 1000:.1f} m at "
                f"this roll's px_per_mm.y = {roll.px_per_mm_y:g}): split the roll",
            )
            return "failed"
        lock_bands(session, roll_id, arrays.bands_of_rows(row_start, stop), shared=False)
        arrays.write_rows(row_start, pixels)
        session.execute(
            insert(Frame)
            .values(roll_id=roll_id, seq=seq, key=key, etag=info.etag, row_start=row_start,
                    rows=pixels.shape[0])
            .on_conflict_do_update(
                index_elements=[Frame.roll_id, Frame.seq],
                set_={"etag": info.etag, "key": key, "ingested_at": datetime.now(UTC)},
            )
        )  # fmt: skip
        roll.rows_ingested = max(roll.rows_ingested, stop)
        if roll.status == "registered":
            roll.status = "ingesting"
        roll.updated_at = datetime.now(UTC)
        again: dict[int, tuple[bool, list[int]]] = {}
        if previous is not None:
            # a changed frame: in every run of the roll — the live one and those of the models
            # that reprocessed it — each band reading its rows is scored again
            live_run(session, roll)
            for other in runs_of_pixels(session, roll.id):
                rescore = bands_reading(
                    arrays, roll.rows_ingested, row_start, stop, *run_tiling(ctx, session, other)
                )
                hold_bands(session, other.id, rescore)  # before the run's row, as a scorer does
                session.refresh(other, with_for_update=True)
                sent_back = send_bands_back(session, other.id, rescore)
                # a failed run's are scored when it is started again (`scheduler.reprocess`)
                again[other.id] = (
                    other.purpose == "reprocess",
                    sent_back if other.status != "failed" else [],
                )
        run = locked_live_run(session, roll)
        session.flush()
        _, sent_back = again.get(run.id, (False, []))
        again[run.id] = (False, sorted({*advance_run(ctx, session, roll, run, arrays), *sent_back}))
    for run_id, (reprocess, bands) in again.items():
        _enqueue_next(ctx, run_id, reprocess, bands, finalize=False)
    return "ingested"


def pending_bands(
    session: Session, run_id: int, beside: tuple[int, int] | None = None, reach: int = 0
) -> list[int]:
    """The run's bands recorded and not scored, in order; with `beside` (rows [start, stop)),
    only those within a band's height, or `reach` (how far a band's scoring reads past its
    ends: `block_reach` of the model's tile), of those rows: the bands whose readiness, or
    whose tiles, those rows can have changed."""
    query = select(Band.band_index, Band.row_start, Band.row_stop).where(
        Band.run_id == run_id, Band.status == "pending"
    )
    bands = session.execute(query.order_by(Band.band_index)).all()
    if beside is None:
        return [band for band, _, _ in bands]
    height = max([reach, *(stop - start for _, start, stop in bands)])
    start, stop = beside
    return [band for band, b0, b1 in bands if b0 < stop + height and b1 > start - height]


def roll_updated(ctx: WorkerContext, roll_id: str) -> list[int]:
    """After a manifest update (e.g. `complete`): announce the bands that became ready."""
    return announce_live_run(ctx, roll_id)[1]


def announce_live_run(ctx: WorkerContext, roll_id: str) -> tuple[int | None, list[int], bool]:
    """Send the live run's bands that are ready and not scored, or its finalize when due (the
    run made first if it is not yet); returns (run id, bands sent, finalize sent). A failed roll
    sends nothing; a roll whose run cannot be made (no active model) fails."""
    with ctx.session() as session:
        roll = session.get(Roll, roll_id, with_for_update=True)
        if roll is None or roll.status == "failed":
            return None, [], False
        try:
            run = locked_live_run(session, roll)
        except RollError as exc:
            fail_roll(session, roll_id, str(exc))
            return None, [], False
        ready = advance_run(ctx, session, roll, run)
        # and those recorded before and not scored: the announcement of an update whose sending
        # failed (a broker away) is made again when the update is taken again
        ready = sorted(set(ready) | set(pending_bands(session, run.id)))
        finalize, run_id = finalize_due(run), run.id
    _enqueue_next(ctx, run_id, False, ready, finalize)
    return run_id, ready, finalize
