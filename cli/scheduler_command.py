"""`rollscan scheduler`: the control plane's long-running loop.

Discovers uploads under the incoming prefix and enqueues their work (`scheduler.discovery`),
marks stalled rolls, serves Prometheus metrics on `ROLLSCAN_METRICS_PORT` (or
``--metrics-port``), and with ``--beat`` runs the nightly grading schedule in the same process
(`scheduler.beat`). SIGTERM or Ctrl-C stops it after the current pass.

`rollscan resume` sends again the work of rolls whose messages were lost (`scheduler.resume`).

The main command line calls `add_scheduler_commands(subparsers)` and, for
``args.command`` "scheduler" or "resume", returns ``args.scheduler_handler(args)``.
"""

from __future__ import annotations

import argparse
import re
import signal
import threading
from datetime import timedelta
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta | None:
    """'30m', '2h', '1h30m', '45s', '1d' or plain seconds; '0' or 'off' → None (never)."""
    text = text.strip().lower()
    if text in ("0", "off", "never"):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return timedelta(seconds=float(text))
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (e.g. 30m, 2h, 1h30m, 90s; 0 or off = never)"
        )
    return timedelta(**{_UNITS[u]: float(n) for n, u in parts})


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _context() -> Any:
    from storage.database import database_url, upgrade
    from worker.tasks import context

    ctx = context()
    if ctx.settings.embedded_database:
        upgrade(database_url(ctx.settings))
    return ctx


def _print_report(report: Any) -> None:
    print(
        f"{len(report.new_rolls)} new rolls, {len(report.frames_enqueued)} frames enqueued, "
        f"{len(report.completed)} complete, {len(report.stalled)} stalled"
    )
    for label, items in (("new", report.new_rolls), ("complete", report.completed),
                         ("stalled", report.stalled)):  # fmt: skip
        if items:
            print(f"  {label}: {', '.join(items)}")
    for problem in report.problems:
        print(f"  problem: {problem}")


def _run(args: argparse.Namespace) -> int:
    from scheduler.discovery import discover_once
    from scheduler.loop import run_scheduler
    from scheduler.metrics import SchedulerMetrics, start_metrics_server

    ctx = _context()
    if args.once:
        report = discover_once(ctx, stall_after=args.stall_after)
        _print_report(report)
        return 1 if report.problems else 0
    port = args.metrics_port if args.metrics_port is not None else ctx.settings.metrics_port
    start_metrics_server(port, ctx.settings.metrics_addr)
    beat = None
    if args.beat:
        from scheduler.beat import start_embedded_beat

        _, beat = start_embedded_beat(ctx.settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run_scheduler(ctx, args.interval, stop, stall_after=args.stall_after,
                      metrics=SchedulerMetrics())  # fmt: skip
    finally:
        if beat is not None:
            beat.stop()
    return 0


def _resume(args: argparse.Namespace) -> int:
    from scheduler.resume import idle_rolls, resume_roll

    if not args.rolls and args.idle is None:
        raise ValueError("name the rolls to resume, or give --idle DURATION")
    ctx = _context()
    rolls = list(args.rolls)
    if args.idle is not None:
        with ctx.session() as session:
            rolls += [r for r in idle_rolls(session, args.idle) if r not in rolls]
    if not rolls:
        print(f"no roll has been idle for {args.idle}")
    for roll_id in rolls:
        print(("(dry run) " if args.dry_run else "") + str(resume_roll(ctx, roll_id, args.dry_run)))
    return 0


def add_scheduler_commands(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "scheduler",
        help="discover uploaded rolls and enqueue their work (long-running)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--interval", type=_positive_seconds, default=10.0, metavar="SECONDS",
                        help="between discovery passes (default 10)")  # fmt: skip
    parser.add_argument(
        "--stall-after",
        type=parse_duration,
        default=timedelta(minutes=30),
        metavar="DURATION",
        help="mark a roll stalled after this long without frames (default 30m; 0 = never)",
    )
    parser.add_argument("--once", action="store_true", help="one pass, print what it did, exit")
    parser.add_argument("--beat", action="store_true", help="also run the nightly grading beat")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="Prometheus /metrics port (default ROLLSCAN_METRICS_PORT; 0 = off)")  # fmt: skip
    parser.set_defaults(scheduler_handler=_run)

    resume = subparsers.add_parser(
        "resume",
        help="send again the work of rolls whose messages were lost",
        description="Send again what the rolls wait for: frames not ingested, pending bands, "
        "a due finalize. Safe to repeat: work that was only queued is scored twice at worst, "
        "never counted twice.",
    )
    resume.add_argument("rolls", nargs="*", metavar="ROLL", help="roll ids")
    resume.add_argument("--idle", type=parse_duration, default=None, metavar="DURATION",
                        help="also every roll with open work and no progress for DURATION "
                        "(e.g. 2h)")  # fmt: skip
    resume.add_argument("--dry-run", action="store_true", help="say what would be sent")
    resume.set_defaults(scheduler_handler=_resume)
    return parser
