"""`rollscan evaluate`: tile and pixel metrics of a model on a category's test set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cli.arg_types import LazyChoices, options


def _precisions() -> tuple[str, ...]:
    from distill.inference import SCORING_PRECISIONS

    return SCORING_PRECISIONS


def _evaluate(args: argparse.Namespace) -> int:
    from distill.evaluate import evaluate, format_table

    result = evaluate(
        args.model, args.data, **options(args, "device precision teacher_weights",
                                         batch_size="batch", report_dir="report", json_out="json")
    )  # fmt: skip
    print(format_table({args.data.name: result}))
    counts = f"{result['n_good']} good and {result['n_defect']} defective test tiles"
    if "fpr_at_threshold" not in result:  # a partial checkpoint: never calibrated
        print(f"{counts}; the checkpoint has no calibrated threshold (train it to the end)")
        return 0
    shares = [
        f"{result[key]:.3f} of {which}"  # NaN where there are no such tiles: not said
        for key, which in (("fpr_at_threshold", "good tiles flagged"),
                           ("recall_at_threshold", "defective ones caught"))
        if result[key] == result[key]
    ]  # fmt: skip
    print(f"{counts}; at the calibrated threshold {', '.join(shares)}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `evaluate` to the main parser's subparsers."""
    p = subparsers.add_parser(
        "evaluate", help="tile/pixel metrics of a model on a category's test set"
    )
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--json", type=Path, default=None, help="write the metrics as JSON here")
    p.add_argument("--report", type=Path, default=None, help="write ROC curves and examples here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=LazyChoices(_precisions),
                   metavar="auto|fp32|bf16|int8")  # fmt: skip
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-weights", default=None)
    p.set_defaults(handler=_evaluate)
    return p
