"""Roll registration and the roll's live run: the rows PostgreSQL keeps for every roll."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import case, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from storage.manifest import Manifest
from storage.registry import active_fabric_spelt_like, active_model
from storage.schema import (
    OPEN_ROLL_STATUSES,
    OPEN_RUN_STATUSES,
    WAITING,
    Band,
    Frame,
    Roll,
    Run,
    current_run,
)


class RollError(ValueError):
    """A roll that cannot be taken as asked; the message says why."""


IMMUTABLE = ("fabric_type", "width_mm", "px_per_mm_x", "px_per_mm_y")


def register_roll(session: Session, manifest: Manifest, source: str) -> Roll:
    """Insert or update a roll from its manifest (idempotent).

    A re-sent manifest may add the frame count, turn `complete` on and change `meta`; it may
    not change the roll's fabric type or geometry (that would be a different roll), nor the
    frame count of a roll already complete.
    """
    values = {
        "id": manifest.roll_id,
        "fabric_type": manifest.fabric_type,
        "width_mm": manifest.width_mm,
        "px_per_mm_x": manifest.px_per_mm_x,
        "px_per_mm_y": manifest.px_per_mm_y,
        "frames_total": manifest.frames,
        "complete": manifest.complete,
        "meta": manifest.meta,
        "source": source,
    }
    existing = session.get(Roll, manifest.roll_id, with_for_update=True)
    if existing is None:
        session.execute(insert(Roll).values(**values).on_conflict_do_nothing())
        session.flush()
        existing = session.get(Roll, manifest.roll_id, with_for_update=True, populate_existing=True)
    refuse_changes(session, existing, manifest)
    existing.frames_total = (
        manifest.frames if manifest.frames is not None else existing.frames_total
    )
    existing.complete = manifest.complete
    existing.meta = manifest.meta
    existing.source = source
    existing.updated_at = datetime.now(UTC)
    session.flush()
    return existing


def check_registrable(session: Session, manifest: Manifest) -> None:
    """Raise RollError where `register_roll` would refuse the manifest, writing nothing: a
    folder's frames are checked so before they are uploaded over a registered roll's."""
    existing = session.get(Roll, manifest.roll_id)
    if existing is not None:
        refuse_changes(session, existing, manifest)


def refuse_changes(session: Session, existing: Roll, manifest: Manifest) -> None:
    """Raise RollError if `manifest` changes what the registered roll `existing` cannot."""
    changed = [k for k in IMMUTABLE if getattr(existing, k) != getattr(manifest, k)]
    if changed:
        raise RollError(
            f"roll {manifest.roll_id}: the manifest changes {', '.join(changed)}, which a "
            "registered roll cannot change"
        )
    if existing.complete and not manifest.complete:
        raise RollError(f"roll {manifest.roll_id} is already complete; a manifest cannot reopen it")
    if existing.complete and manifest.frames not in (None, existing.frames_total):
        # its run's band count was fixed from that frame count once the frames were in
        raise RollError(
            f"roll {manifest.roll_id} is already complete with {existing.frames_total} frames; "
            f"a manifest cannot change that to {manifest.frames}"
        )
    if manifest.complete and manifest.frames is not None:  # the count is final
        last = session.scalar(select(func.max(Frame.seq)).where(Frame.roll_id == manifest.roll_id))
        if last is not None and last > manifest.frames:
            raise RollError(
                f"roll {manifest.roll_id}: the manifest says {manifest.frames} frames, but frame "
                f"{last} is already in"
            )


def live_run(session: Session, roll: Roll) -> Run:
    """The roll's live run with the fabric's active model (created once, idempotently)."""
    run = session.scalar(select(Run).where(Run.roll_id == roll.id, Run.purpose == "live"))
    if run is not None:
        return run
    if (near := active_fabric_spelt_like(session, roll.fabric_type)) is not None:
        raise RollError(
            f"fabric type {roll.fabric_type!r} has no active model, but {near!r} has: the same "
            "fabric in other case? Fix the scanner's manifest (or register a model for "
            f"{roll.fabric_type!r}); the generic model is not used for it"
        )
    model = active_model(session, roll.fabric_type)
    if model is None:
        raise RollError(
            f"no active model for fabric type {roll.fabric_type!r} and no active generic model: "
            "register and activate one (`rollscan models register … --activate`)"
        )
    session.execute(
        insert(Run)
        .values(roll_id=roll.id, model_version=model.version, purpose="live")
        .on_conflict_do_nothing()
    )
    session.flush()
    return session.scalar(
        select(Run).where(Run.roll_id == roll.id, Run.model_version == model.version)
    )


def fail_roll(session: Session, roll_id: str, reason: str) -> None:
    """Mark a roll failed with its reason; its runs stop (a current one that stops gives the
    roll to the done run asked for last, if any). Other rolls are not affected.

    A roll already failed keeps its first reason: in-process (no broker) a band is scored
    inside the ingest of the frame that completed it, and that frame's failure, the same error
    passing through, named the frame instead of the band."""
    now = datetime.now(UTC)
    first = case((Roll.status == "failed", Roll.failure_reason), else_=reason[:2000])
    session.execute(
        update(Roll)
        .where(Roll.id == roll_id)
        .values(status="failed", failure_reason=first, updated_at=now)
    )
    session.execute(
        update(Run)
        .where(Run.roll_id == roll_id, Run.status.in_(OPEN_RUN_STATUSES))
        .values(status="failed", error=reason[:2000], finished_at=now)
    )
    replace_failed_current(session, roll_id)  # the views keep a finished run's defects


def note_waiting(session: Session, roll_id: str, run: Run | None, reason: str) -> None:
    """Say why the work of `roll_id` stopped while the roll itself is still open (a task out of
    its transient retries: an outage longer than its back-off): in `rolls.failure_reason`, or
    for a reprocess run in `runs.error`, prefixed "waiting: ". The status stays, and so does
    the roll's `updated_at` (the idle clock of the scheduler's auto-resume); a roll failed,
    done or stalled keeps its own reason."""
    text = (WAITING + reason)[:2000]
    if run is not None and run.purpose == "reprocess":
        session.execute(
            update(Run)
            .where(Run.id == run.id, Run.status.in_(OPEN_RUN_STATUSES))
            .values(error=text)
        )
        return
    session.execute(
        update(Roll)
        .where(Roll.id == roll_id, Roll.status.in_(OPEN_ROLL_STATUSES))
        .values(failure_reason=text, updated_at=Roll.updated_at)
    )


def clear_waiting(session: Session, roll_id: str) -> None:
    """Forget the "waiting:" reasons of `roll_id` and its open runs (`note_waiting`): its work
    was sent again, or it finished."""
    session.execute(
        update(Roll)
        .where(Roll.id == roll_id, Roll.failure_reason.startswith(WAITING, autoescape=True))
        .values(failure_reason=None, updated_at=Roll.updated_at)
    )
    session.execute(
        update(Run)
        .where(
            Run.roll_id == roll_id,
            Run.status.in_(OPEN_RUN_STATUSES),
            Run.error.startswith(WAITING, autoescape=True),
        )
        .values(error=None)
    )


def reopen_failed_run(session: Session, run: Run, status: str) -> None:
    """Start the failed `run` again as `status`, the bands it scored kept, its failed ones
    pending again. One never finalized finishes for the first time when it does (a live run's
    finalize then dates the roll's completion); whether it becomes current is decided by when
    it was asked for (`asked_last`), which a caller asking for it again moves."""
    run.status, run.error = status, None
    if run.threshold is None and not run.is_current:  # `finalize` records the threshold
        run.finished_at = None
    session.execute(
        update(Band).where(Band.run_id == run.id, Band.status == "failed").values(status="pending")
    )


def make_current(session: Session, run: Run) -> None:
    """Make `run` its roll's current run (the views show its defects and grade)."""
    session.execute(
        update(Run)
        .where(Run.roll_id == run.roll_id, Run.id != run.id, Run.is_current)
        .values(is_current=False)
    )
    session.flush()  # one current run per roll (a unique index): the old one steps down first
    run.is_current = True


def asked_last(session: Session, run: Run) -> bool:
    """Whether the finished `run` is to be its roll's current one: it was asked for after the
    current one (`Run.requested_at`: made, or asked for again by `rollscan reprocess`), or the
    current one failed (a reprocess run reopened by a changed frame whose band was given up: its
    defects read the old pixels) or there is none. So a live run finalized again after a changed
    frame does not take the roll back from the newer model that reprocessed it, nor an older
    model's reprocess finishing late from a newer one's."""
    current = session.scalar(
        select(Run).where(
            Run.roll_id == run.roll_id, Run.id != run.id, Run.is_current, Run.status != "failed"
        )
    )
    return current is None or (current.requested_at, current.id) < (run.requested_at, run.id)


def replace_failed_current(session: Session, roll_id: str) -> Run | None:
    """When the roll's current run has failed, the done run asked for last takes its place (a
    failed run's defects may read pixels since replaced); that run, or None."""
    current = current_run(session, roll_id)
    if current is None or current.status != "failed":
        return None
    successor = session.scalar(
        select(Run)
        .where(Run.roll_id == roll_id, Run.id != current.id, Run.status == "done")
        .order_by(Run.requested_at.desc(), Run.id.desc())
        .limit(1)
    )
    if successor is not None:
        make_current(session, successor)
    return successor
