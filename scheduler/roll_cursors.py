"""Discovery's position in each roll, kept in PostgreSQL (`discovery_cursors`).

Per roll, a row ``discovery_cursors.name = "roll:<roll_id>"`` holds, as JSON: ``seq`` = the
frames 1 … seq have been enqueued (in order; a frame after a gap waits for the gap, so a
worker never takes frame k before k − 1 was announced), ``manifest`` = ETag of the manifest
last registered, ``refused`` = ETag of a manifest refused (reported once per version),
``resent`` = frames re-uploaded with a new ETag and enqueued again, ``update`` = a complete
manifest whose `roll_updated` is still owed, ``closed``.

Exactly once in the normal case, at least once around a crash: the cursor is written after the
enqueue (of every frame that went out, even when a later one failed), so a crash between the
two repeats at most those frames, which ingest takes as a no-op (idempotent per roll, seq and
ETag). A restart with the same database repeats nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from storage.schema import DiscoveryCursor, Roll
from worker.context import WorkerContext


@dataclass
class RollCursor:
    """Discovery's position in one roll, stored as JSON (the fields: the module docstring)."""

    seq: int = 0
    manifest: str | None = None
    refused: str | None = None
    resent: dict[str, str] = field(default_factory=dict)
    update: bool = False
    closed: bool = False

    @classmethod
    def load(cls, text: str | None) -> RollCursor:
        return cls(**json.loads(text)) if text else cls()

    def dump(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)


def load_cursors(session: Session) -> dict[str, RollCursor]:
    """Every roll's cursor, by roll id."""
    rows = session.execute(
        select(DiscoveryCursor.name, DiscoveryCursor.cursor).where(DiscoveryCursor.name.like("roll:%"))
    )  # fmt: skip
    return {name.removeprefix("roll:"): RollCursor.load(value) for name, value in rows}


def save_cursor(
    ctx: WorkerContext, roll_id: str, cursor: RollCursor, session: Session | None = None
) -> None:
    """Write the roll's cursor, in `session`'s transaction or a new one."""
    if session is None:
        with ctx.session() as own:
            return save_cursor(ctx, roll_id, cursor, own)
    if cursor.closed:
        # closed by the roll's status now, under its lock, not as the pass read it: a roll
        # started again (`resume --retry`) while the pass sent its frames had been closed for
        # good, its later frames and manifest never seen (`reopen_discovery` had found nothing
        # to reopen yet)
        status = session.scalar(select(Roll.status).where(Roll.id == roll_id).with_for_update())
        cursor.closed = status in ("done", "failed")
    stmt = insert(DiscoveryCursor).values(name=f"roll:{roll_id}", cursor=cursor.dump())
    stmt = stmt.on_conflict_do_update(
        index_elements=[DiscoveryCursor.name],
        set_={"cursor": stmt.excluded.cursor, "updated_at": func.now()},
    )
    session.execute(stmt)


def closed_by_status(cursor: RollCursor, status: str) -> bool:
    """Whether discovery stops listing the roll: open until the roll is done or failed, not
    only until its last frame went out, so that a frame written again while the roll is
    ingested or scored is seen and ingested again."""
    return not cursor.update and status in ("done", "failed")


def contiguous_frames(seqs: Iterable[int]) -> int:
    """The k such that frames 1 … k are all in `seqs`."""
    present, k = set(seqs), 0
    while k + 1 in present:
        k += 1
    return k


def reopen_discovery(session: Session, roll_id: str) -> None:
    """List the roll again from its next pass on (a failed roll started again: discovery had
    closed it, and would never have seen its later frames or manifest)."""
    row = session.get(DiscoveryCursor, f"roll:{roll_id}", with_for_update=True)
    if row is not None:
        cursor = RollCursor.load(row.cursor)
        if cursor.closed:
            cursor.closed = False
            row.cursor = cursor.dump()


def record_enqueued(ctx: WorkerContext, roll_id: str, seq: int, manifest_etag: str | None) -> None:
    """Frames 1 … `seq` of the roll, registered from the manifest version `manifest_etag`, were
    enqueued by another way (`rollscan submit`): its cursor says so, so that discovery, which
    lists the same folder, does not send them again."""
    with ctx.session() as session:
        row = session.get(DiscoveryCursor, f"roll:{roll_id}", with_for_update=True)
        cursor = RollCursor.load(row.cursor if row is not None else None)
        cursor.seq = max(cursor.seq, seq)
        cursor.manifest = cursor.manifest or manifest_etag
        save_cursor(ctx, roll_id, cursor, session)
