"""`rollscan report ROLL --out DIR`: an HTML page of a roll (map, defects with crops, grade)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from cli.connect import command_session
from storage.settings import get_settings


def _report(args: argparse.Namespace) -> int:
    from results.roll_report import load_report_data, render_report
    from storage.objectstore import open_object_store

    settings = get_settings()
    with command_session(settings) as session:
        data = load_report_data(session, args.roll, ZoneInfo(settings.timezone))
    page = render_report(data, open_object_store(settings), args.out)
    if data.unscored:  # not "0 defects": a reader would take that for a flawless roll
        print(f"wrote {page} (no defects to show: {data.unscored})")
    else:
        print(f"wrote {page} ({len(data.defects)} defects)")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `report` to the main parser's subparsers."""
    report = subparsers.add_parser(
        "report", help="an HTML page of a roll: map, defects with crops, grade"
    )
    report.add_argument("roll", metavar="ROLL")
    report.add_argument("--out", required=True, type=Path, metavar="DIR")
    report.set_defaults(handler=_report)
    return report
