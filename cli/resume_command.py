"""`rollscan resume`: send again the work of rolls whose messages were lost (`scheduler.resume`).

Send again what the rolls wait for: frames not ingested, pending bands, a due finalize. Safe to
repeat: work that was only queued is scored twice at worst, never counted twice.
"""

from __future__ import annotations

import argparse
from typing import Any

from cli.arg_types import command_parser, parse_duration
from cli.connect import command_context


def _resume(args: argparse.Namespace) -> int:
    from scheduler.resume import idle_rolls, resume_roll

    if not args.rolls and args.idle is None:
        raise ValueError("name the rolls to resume, or give --idle DURATION")
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
    resume.set_defaults(handler=_resume)
    return resume
