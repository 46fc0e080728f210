"""`rollscan grade`: four-point (ASTM D5430) grading of finished rolls.

The main command line calls `add_grade_commands(subparsers)` and, for
``args.command == "grade"``, returns ``args.grade_handler(args)``. Rules come from
``--rules FILE`` (JSON, or TOML by its ``.toml`` suffix), shaped as `scheduler.grading.load_rules`
describes; without it the built-in defaults apply to every fabric type.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

from scheduler.grade_store import grade_rolls
from scheduler.grading import GradingRules, load_rules
from storage.database import make_engine, session_scope
from storage.settings import get_settings


def read_rules_file(path: Path) -> dict[str, Any]:
    """The grading config in a JSON or TOML file; ValueError with the file's name if unreadable."""
    try:
        if path.suffix.lower() == ".toml":
            with path.open("rb") as f:
                config = tomllib.load(f)
        else:
            config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"grading rules {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"grading rules {path}: expected an object at the top")
    return config


def iso_date(text: str) -> datetime:
    """argparse type: an ISO date or date-time."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO date or date-time: {text!r} (e.g. 2026-05-01 or 2026-05-01T18:00)"
        ) from None


def _grade(args: argparse.Namespace) -> int:
    config = read_rules_file(args.rules) if args.rules is not None else None
    load_rules("", config)  # validate the whole file before touching the database

    def rules_for(fabric_type: str) -> GradingRules:
        return load_rules(fabric_type, config)

    engine = make_engine(get_settings())
    try:
        with session_scope(engine) as session:
            rows = grade_rolls(session, roll_id=args.roll, since=args.since, rules_for=rules_for)
    finally:
        engine.dispose()
    if not rows:
        what = f"roll {args.roll} has" if args.roll else "no roll has"
        print(f"nothing graded: {what} a finished current run to grade")
        return 0
    print(f"{'roll':<24}{'length m':>10}{'points':>8}{'points/100 yd²':>16}  grade")
    for r in rows:
        print(
            f"{r.roll_id:<24}{r.length_m:>10.1f}{r.points:>8}{r.points_per_100yd2:>16.2f}  {r.grade}"
        )
    return 0


def add_grade_commands(subparsers: Any) -> argparse.ArgumentParser:
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
        help="rolls whose current run finished since DATE (ISO; local time unless it has an offset)",
    )
    parser.add_argument(
        "--rules",
        type=Path,
        default=None,
        metavar="FILE",
        help="grading rules per fabric type (.json, or .toml); default: the built-in rules",
    )
    parser.set_defaults(grade_handler=_grade)
    return parser
