"""Stalled rolls: a roll registered or ingesting whose frames have not all arrived, idle for
`stall_after`, becomes 'stalled' with the reason (`mark_stalled`); discovery resumes it when
frames or a manifest arrive again (`resume_if_stalled`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, literal, select, update
from sqlalchemy.orm import Session

from scheduler.roll_cursors import RollCursor
from storage.schema import DiscoveryCursor, Frame, Roll

log = logging.getLogger(__name__)

DEFAULT_STALL_AFTER = timedelta(minutes=30)
OPEN_STATUSES = ("registered", "ingesting")


def resume_if_stalled(session: Session, roll: Roll) -> None:
    """A stalled roll whose frames or manifest arrive again goes back to waiting for them."""
    if roll.status == "stalled":
        roll.status = "ingesting" if roll.rows_ingested else "registered"
        roll.failure_reason = None
        roll.updated_at = datetime.now(UTC)
        log.info("roll %s: frames arrive again, no longer stalled", roll.id)


def mark_stalled(
    session: Session,
    stall_after: timedelta,
    now: datetime | None = None,
    gaps: dict[str, tuple[int, int, int, bool]] | None = None,
) -> list[str]:
    """Rolls registered or ingesting whose frames have not all arrived, idle for `stall_after`
    → 'stalled', with the reason. Returns their ids. `gaps` (the listings': roll → the frame it
    waits at, how many later frames are there, the last of them, whether that frame's number
    is given twice) lets the reason name the frame an operator must upload.

    Idle: neither the roll row (frame ingested, manifest update) nor its discovery cursor
    (frame enqueued) changed since `now` − `stall_after` (`now` default: the database's clock).
    A complete roll whose frames were all enqueued is not waiting for the scanner: if its
    ingest lags, that is the workers' business (queue depth), not a stall."""
    now = now if now is not None else session.scalar(select(func.now()))
    frames_in = select(func.count()).select_from(Frame).where(Frame.roll_id == Roll.id)
    cursor = select(DiscoveryCursor).where(DiscoveryCursor.name == literal("roll:") + Roll.id)
    last = func.greatest(Roll.updated_at, cursor.with_only_columns(DiscoveryCursor.updated_at).scalar_subquery())  # fmt: skip
    rows = session.execute(
        select(Roll.id, last, frames_in.scalar_subquery(), Roll.frames_total, Roll.complete,
               cursor.with_only_columns(DiscoveryCursor.cursor).scalar_subquery())
        .where(Roll.status.in_(OPEN_STATUSES), last < now - stall_after)
        .with_for_update(of=Roll, skip_locked=True)
    ).all()  # fmt: skip
    stalled = []
    for roll_id, since, ingested, total, complete, text_ in rows:
        arrived = max(ingested, RollCursor.load(text_).seq)
        if complete and total is not None and arrived >= total:
            continue
        reason = (
            f"stalled: no new frame since {since.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC "
            f"(limit {stall_after}); {arrived}{f' of {total}' if total else ''} frames arrived "
            f"in order, {ingested} ingested" + ("" if complete else ", manifest not complete")
        )
        if (gap := (gaps or {}).get(roll_id)) is not None and gap[0] > arrived:
            at, count, last, twice = gap
            reason += (
                f"; frame {at} {'is given by two objects' if twice else 'is missing'}: "
                f"{count} later frame(s), up to {last}, wait for it"
            )
        session.execute(
            update(Roll)
            .where(Roll.id == roll_id, Roll.status.in_(OPEN_STATUSES))
            .values(status="stalled", failure_reason=reason, updated_at=func.now())
        )
        log.warning("roll %s %s", roll_id, reason)
        stalled.append(roll_id)
    return stalled
