"""`rollscan rolls`, `rollscan defects ROLL`, `rollscan report ROLL --out DIR`: results for people.

The main command line calls `add_results_commands(subparsers)` and, for the commands
``rolls``, ``defects`` and ``report``, returns ``args.results_handler(args)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from results.defect_tables import (
    DEFECT_COLUMNS,
    DEFECT_TABLE_COLUMNS,
    ROLL_COLUMNS,
    format_table,
    list_rolls,
    roll_defects,
    write_csv,
)
from scheduler.cli_grade import iso_date
from storage.database import make_engine, session_scope
from storage.schema import ROLL_STATUSES
from storage.settings import get_settings


def _rolls(args: argparse.Namespace) -> int:
    engine = make_engine(get_settings())
    try:
        with session_scope(engine) as session:
            rows = list_rolls(session, since=args.since, status=args.status)
    finally:
        engine.dispose()
    if not rows:
        print("no rolls")
        return 0
    print(format_table(rows, ROLL_COLUMNS))
    return 0


def _defects(args: argparse.Namespace) -> int:
    engine = make_engine(get_settings())
    try:
        with session_scope(engine) as session:
            rows = roll_defects(session, args.roll)
    finally:
        engine.dispose()
    if args.csv:
        write_csv(rows, DEFECT_COLUMNS, sys.stdout)
    elif rows:
        print(format_table(rows, DEFECT_TABLE_COLUMNS))
    else:
        print(f"roll {args.roll}: no defects in its current run")
    return 0


def _report(args: argparse.Namespace) -> int:
    from results.roll_report import load_report_data, render_report
    from storage.objectstore import open_object_store

    settings = get_settings()
    engine = make_engine(settings)
    try:
        with session_scope(engine) as session:
            data = load_report_data(session, args.roll)
    finally:
        engine.dispose()
    page = render_report(data, open_object_store(settings), args.out)
    print(f"wrote {page} ({len(data.defects)} defects)")
    return 0


def add_results_commands(subparsers: Any) -> None:
    rolls = subparsers.add_parser("rolls", help="list rolls: status, length, defects, grade")
    rolls.add_argument(
        "--since",
        type=iso_date,
        default=None,
        metavar="DATE",
        help="rolls registered since DATE (ISO; local time unless it has an offset)",
    )
    rolls.add_argument("--status", default=None, choices=ROLL_STATUSES)
    rolls.set_defaults(results_handler=_rolls)

    defects = subparsers.add_parser("defects", help="a roll's defects (its current run)")
    defects.add_argument("roll", metavar="ROLL")
    defects.add_argument("--csv", action="store_true", help="CSV on stdout, full precision")
    defects.set_defaults(results_handler=_defects)

    report = subparsers.add_parser(
        "report", help="an HTML page of a roll: map, defects with crops, grade"
    )
    report.add_argument("roll", metavar="ROLL")
    report.add_argument("--out", required=True, type=Path, metavar="DIR")
    report.set_defaults(results_handler=_report)
