"""`rollscan resume`: send again the work of rolls whose messages were lost (`scheduler.resume`).

Send again what the rolls wait for: frames not ingested, pending bands, a due finalize. Safe to
repeat: work that was only queued is scored twice at worst, never counted twice. `--retry`
starts failed rolls again (`scheduler.resume.retry_roll`) once their cause is fixed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cli.arg_types import command_parser, parse_duration
from cli.connect import command_context


def _resume(args: argparse.Namespace) -> int:
    from scheduler.resume import idle_rolls, resume_roll

    if not args.rolls and args.idle is None:
        raise ValueError("name the rolls to resume, or give --idle DURATION")
    if args.retry:
        return _retry(args)
    ctx = command_context()
    rolls = list(args.rolls)
    if args.idle is not None:
        with ctx.session() as session:
            rolls += [r for r in idle_rolls(session, args.idle) if r not in rolls]
    if not rolls:
        print(f"no roll has been idle for {args.idle}")
    for roll_id in rolls:
        print(("(dry run) " if args.dry_run else "") + str(resume_roll(ctx, roll_id, args.dry_run)))
    return 0


def _retry(args: argparse.Namespace) -> int:
    from scheduler.resume import retry_roll
    from storage.schema import Roll

    if args.idle is not None or args.dry_run:
        raise ValueError(
            "--retry starts the named failed rolls: it takes neither --idle nor --dry-run"
        )
    ctx = command_context()
    refused = 0
    for roll_id in args.rolls:
        try:  # one roll refused, the others still started
            resumed = retry_roll(ctx, roll_id)
        except ValueError as exc:
            refused += 1
            print(f"rollscan resume: error: {exc}", file=sys.stderr)
            continue
        with ctx.session() as session:
            roll = session.get(Roll, roll_id)
            status, reason = roll.status, roll.failure_reason
        if status == "failed":
            refused += 1
            print(f"roll {roll_id}: failed again: {reason}")
        else:  # a cause still there fails it again in a worker: `rollscan rolls` tells
            print(f"{resumed} (started again, status {status})")
    return 1 if refused else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `resume` to the main parser's subparsers."""
    resume = command_parser(
        subparsers, "resume", "send again the work of rolls whose messages were lost", __doc__
    )
    resume.add_argument("rolls", nargs="*", metavar="ROLL", help="roll ids")
    resume.add_argument("--idle", type=parse_duration, default=None, metavar="DURATION",
                        help="also every roll with open work and no progress for DURATION "
                        "(e.g. 2h)")  # fmt: skip
    resume.add_argument("--dry-run", action="store_true", help="say what would be sent")
    resume.add_argument("--retry", action="store_true",
                        help="start the named failed rolls again, once the cause is fixed (a "
                        "model activated for the fabric, a corrupt frame replaced)")  # fmt: skip
    resume.set_defaults(handler=_resume)
    return resume
