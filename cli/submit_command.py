"""`rollscan submit TARGET`: register a roll (a folder, or s3://bucket/prefix) and run it."""

from __future__ import annotations

import argparse
from typing import Any

from cli.connect import command_context


def _submit(args: argparse.Namespace) -> int:
    from scheduler.submit import submit
    from storage.schema import Roll

    ctx = command_context()
    submission = submit(ctx, args.target)
    with ctx.session() as session:
        roll = session.get(Roll, submission.roll_id)
        status, reason = roll.status, roll.failure_reason
    print(f"roll {submission.roll_id}: {len(submission.frames)} frames submitted, status {status}")
    if reason:
        print(f"  reason: {reason}")
    return 1 if status == "failed" else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `submit` to the main parser's subparsers."""
    p = subparsers.add_parser(
        "submit", help="register a roll (folder or s3://bucket/prefix) and run it"
    )
    p.add_argument("target", help="a folder with manifest.json and frames/, or s3://BUCKET/PREFIX")
    p.set_defaults(handler=_submit)
    return p
