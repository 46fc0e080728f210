"""Reprocess finished rolls with another model version, from their stored zarr images.

Per roll: a run with purpose 'reprocess' (one per roll and model version, UNIQUE in the
database) whose bands are all recorded at once — the roll is complete — and scored by the usual
`score_band` tasks, sent to the `reprocess` queue so that live rolls never wait behind an
archive. The usual `finalize_run` makes the run current once every band is scored: until then
the views show the previous run's defects and grade. The driver then grades the new run.

Resumable: nothing here is kept in memory that PostgreSQL does not also hold. Run again, the
selection skips rolls whose current run is a finished run of the model, `start_reprocess_run`
returns only the bands of a started run that are not scored yet, and a run finalized but left
ungraded by a stopped driver is graded first.

The run asked for last is current once done (`Run.requested_at`, `worker.roll_rows.asked_last`):
a command asks for its model when it starts, for all its rolls, and moves each run's request
forward to then, so an older model's reprocess finishing late never takes a roll from a newer
one's (nor does its driver, reaching a roll after a later command for another model finished
it), a failed run asked for again takes the roll when it finishes, and a model whose run is
done but no longer current (an earlier model, to go back to) takes the roll back at once,
without scoring it again. A command run again is asked again.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO

from sqlalchemy import exists, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from distill.progress import progress_bar
from results.grade_store import RUN_GRADED, grade_run
from results.grading_rules import RuleBook
from storage.schema import OPEN_RUN_STATUSES, WAITING, Band, Model, Roll, Run, current_run
from storage.zarr_rolls import open_roll, roll_exists
from worker.context import WorkerContext
from worker.roll_layout import fix_run_stride
from worker.roll_rows import asked_last, make_current, reopen_failed_run

log = logging.getLogger(__name__)
STALL_S = 600.0  # no band scored for this long: say what to check


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.astimezone()  # naive: local time


def select_rolls(
    session: Session,
    *,
    model_version: str,
    fabric_type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    roll_ids: Iterable[str] | None = None,
) -> list[str]:
    """Finished rolls to reprocess with `model_version`, oldest first.

    Rolls whose status is done, of the model's fabric type (a generic model has none: it
    reprocesses only the fabric type named by `fabric_type`), completed in [since, until)
    (naive datetimes are local time), among `roll_ids` when given, and whose current run is
    not a finished run of this model version — or is, while another run of the roll is open
    (it is asked for again: see the module docstring). An unknown model, a fabric type that
    contradicts the model, or roll ids that do not exist are a ValueError naming them.
    """
    model = session.get(Model, model_version)
    if model is None:
        raise ValueError(f"unknown model version {model_version!r} (`rollscan models list`)")
    if model.fabric_type is None:
        if fabric_type is None:
            raise ValueError(
                f"{model_version} is a generic model: name the fabric type it should "
                "reprocess (--fabric TYPE)"
            )
    elif fabric_type not in (None, model.fabric_type):
        raise ValueError(
            f"{model_version} inspects fabric type {model.fabric_type!r}, not {fabric_type!r}"
        )
    fabric = fabric_type or model.fabric_type
    current_with_model = exists().where(
        Run.roll_id == Roll.id,
        Run.model_version == model_version,
        Run.is_current,
        Run.status == "done",  # a current run of it that failed is tried again
    )
    # another run still open (an interrupted command's): the roll is asked for again, or that
    # run, asked for earlier, would take it when it finishes
    other_open = exists().where(
        Run.roll_id == Roll.id,
        Run.model_version != model_version,
        Run.status.in_(OPEN_RUN_STATUSES),
    )
    query = select(Roll.id).where(
        Roll.status == "done", Roll.fabric_type == fabric, ~current_with_model | other_open
    )
    if since is not None:
        query = query.where(Roll.completed_at >= _aware(since))
    if until is not None:
        query = query.where(Roll.completed_at < _aware(until))
    if roll_ids is not None:
        wanted = list(dict.fromkeys(roll_ids))
        known = set(session.scalars(select(Roll.id).where(Roll.id.in_(wanted))))
        unknown = [r for r in wanted if r not in known]
        if unknown:
            shown = ", ".join(unknown[:20]) + (" …" if len(unknown) > 20 else "")
            raise ValueError(f"{len(unknown)} unknown roll id(s): {shown}")
        query = query.where(Roll.id.in_(wanted))
    return list(session.scalars(query.order_by(Roll.completed_at, Roll.id)))


def start_reprocess_run(
    ctx: WorkerContext, roll_id: str, model_version: str, asked_at: datetime | None = None
) -> tuple[int, list[int]]:
    """Create (or find) the roll's run with `model_version`; returns (run id, bands to score).

    Idempotent: the first call records every band of the roll (in the stored image's own band
    height, whatever the settings say today); later calls create nothing and return the bands
    not scored yet — all of them, none, or what an interrupted reprocess left. A finished run
    returns no bands and becomes the roll's current run if it was not and is now the one asked
    for last (its defects are up to date: a changed frame reopens every run of its roll); a
    failed one (a band whose worker died too often, say) starts again with the bands it had not
    scored. Each call asks for the model at `asked_at` (the command's start; default now, the
    database's clock): the run's `requested_at` moves forward to it, never back (see the module
    docstring). ValueError when the roll cannot be reprocessed.
    """
    with ctx.session() as session:
        roll = session.get(Roll, roll_id, with_for_update=True)  # as ingest: one writer a roll
        if roll is None:
            raise ValueError(f"unknown roll {roll_id!r}")
        if roll.status != "done":
            raise ValueError(
                f"roll {roll_id} is {roll.status}: only finished rolls are reprocessed"
            )
        # FOR KEY SHARE: a `models unregister` of it waits for this run, or this sees it gone
        # (the run's insert failed on the foreign key, and ended the whole reprocess)
        if session.get(Model, model_version, with_for_update={"key_share": True}) is None:
            raise ValueError(f"unknown model version {model_version!r}")
        if roll.rows_ingested < 1 or not roll_exists(ctx.store, roll_id):
            raise ValueError(f"roll {roll_id} has no stored image to reprocess")
        asked = asked_at if asked_at is not None else session.scalar(select(func.now()))
        session.execute(
            insert(Run)
            .values(roll_id=roll_id, model_version=model_version, purpose="reprocess",
                    requested_at=asked)
            .on_conflict_do_nothing()
        )  # fmt: skip
        run = session.scalar(
            select(Run)
            .where(Run.roll_id == roll_id, Run.model_version == model_version)
            .with_for_update()
        )
        run.requested_at = max(run.requested_at, asked)
        if run.status == "done":
            if not run.is_current and asked_last(session, run):
                log.info("roll %s: back to its run of %s", roll_id, model_version)
                make_current(session, run)
            return run.id, []
        if run.status == "failed":  # asked again: a new attempt; the bands it scored are kept
            log.info("roll %s: reprocessing with %s again after its run failed: %s",
                     roll_id, model_version, run.error)  # fmt: skip
            reopen_failed_run(session, run, "scoring")
        if run.bands_total is None:
            height, rows = open_roll(ctx.store, roll_id).band_height, roll.rows_ingested
            count = -(-rows // height)
            session.execute(
                insert(Band)
                .values([
                    {"run_id": run.id, "band_index": b, "row_start": b * height,
                     "row_stop": min((b + 1) * height, rows)}
                    for b in range(count)
                ])
                .on_conflict_do_nothing()
            )  # fmt: skip
            run.bands_total, run.status = count, "scoring"
        fix_run_stride(ctx, session, run)  # its bands' tile grid, whichever worker scores them
        missing = session.scalars(
            select(Band.band_index)
            .where(Band.run_id == run.id, Band.status != "done")
            .order_by(Band.band_index)
        )
        return run.id, list(missing)


@dataclass
class ReprocessReport:
    """The outcome of `reprocess`: the rolls done and failed (with the reason), of how many, in how
    many seconds."""

    model_version: str
    total: int
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # roll id → reason
    # done rolls that show another run: one asked for after this command (`asked_last`) → its model
    shown_elsewhere: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _grade(ctx: WorkerContext, run_id: int, rules: RuleBook) -> None:
    with ctx.session() as session:
        fabric = session.scalar(
            select(Roll.fabric_type).join(Run, Run.roll_id == Roll.id).where(Run.id == run_id)
        )
        grade_run(session, run_id, rules(fabric), rules.section(fabric))


def grade_ungraded(
    ctx: WorkerContext,
    model_version: str,
    rules_for: RuleBook | None = None,
) -> list[int]:
    """Grade the current reprocess runs of `model_version` that have no grade yet (a driver
    stopped between a run's finalize and its grading); returns their ids."""
    with ctx.session() as session:
        runs = list(
            session.scalars(
                select(Run.id).where(
                    Run.model_version == model_version,
                    Run.purpose == "reprocess",
                    Run.status == "done",
                    Run.is_current,
                    ~RUN_GRADED,
                )
            )
        )
    rules = rules_for if rules_for is not None else RuleBook()
    for run_id in runs:
        try:
            _grade(ctx, run_id, rules)
        except ValueError as exc:
            log.warning("not graded: %s", exc)
    return runs


def _sleeper(ctx: WorkerContext, poll_s: float) -> Callable[[], object]:
    drain = getattr(ctx.enqueue, "drain", None)  # InlineEnqueuer: run the queued work here
    return drain if callable(drain) else (lambda: time.sleep(poll_s))


def reprocess(
    ctx: WorkerContext,
    rolls: list[str],
    model_version: str,
    max_in_flight: int = 4,
    progress: bool = True,
    dry_run: bool = False,
    *,
    poll_s: float = 2.0,
    wait: Callable[[], object] | None = None,
    rules_for: RuleBook | None = None,
    out: TextIO | None = None,
    stall_s: float = STALL_S,
    clock: Callable[[], float] = time.monotonic,
) -> ReprocessReport:
    """Reprocess `rolls` with `model_version`, at most `max_in_flight` rolls at a time.

    Each roll's missing bands are enqueued (`ctx.enqueue.score(…, reprocess=True)`); the
    driver polls PostgreSQL for finished runs, grades each one that is done (default rules,
    or `rules_for(fabric_type)`), and starts the next roll. `wait()` is called when a poll
    found nothing new (default: sleep `poll_s`; with an in-process queue, drain it). A roll
    that cannot be reprocessed, or whose run fails, is reported and the others go on.
    `dry_run` prints the rolls (to `out`, default stdout) and writes nothing; the progress
    bar (done / total, rate, ETA) goes to `out`, default stderr. When no band of the runs in
    flight has been scored for `stall_s` seconds (`clock`'s), a line says what to check: the
    driver cannot tell a busy queue from absent workers or a lost message, so it does not resend.
    """
    rolls = list(dict.fromkeys(rolls))
    report = ReprocessReport(model_version, len(rolls))
    if dry_run:
        print(f"{len(rolls)} roll(s) would be reprocessed with {model_version}", file=out)
        for roll_id in rolls:
            print(roll_id, file=out)
        return report
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be ≥ 1, not {max_in_flight}")
    started = clock()
    with ctx.session() as session:  # when the command asked: the same for all its rolls
        asked_at = session.scalar(select(func.now()))
    rules = rules_for if rules_for is not None else RuleBook()
    if late := grade_ungraded(ctx, model_version, rules):
        log.info("graded %d run(s) a previous reprocess finished but did not grade", len(late))
    wait = wait if wait is not None else _sleeper(ctx, poll_s)
    pending, in_flight = deque(rolls), {}  # run id → roll id
    bar = progress_bar(total=len(rolls), desc=f"reprocess {model_version}", unit="roll",
               disable=not progress, file=out or sys.stderr, dynamic_ncols=True)  # fmt: skip
    stall = _StallWatch(stall_s, clock)
    try:
        while pending or in_flight:
            while pending and len(in_flight) < max_in_flight:
                roll_id = pending.popleft()
                try:
                    run_id, missing = start_reprocess_run(ctx, roll_id, model_version, asked_at)
                except ValueError as exc:
                    report.failed[roll_id] = str(exc)
                    log.warning("not reprocessed: %s", exc)
                    bar.update(1)
                    continue
                in_flight[run_id] = roll_id
                try:
                    for band in missing:
                        ctx.enqueue.score(run_id, band, reprocess=True)
                    if not missing and _statuses(ctx, [run_id])[0][1] not in ("done", "failed"):
                        ctx.enqueue.finalize(run_id)  # every band scored, the finalize was lost
                except Exception:
                    # in-process (no broker) a band's own error comes out of `score`: its run,
                    # failed, is reported with the others below and the next roll goes on (the
                    # first such roll ended the command); a broker down, or an error a retry may
                    # mend (the run still open), ends it: running it again resumes
                    if _statuses(ctx, [run_id])[0][1] != "failed":
                        raise
            statuses = _statuses(ctx, list(in_flight))
            finished = [s for s in statuses if s[1] in ("done", "failed")]
            for run_id, status, error, _, _ in finished:
                roll_id = in_flight.pop(run_id)
                if status == "failed":
                    report.failed[roll_id] = error or "run failed"
                else:
                    try:
                        _grade(ctx, run_id, rules)
                        report.done.append(roll_id)
                        if (shown := _shown_model(ctx, roll_id, run_id)) is not None:
                            report.shown_elsewhere[roll_id] = shown
                    except ValueError as exc:
                        report.failed[roll_id] = f"reprocessed but not graded: {exc}"
                bar.update(1)
            scored = sum(s[3] for s in statuses if s[1] not in ("done", "failed"))
            total = sum(s[4] or 0 for s in statuses if s[1] not in ("done", "failed"))
            bar.set_postfix_str(f"bands in flight {scored}/{total}, failed {len(report.failed)}")
            if in_flight and (warning := stall.check(bar.n, scored, len(in_flight))):
                # a band out of its retries says why on its run (`worker.roll_rows.note_waiting`)
                waiting = [f"roll {in_flight[s[0]]}: {s[2]}" for s in statuses
                           if s[0] in in_flight and (s[2] or "").startswith(WAITING)]  # fmt: skip
                warning += "".join(f"; {note}" for note in waiting[:3])
                log.warning("%s", warning)
                bar.write(warning, file=out or sys.stderr)
            if in_flight and not finished:
                wait()
    finally:
        bar.close()
    report.seconds = clock() - started
    return report


class _StallWatch:
    """Says once per stall that the runs in flight have made no progress for `stall_s` s."""

    def __init__(self, stall_s: float, clock: Callable[[], float]) -> None:
        self.stall_s, self.clock = stall_s, clock
        self.progress: tuple[int, int] | None = None
        self.since = clock()
        self.warned = False

    def check(self, rolls_done: int, bands_scored: int, runs: int) -> str | None:
        now = self.clock()
        if (rolls_done, bands_scored) != self.progress:  # rolls finish, or bands are scored
            self.progress, self.since, self.warned = (rolls_done, bands_scored), now, False
            return None
        if self.warned or now - self.since < self.stall_s:
            return None
        self.warned = True
        return (
            f"no band of the {runs} run(s) in flight scored for {(now - self.since) / 60:.0f} "
            "min: are workers consuming the queue `reprocess` (celery -A worker.app worker -Q "
            "reprocess)? If a band's message was lost (a broker restarted without persistence), "
            "interrupt and run the same command again: it sends the missing bands again"
        )


def _shown_model(ctx: WorkerContext, roll_id: str, run_id: int) -> str | None:
    """The model of the roll's current run when it is not `run_id`, else None."""
    with ctx.session() as session:
        current = current_run(session, roll_id)
        return None if current is None or current.id == run_id else current.model_version


def _statuses(ctx: WorkerContext, run_ids: list[int]) -> list[tuple]:
    """(id, status, error, bands_done, bands_total) of each run, in `run_ids` order."""
    if not run_ids:
        return []
    with ctx.session() as session:
        rows = session.execute(
            select(Run.id, Run.status, Run.error, Run.bands_done, Run.bands_total).where(
                Run.id.in_(run_ids)
            )
        ).all()
    by_id = {row[0]: tuple(row) for row in rows}
    return [by_id[run_id] for run_id in run_ids]
