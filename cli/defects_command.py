"""`rollscan defects ROLL`: a roll's defects (its current run), as a table or CSV; exit code 1,
with the reason, for a roll that failed or is not scored yet."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cli.connect import command_session


def _defects(args: argparse.Namespace) -> int:
    from results.defect_tables import (
        DEFECT_COLUMNS,
        DEFECT_TABLE_COLUMNS,
        format_table,
        roll_defects,
        unscored_reason,
        write_csv,
    )

    with command_session() as session:
        rows = roll_defects(session, args.roll)
        unscored = unscored_reason(session, args.roll)
    if unscored:  # not "no defects": a grader would take that for a flawless roll
        print(f"rollscan defects: {unscored}", file=sys.stderr)
        return 1
    if args.csv:
        write_csv(rows, DEFECT_COLUMNS, sys.stdout)
    elif rows:
        print(format_table(rows, DEFECT_TABLE_COLUMNS))
    else:
        print(f"roll {args.roll}: no defects in its current run")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `defects` to the main parser's subparsers."""
    defects = subparsers.add_parser("defects", help="a roll's defects (its current run)")
    defects.add_argument("roll", metavar="ROLL")
    defects.add_argument("--csv", action="store_true", help="CSV on stdout, full precision")
    defects.set_defaults(handler=_defects)
    return defects
