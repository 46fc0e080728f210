"""`rollscan reprocess`: score finished rolls again with another model version.

Creates a run per roll with the model, scores it from the roll's zarr image, makes it current
when complete and regrades. Interrupted, it resumes where it stopped when run again. Its bands
go to the Celery queue `reprocess`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from cli.arg_types import at_site, command_parser, iso_date, parse_duration, positive_int
from cli.connect import command_context, prepare_database
from storage.settings import get_settings


def read_roll_ids(path: Path) -> list[str]:
    """One roll id per line; blank lines and `#` comments (whole-line or trailing) ignored."""
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        roll_id = line.split("#", 1)[0].strip()
        if roll_id:
            ids.append(roll_id)
    return ids


def _reprocess(args: argparse.Namespace) -> int:
    from results.grading_rules import rules_from_file
    from scheduler.reprocess import grade_ungraded, reprocess, select_rolls

    listed = read_roll_ids(args.rolls_from) if args.rolls_from is not None else None
    settings = get_settings()
    rules_for = rules_from_file(args.rules or settings.grading_rules)  # before anything runs
    prepare_database(settings, migrate=not args.dry_run)  # a dry run changes nothing
    ctx = command_context(upgrade_database=False)
    with ctx.session() as session:
        rolls = select_rolls(
            session,
            model_version=args.model,
            fabric_type=args.fabric,
            since=at_site(args.since, ctx.settings.timezone),
            until=at_site(args.until, ctx.settings.timezone),
            roll_ids=listed,
        )
    if listed is not None and len(rolls) < len(set(listed)):
        skipped = sorted(set(listed) - set(rolls))
        print(
            f"{len(skipped)} listed roll(s) skipped (not done, other fabric, outside the dates, "
            f"or already done with {args.model}): {', '.join(skipped[:20])}"
            + (" …" if len(skipped) > 20 else "")
        )
    if not rolls and not args.dry_run:
        # a run again after an interrupt: the runs the workers finished meanwhile are done with
        # the model, so not selected, but still to be graded
        graded = grade_ungraded(ctx, args.model, rules_for)
        print(f"nothing to reprocess with {args.model}" + (
            f"; graded {len(graded)} run(s) finished since an interrupted run" if graded else ""
        ))  # fmt: skip
        return 0
    try:
        report = reprocess(
            ctx,
            rolls,
            args.model,
            max_in_flight=args.max_in_flight,
            progress=not args.no_progress,
            dry_run=args.dry_run,
            rules_for=rules_for,
            stall_s=math.inf if args.stall_after is None else args.stall_after.total_seconds(),
        )
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the enqueued bands are still scored by the workers; run the same "
            "command again to resume"
        )
        return 130
    if args.dry_run:
        return 0
    print(
        f"reprocessed {len(report.done)} of {report.total} roll(s) with {args.model} "
        f"in {report.seconds:.0f} s"
    )
    if report.shown_elsewhere:
        print(f"{len(report.shown_elsewhere)} of them still show another model, asked for after "
              "this command:")  # fmt: skip
        for roll_id, shown in report.shown_elsewhere.items():
            print(f"  {roll_id}: shows {shown}")
    for roll_id, reason in report.failed.items():
        print(f"  {roll_id}: {reason}")
    return 1 if report.failed else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `reprocess` to the main parser's subparsers."""
    summary = "score finished rolls again with a model version (from their stored images)"
    parser = command_parser(subparsers, "reprocess", summary, __doc__)
    parser.add_argument("--model", required=True, metavar="VERSION", help="a registered version")
    parser.add_argument(
        "--fabric",
        default=None,
        metavar="TYPE",
        help="fabric type (default: the model's; required for a generic model)",
    )
    parser.add_argument(
        "--since",
        type=iso_date,
        default=None,
        metavar="DATE",
        help="rolls completed at or after DATE (ISO; in ROLLSCAN_TIMEZONE unless it has an offset)",
    )
    parser.add_argument(
        "--until", type=iso_date, default=None, metavar="DATE", help="rolls completed before DATE"
    )
    parser.add_argument(
        "--rolls-from",
        type=Path,
        default=None,
        metavar="FILE",
        help="only these rolls: one id per line, # comments allowed",
    )
    parser.add_argument(
        "--max-in-flight", type=positive_int, default=4, metavar="N", help="rolls at a time (4)"
    )
    parser.add_argument(
        "--rules",
        type=Path,
        default=None,
        metavar="FILE",
        help="grading rules for the regrade (as `rollscan grade --rules`); default: "
        "ROLLSCAN_GRADING_RULES, else the built-in rules",
    )
    parser.add_argument(
        "--stall-after", type=parse_duration, default="10m", metavar="DURATION",
        help="say what to check when no band has been scored for this long (10m; 0 or off: "
        "never), as the scheduler's --stall-after",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="list the rolls, write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_reprocess)
    return parser
