"""`rollscan scheduler`: the control plane's long-running loop.

Discovers uploads under the incoming prefix and enqueues their work (`scheduler.discovery`),
marks stalled rolls, sends again the work of rolls idle with nothing of it queued
(``--resume-idle``, `scheduler.auto_resume`), serves Prometheus metrics on `ROLLSCAN_METRICS_PORT` (or
``--metrics-port``), and with ``--beat`` runs the nightly grading schedule in the same process
(`scheduler.beat`). SIGTERM or Ctrl-C stops it after the current pass.
"""

from __future__ import annotations

import argparse
import signal
import threading
from datetime import timedelta
from typing import Any

from cli.arg_types import command_parser, parse_duration, positive_seconds
from cli.connect import command_context


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


def _run_scheduler(args: argparse.Namespace) -> int:
    from scheduler.auto_resume import PIPELINE_QUEUES, AutoResume
    from scheduler.discovery import discover_once
    from scheduler.loop import run_scheduler
    from scheduler.scheduler_metrics import SchedulerMetrics, queue_depths, start_metrics_server

    ctx = command_context()
    if args.beat:  # a bad rules file is said now, not by a grading that fails every night
        from results.grading_rules import rules_from_file

        rules_from_file(ctx.settings.grading_rules)
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
    auto_resume = None
    if args.resume_idle is not None:
        broker = ctx.settings.broker_url
        depths = (  # without a broker the tasks run in this process: nothing is ever queued
            (lambda: queue_depths(broker.get_secret_value(), PIPELINE_QUEUES))
            if broker is not None else dict
        )  # fmt: skip
        auto_resume = AutoResume(args.resume_idle, depths)
    try:
        run_scheduler(ctx, args.interval, stop, stall_after=args.stall_after,
                      metrics=SchedulerMetrics(), auto_resume=auto_resume)  # fmt: skip
    finally:
        if beat is not None:
            beat.stop()
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `scheduler` to the main parser's subparsers."""
    summary = "discover uploaded rolls and enqueue their work (long-running)"
    parser = command_parser(subparsers, "scheduler", summary, __doc__)
    parser.add_argument("--interval", type=positive_seconds, default=10.0, metavar="SECONDS",
                        help="between discovery passes (default 10)")  # fmt: skip
    parser.add_argument(
        "--stall-after",
        type=parse_duration,
        default=timedelta(minutes=30),
        metavar="DURATION",
        help="mark a roll stalled after this long without frames (default 30m; 0 = never)",
    )
    parser.add_argument(
        "--resume-idle",
        type=parse_duration,
        default=timedelta(hours=2),
        metavar="DURATION",
        help="send again the work of a roll idle this long while nothing is queued where its "
        "work goes (lost messages; default 2h; 0 = never)",
    )
    parser.add_argument("--once", action="store_true", help="one pass, print what it did, exit")
    parser.add_argument("--beat", action="store_true", help="also run the nightly grading beat")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="Prometheus /metrics port (default ROLLSCAN_METRICS_PORT; 0 = off)")  # fmt: skip
    parser.set_defaults(handler=_run_scheduler)
    return parser
