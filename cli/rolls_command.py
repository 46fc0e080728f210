"""`rollscan rolls`: list rolls with their status, length, defects and grade."""

from __future__ import annotations

import argparse
from typing import Any
from zoneinfo import ZoneInfo

from cli.arg_types import at_site, iso_date, non_negative_int
from cli.connect import command_session
from storage.schema import ROLL_STATUSES
from storage.settings import get_settings

DEFAULT_LIMIT = 100


def _rolls(args: argparse.Namespace) -> int:
    from results.defect_tables import ROLL_COLUMNS, count_rolls, format_table, list_rolls

    settings = get_settings()
    limit = args.limit or None  # 0: all
    with command_session(settings) as session:
        since = at_site(args.since, settings.timezone)
        rows = list_rolls(session, since=since, status=args.status, limit=limit)
        left_out = count_rolls(session, since, args.status) - len(rows) if len(rows) == limit else 0
    if not rows:
        print("no rolls")
        return 0
    if left_out:  # a mill's archive is tens of thousands of rolls: the recent ones, and a count
        print(
            f"… {left_out} older roll(s) not shown (--limit 0 lists all, --since DATE from a day)"
        )
    print(format_table(rows, ROLL_COLUMNS, ZoneInfo(settings.timezone)))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `rolls` to the main parser's subparsers."""
    rolls = subparsers.add_parser("rolls", help="list rolls: status, length, defects, grade")
    rolls.add_argument(
        "--since",
        type=iso_date,
        default=None,
        metavar="DATE",
        help="rolls registered or completed since DATE (ISO; in ROLLSCAN_TIMEZONE unless it "
        "has an offset)",
    )
    rolls.add_argument("--status", default=None, choices=ROLL_STATUSES)
    rolls.add_argument(
        "--limit", type=non_negative_int, default=DEFAULT_LIMIT, metavar="N",
        help=f"the N most recent rolls (default {DEFAULT_LIMIT}; 0: all)",
    )  # fmt: skip
    rolls.set_defaults(handler=_rolls)
    return rolls
