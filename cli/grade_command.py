"""`rollscan grade`: four-point (ASTM D5430) grading of finished rolls.

Rules come from ``--rules FILE`` (JSON, or TOML by its ``.toml`` suffix), shaped as
`results.grading_rules.RuleBook` describes, else from ``ROLLSCAN_GRADING_RULES``; without either
the built-in defaults apply to every fabric type.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cli.arg_types import at_site, iso_date
from cli.connect import command_session
from storage.settings import get_settings


def _grade(args: argparse.Namespace) -> int:
    from results.grade_store import grade_rolls
    from results.grading import decisive_text
    from results.grading_rules import rules_from_file

    settings = get_settings()
    rules_for = rules_from_file(args.rules or settings.grading_rules)  # checked before any write
    skipped: list[str] = []
    with command_session(settings) as session:
        since = at_site(args.since, settings.timezone)
        rows = grade_rolls(session, roll_id=args.roll, since=since, rules_for=rules_for,
                           skipped=skipped, commit_each=True)  # fmt: skip
    for line in skipped:
        print(f"not graded: {line}", file=sys.stderr)
    if not rows and not skipped:
        if args.roll:  # asked for by name: that it cannot be graded is an error
            print(f"not graded: roll {args.roll} has no finished current run", file=sys.stderr)
            return 1
        print("nothing graded: no roll has a finished current run to grade")
        return 0
    if rows:
        print(f"{'roll':<24}{'length m':>10}{'points':>8}{'points/100 yd²':>16}  grade")
    for r in rows:
        limits = [limit for _, limit in rules_for(r.fabric_type).acceptance]
        density = decisive_text(r.points_per_100yd2, limits)  # 40.002 is not "40.00" beside B ≤ 40
        print(f"{r.roll_id:<24}{r.length_m:>10.1f}{r.points:>8}{density:>16}  {r.grade}")
    for r in rows:
        if r.unseen_m > 0:  # graded on what was seen: a grader must know what was not
            print(f"roll {r.roll_id}: {r.unseen_m:.2f} m of its {r.length_m:.2f} m not inspected "
                  "(no fabric seen: dark or blank frames): graded on the rest")  # fmt: skip
    return 1 if skipped else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `grade` to the main parser's subparsers."""
    parser = subparsers.add_parser(
        "grade", help="grade finished rolls with the four-point system (ASTM D5430)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--roll", default=None, metavar="ID", help="grade this roll only")
    which.add_argument(
        "--since",
        type=iso_date,
        default=None,
        metavar="DATE",
        help="rolls whose current run finished since DATE (ISO; in ROLLSCAN_TIMEZONE unless it has an offset)",
    )
    parser.add_argument(
        "--rules",
        type=Path,
        default=None,
        metavar="FILE",
        help="grading rules per fabric type (.json, or .toml); default: "
        "ROLLSCAN_GRADING_RULES, else the built-in rules",
    )
    parser.set_defaults(handler=_grade)
    return parser
