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
    flagged, caught = result.get("fpr_at_threshold"), result.get("recall_at_threshold")
    if flagged is None or flagged != flagged:  # NaN: no threshold (a partial checkpoint)
        print(f"{counts}; the checkpoint has no calibrated threshold (train it to the end)")
        return 0
    at = f"{counts}; at the calibrated threshold {flagged:.3f} of good tiles flagged"
    print(f"{at}, {caught:.3f} of defective ones caught" if result["n_defect"] else at)
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
