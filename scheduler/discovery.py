"""Upload discovery: find new rolls and frames under the incoming prefix and enqueue their work.

Layout (DESIGN.md): ``<incoming>/<roll_id>/manifest.json`` and
``<incoming>/<roll_id>/frames/<seq>.tif[f]``, seq = 1, 2, … along the roll.

Why not one StartAfter cursor over the whole prefix. S3 lists keys in lexicographic order, but
uploads do not arrive in that order: frame 3 of roll A lands after roll B's keys were listed, a
scanner uploading in parallel finishes frame 5 before frame 4, and unpadded names sort "10.tif"
before "9.tif". A global (or per-roll) StartAfter key would step over all of these for good.
So discovery keeps its position in the *sequence* of each roll, not in the key order:

- Rolls: each pass lists the roll "directories" directly under the incoming prefix
  (``list_objects_v2`` with ``Delimiter='/'``: one request per 1000 rolls, never the frames).
- Open rolls (not done or failed yet) are listed whole, manifest and frames (one request per
  1000 frames; a line has a handful of rolls open at a time), so that a frame written again
  while its roll is ingested or scored is seen. Closed rolls cost no request beyond the
  directory listing: a frame replaced after its roll is done is taken by `rollscan resume`.
  An open folder in which a pass found nothing new for 5 minutes (a stalled roll, a refused
  manifest, frames waiting for their manifest, a folder that is no roll) is listed again after a
  quarter of the time it has been quiet, at most 10 minutes (`_due`, per scheduler process).
- A frame number that two objects give themselves (``2.tif`` and ``000002.tif``) is reported
  once, and neither is taken — the roll waits at that frame — until one of them is removed.
- Per roll, discovery keeps its position (`scheduler.roll_cursors`): the frames enqueued in
  order, the manifest versions registered or refused, the frames re-sent. Exactly once in the
  normal case, at least once around a crash, which ingest takes as a no-op.

A frame that appears before its manifest waits until a valid manifest registers the roll. A
corrupt or inconsistent manifest (bad JSON, failed validation, a roll id other than its folder,
a change to a registered roll's geometry) is logged and reported once per version; nothing of it
is written, other rolls go on. A manifest re-uploaded with ``complete: true`` updates the roll
(`register_roll`) and calls `roll_updated` (the last bands or the finalize).

Stalls (`scheduler.stalls`): a roll whose frames have not all arrived, idle for `stall_after`,
becomes 'stalled' with the reason; discovery resumes it when frames or a manifest arrive
again. One scheduler discovers at a time (a PostgreSQL advisory lock per pass).
`scheduler.loop.run_scheduler` backs off exponentially on a failed pass (S3, database or broker away), logs,
and resumes from the cursors.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from scheduler.roll_cursors import (
    RollCursor,
    closed_by_status,
    contiguous_frames,
    load_cursors,
    save_cursor,
)
from scheduler.stalls import DEFAULT_STALL_AFTER, mark_stalled, resume_if_stalled
from storage.database import advisory_lock, is_lock_timeout
from storage.manifest import (
    NAME_PATTERN,
    ManifestError,
    ManifestLimits,
    frame_seq,
    read_manifest,
)
from storage.objectstore import ObjectChanged, ObjectInfo, ObjectNotFound, ObjectStore
from storage.schema import Frame, Roll
from worker.context import LOCK_WAIT_LIMIT, WorkerContext
from worker.ingest import roll_updated
from worker.roll_rows import RollError, register_roll
from worker.transient_errors import is_transient_error

log = logging.getLogger(__name__)

ROLL_LOCK_WAIT_S = 10.0  # a roll's rows held longer than this by another session: next pass
LOCK_KEY = 0x726F6C6C7363616E  # "rollscan": the discovery pass's advisory lock
_NAME = re.compile(NAME_PATTERN)
_MAX_WARNED = 1024  # things warned about once; a flood of junk names must not grow it
_warned: dict[str, None] = {}  # folder names that are no roll id, warned about
_twice_said: dict[str, str] = {}  # roll → its frame numbers given twice, warned about
QUIET_AFTER_S = 300.0  # an open folder with nothing new this long is listed less often
MAX_QUIET_RELIST_S = 600.0
_quiet: dict[str, tuple[float, float]] = {}  # folder → (nothing new since, last listed), clock s
# roll → the frame it waits at while later ones are there: (that frame, how many later, the
# last of them, whether two objects give themselves its number), for a stalled roll's reason
_gaps: dict[str, tuple[int, int, int, bool]] = {}
SUMMARY_EVERY_S = 3600.0  # beyond the bound, one line an hour counts the names not warned about
_beyond = {"count": 0, "example": "", "said": -math.inf}


def _warn_once(key: str, message: str, *args: Any) -> bool:
    """Log a warning the first time the folder `key` is seen (per process, until it is no
    longer listed); whether it was logged. Beyond `_MAX_WARNED` folders a new one is counted,
    not logged nor kept, and `_say_beyond` sums them up: evicting the oldest made each pass over
    more names than are kept warn about every one of them again (1,100 junk folders: 1,100
    lines every 10 s)."""
    if key in _warned:
        return False
    if len(_warned) >= _MAX_WARNED:
        _beyond["count"] += 1
        _beyond["example"] = _beyond["example"] or (message % args)
        return False
    _warned[key] = None
    log.warning(message, *args)
    return True


def _say_beyond(clock: float) -> None:
    """At the end of a pass: the problems it met beyond the bound, in one line an hour."""
    if _beyond["count"] and clock - _beyond["said"] >= SUMMARY_EVERY_S:
        log.warning("%d more folder names this pass, not logged one by one (more than %d were), "
                    "e.g. %s", _beyond["count"], _MAX_WARNED, _beyond["example"])  # fmt: skip
        _beyond["said"] = clock
    _beyond.update(count=0, example="")


@dataclass
class DiscoveryReport:
    """What one discovery pass did: rolls registered, frames enqueued, rolls completed or marked
    stalled, and the problems met (false when it did nothing)."""

    new_rolls: list[str] = field(default_factory=list)
    frames_enqueued: list[tuple[str, int]] = field(default_factory=list)  # (roll, seq)
    completed: list[str] = field(default_factory=list)  # manifests that turned complete
    stalled: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # refused manifests, unexpected errors

    def __bool__(self) -> bool:
        return any(asdict(self).values())


def incoming_prefix(ctx: WorkerContext) -> str:
    prefix = ctx.settings.incoming_prefix.strip("/")
    if not prefix:
        raise ValueError(
            "the incoming prefix is empty: discovery would take every object for a roll"
        )
    return prefix + "/"


def discover_once(
    ctx: WorkerContext,
    now: datetime | None = None,
    *,
    stall_after: timedelta | None = DEFAULT_STALL_AFTER,
    clock: Callable[[], float] = time.monotonic,
) -> DiscoveryReport:
    """One pass: new rolls registered, new frames enqueued, complete manifests announced,
    stalled rolls marked (`stall_after` None: not). Transient errors propagate (the caller
    backs off); any other error is confined to its roll, logged and reported.

    One scheduler at a time: the pass holds a PostgreSQL advisory lock, and a second
    scheduler's pass is skipped (an empty report) rather than enqueueing the same frames."""
    with advisory_lock(ctx.engine, LOCK_KEY) as held:
        if not held:
            log.info("another scheduler is discovering: pass skipped")
            return DiscoveryReport()
        return _discover(ctx, now, stall_after, clock())


def _discover(
    ctx: WorkerContext, now: datetime | None, stall_after: timedelta | None, clock: float
) -> DiscoveryReport:
    report = DiscoveryReport()
    prefix = incoming_prefix(ctx)
    names = ctx.store.list_prefixes(prefix)
    with ctx.session() as session:
        cursors = load_cursors(session)
    for name in names:
        cursor = cursors.get(name)
        if cursor is not None and cursor.closed:
            continue
        if not _NAME.fullmatch(name):  # fullmatch: `$` alone lets a trailing newline in
            # ascii(): the name is the uploader's, and may hold a forged log line
            _warn_once(
                name, "%s%s/: not a roll id (%s); ignored", prefix, ascii(name), NAME_PATTERN
            )
            continue
        if not _due(name, clock):
            continue
        before = _activity(report)
        bounded = LOCK_WAIT_LIMIT.set(ROLL_LOCK_WAIT_S)
        try:
            _discover_roll(ctx, name, f"{prefix}{name}", cursor, report)
        except Exception as exc:
            if is_lock_timeout(exc):  # listed again next pass, not quiet
                log.warning("roll %s: another session has held its rows for over %g s (a "
                            "finalize of a long roll, a transaction left open): next pass",
                            name, ROLL_LOCK_WAIT_S)  # fmt: skip
                continue
            if is_transient_error(exc):
                raise
            log.exception("roll %s: discovery failed", name)
            report.problems.append(f"roll {name}: {type(exc).__name__}: {exc}")
        finally:
            LOCK_WAIT_LIMIT.reset(bounded)
        if _activity(report) != before:
            _quiet.pop(name, None)
        else:
            _quiet[name] = (_quiet.get(name, (clock, clock))[0], clock)
    listed = set(names)
    for memory in (_quiet, _warned, _twice_said, _gaps):  # a folder removed is forgotten
        for gone in memory.keys() - listed:
            del memory[gone]
    if stall_after is not None:
        with ctx.session() as session:
            report.stalled = mark_stalled(session, stall_after, now, gaps=_gaps)
    _say_beyond(clock)
    return report


def _activity(report: DiscoveryReport) -> tuple[int, ...]:
    return (len(report.new_rolls), len(report.frames_enqueued), len(report.completed),
            len(report.problems))  # fmt: skip


def _due(name: str, clock: float) -> bool:
    """Whether an open folder is listed this pass. One with nothing new for `QUIET_AFTER_S` —
    a stalled roll, a refused manifest, frames without a manifest, a folder that is no roll —
    is listed again after a quarter of that time, at most `MAX_QUIET_RELIST_S`: each was
    listed whole every pass, for ever (1,500 of them made a 10-second pass take 34 s)."""
    if name not in _quiet:
        return True
    since, listed = _quiet[name]
    idle = clock - since
    return idle < QUIET_AFTER_S or clock - listed >= min(MAX_QUIET_RELIST_S, idle / 4)


def _discover_roll(
    ctx: WorkerContext, name: str, prefix: str, cursor: RollCursor | None, report: DiscoveryReport
) -> None:
    saved = cursor.dump() if cursor is not None else None  # what the database holds

    def save(session: Session | None = None) -> None:
        nonlocal saved
        if cursor.dump() != saved:
            save_cursor(ctx, name, cursor, session)
            saved = cursor.dump()

    manifest_info, frames, twice = list_roll(ctx.store, prefix)
    if twice:  # one line a roll; !a: the keys are the uploader's (forged log lines)
        shown = "; ".join(f"{seq}: {keys!a}" for seq, keys in sorted(twice.items())[:10])
        message = (
            f"roll {name}: {len(twice)} frame number(s) given by several objects ({shown}"
            f"{' …' if len(twice) > 10 else ''}): none of them is taken until one is removed"
        )
        # said once per roll and set of numbers, beside the bound on junk names: a roll's own
        # problem is never left for the hourly count
        if _twice_said.get(name) != (said := str(sorted(twice))):
            _twice_said[name] = said
            log.warning("%s", message)
            report.problems.append(message)
    else:
        _twice_said.pop(name, None)
    if cursor is None:
        cursor = RollCursor()
        with ctx.session() as session:
            roll = session.get(Roll, name)
            if roll is not None:  # registered another way (`rollscan submit`)
                cursor.seq = contiguous_frames(
                    session.scalars(select(Frame.seq).where(Frame.roll_id == name))
                )
                cursor.closed = roll.status in ("done", "failed")
        if cursor.closed:
            save()
            return

    new_manifest = manifest_info is not None and manifest_info.etag not in (
        cursor.manifest,
        cursor.refused,
    )
    if new_manifest and _take_manifest(ctx, name, prefix, manifest_info, cursor, report):
        saved = cursor.dump()

    with ctx.session() as session:
        roll = session.get(Roll, name)
        if roll is None:  # no (valid) manifest yet: the frames wait
            save(session)
            return
        ingested = {
            seq: etag
            for seq, etag in session.execute(
                select(Frame.seq, Frame.etag).where(Frame.roll_id == name)
            )
        }
        total = roll.frames_total if roll.complete else None
        send = []
        while (seq := cursor.seq + len(send) + 1) in frames and (total is None or seq <= total):
            send.append((seq, frames[seq]))
        later = [k for k in frames if k > seq and (total is None or k <= total)]
        if later:
            _gaps[name] = (seq, len(later), max(later), seq in twice)
        else:
            _gaps.pop(name, None)
        # a re-sent version is awaited while it is still the one listed and not ingested yet; once
        # the object moved on (another version, or back to the one ingested) it is forgotten, so
        # that the version re-sent, uploaded again later, is sent again
        cursor.resent = {
            s: e for s, e in cursor.resent.items()
            if ingested.get(int(s)) != e and getattr(frames.get(int(s)), "etag", None) == e
        }  # fmt: skip
        changed = [
            (seq, info) for seq, info in sorted(frames.items())
            if seq <= cursor.seq and ingested.get(seq, info.etag) != info.etag
            and cursor.resent.get(str(seq)) != info.etag
        ]  # fmt: skip
        if send or changed:
            resume_if_stalled(session, roll)
        status = roll.status

    try:
        for seq, info in changed:
            ctx.enqueue.ingest(name, seq, info.key)
            cursor.resent[str(seq)] = info.etag
            report.frames_enqueued.append((name, seq))
            log.info("roll %s: frame %d was replaced (%s): ingest again", name, seq, info.key)
        for seq, info in send:
            ctx.enqueue.ingest(name, seq, info.key)
            cursor.seq = seq
            report.frames_enqueued.append((name, seq))
    finally:  # record whatever went out, even when the broker failed halfway
        cursor.closed = closed_by_status(cursor, status)
        save()
    extra = sorted(seq for seq in frames if total is not None and seq > total)
    if cursor.closed and extra:
        log.warning("roll %s: frames %s are beyond the manifest's %s; ignored", name, extra, total)

    if cursor.update:  # a complete manifest: announce the last bands or the finalize
        roll_updated(ctx, name)
        cursor.update = False
        cursor.closed = closed_by_status(cursor, status)
        save()


def list_roll(
    store: ObjectStore, prefix: str
) -> tuple[ObjectInfo | None, dict[int, ObjectInfo], dict[int, list[str]]]:
    """A roll's manifest, its frames by number and the numbers several objects give themselves
    ("2.tif" and "000002.tif": their keys), under `prefix` (no trailing '/'). A number named
    twice is left out of the frames: which object is the frame is not for key order to say."""
    manifest, named = None, {}
    for info in store.iter_objects(prefix + "/"):
        rest = info.key[len(prefix) + 1 :]
        if rest == "manifest.json":
            manifest = info
        elif rest.startswith("frames/") and (seq := frame_seq(rest[len("frames/") :])) is not None:
            named.setdefault(seq, []).append(info)
    frames = {seq: infos[0] for seq, infos in named.items() if len(infos) == 1}
    twice = {seq: [i.key for i in infos] for seq, infos in named.items() if len(infos) > 1}
    return manifest, frames, twice


def _take_manifest(
    ctx: WorkerContext, name: str, prefix: str, info: ObjectInfo, cursor: RollCursor,
    report: DiscoveryReport,
) -> bool:  # fmt: skip
    """Register (or update) the roll from its manifest, with the cursor in the same
    transaction; a manifest that cannot be used is reported and remembered by ETag.
    Returns whether the cursor was written."""
    try:
        # the version listed, refused from its size before a byte of it is read
        manifest = read_manifest(ctx.store, info, ManifestLimits.from_settings(ctx.settings), name)
        if manifest.roll_id != name:
            raise ManifestError([("roll_id", f"{manifest.roll_id!r} is not its folder's name {name!r}")], name)  # fmt: skip
        with ctx.session() as session:
            was_complete = session.scalar(select(Roll.complete).where(Roll.id == name))
            roll = register_roll(session, manifest, prefix)
            resume_if_stalled(session, roll)
            cursor.manifest, cursor.refused = info.etag, None
            cursor.update = cursor.update or manifest.complete
            save_cursor(ctx, name, cursor, session)
    except (ObjectNotFound, ObjectChanged):
        return False  # deleted or replaced between listing and reading: next pass
    except (ManifestError, RollError, IntegrityError, DataError) as exc:
        cursor.refused = info.etag
        save_cursor(ctx, name, cursor)
        reason = str(exc.orig if isinstance(exc, IntegrityError | DataError) else exc).strip()
        message = f"{info.key}: refused: {reason}"
        log.error("%s", message)
        report.problems.append(message)
        return True
    if was_complete is None:
        report.new_rolls.append(name)
        log.info("roll %s registered from %s", name, info.key)
    if manifest.complete and not was_complete:
        report.completed.append(name)
        log.info("roll %s: manifest complete (%d frames)", name, manifest.frames)
    return True
