"""`rollscan demo`: the whole pipeline on a synthetic roll, on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    from scheduler.demo import run_demo

    run_demo(
        args.workdir,
        json_out=args.json,
        teacher_weights=args.teacher_weights,
        **({} if args.epochs is None else {"epochs": args.epochs}),
    )
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `demo` to the main parser's subparsers."""
    p = subparsers.add_parser(
        "demo", help="the whole pipeline on a synthetic roll, on this machine"
    )
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=None, help="training epochs (a fixed recipe)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--teacher-weights", default=None)
    p.set_defaults(handler=_demo)
    return p
