"""The `rollscan` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from distill.teacher import DEFAULT_TEACHER, TEACHERS
from distill.torch_model import VARIANTS
from scheduler.cli_grade import add_grade_commands
from scheduler.cli_models import add_models_commands
from scheduler.cli_reprocess import add_reprocess_commands
from scheduler.cli_results import add_results_commands
from scheduler.cli_scheduler import add_scheduler_commands
from storage.cli_db import add_db_commands


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on one category in MVTec AD layout")
    p.add_argument("--data", required=True, type=Path, help="category folder with train/good/")
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, choices=sorted(TEACHERS))
    p.add_argument(
        "--teacher-weights", default=None, help="local weight file, or 'random' (tests only)"
    )
    p.add_argument("--variant", default="residual", choices=VARIANTS)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--fpr", type=float, default=0.001, help="target false-alarm rate of good tiles")
    p.add_argument(
        "--level-weights", type=float, nargs=4, default=(1.0, 1.0, 1.0, 1.0), metavar="W"
    )
    p.add_argument("--loss", default=None, help="pixel (the paper's), flat (RD4AD's) or hard")
    p.add_argument(
        "--augment", nargs="*", default=None, metavar="NAME", help="flip, shift, jitter (or none)"
    )
    p.add_argument(
        "--scorer", default=None,
        help="auto (fusion weight chosen by synthetic defects), student, memory or fused",
    )  # fmt: skip
    p.add_argument("--fusion-weight", type=float, default=None, help="the student's share, fused")
    p.add_argument("--memory-size", type=int, default=None, help="memory bank patches")
    p.add_argument("--edge", default=None, help="mask or exclude tiles across the fabric edge")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this time budget")
    p.add_argument(
        "--precision", default=None, help="fp32 (default), bf16 autocast, or auto (bf16 if native)"
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="tile/pixel metrics of a model on a category's test set")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--json", type=Path, default=None, help="write the metrics as JSON here")
    p.add_argument("--report", type=Path, default=None, help="write ROC curves and examples here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-weights", default=None)


def _add_datasets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="convert data sets")
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    a = dsub.add_parser("import-aitex", help="AITEX strips → MVTec layout per fabric")
    a.add_argument("src", type=Path)
    a.add_argument("dst", type=Path)
    a.add_argument("--tile", type=int, default=256)
    a.add_argument("--train-strips", type=int, default=15, help="first N good strips of a roll")
    a.add_argument("--fabric", action="append", default=None, help="fabric code (repeatable)")
    a.add_argument("--overwrite", action="store_true", help="replace existing fabric folders")
    a.add_argument(
        "--defect-strip-good-tiles",
        action="store_true",
        help="also test the defect strips' unmasked tiles as good (off by default)",
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on a synthetic roll, on this machine")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=None, help="training epochs (a fixed recipe)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--teacher-weights", default=None)


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="register a roll (folder or s3://bucket/prefix) and run it")
    p.add_argument("target", help="a folder with manifest.json and frames/, or s3://BUCKET/PREFIX")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollscan", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_evaluate, _add_datasets, _add_demo, _add_submit):
        add(sub)
    add_db_commands(sub)
    add_models_commands(sub)
    add_grade_commands(sub)
    add_scheduler_commands(sub)
    add_reprocess_commands(sub)
    add_results_commands(sub)
    return parser


def _train(args: argparse.Namespace) -> int:
    from distill.train import TrainConfig, train

    config = TrainConfig(
        teacher=args.teacher,
        teacher_weights=args.teacher_weights,
        variant=args.variant,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        tile=args.tile,
        seed=args.seed,
        device=args.device,
        fpr=args.fpr,
        level_weights=tuple(args.level_weights),
        max_minutes=args.max_minutes,
        **{
            key: value
            for key, value in (
                ("loss", args.loss), ("scorer", args.scorer), ("fusion_weight", args.fusion_weight),
                ("memory_size", args.memory_size), ("edge", args.edge),
                ("precision", args.precision),
                ("augment", None if args.augment is None else tuple(a for a in args.augment if a != "none")),
            )
            if value is not None
        },
    )  # fmt: skip
    card = train(args.data, args.out, config)
    m = card.metrics
    print(
        f"saved {args.out}: best epoch {m['best_epoch']}/{m['epochs']}, validation loss "
        f"{m['best_val_loss']:.4f}, fusion weight {card.fusion['weight']:g} (the student's share, "
        f"chosen on synthetic defects), threshold {card.threshold:.4f} (fpr {card.target_fpr})"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from distill.evaluate import evaluate, format_table

    result = evaluate(
        args.model,
        args.data,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch,
        teacher_weights=args.teacher_weights,
        report_dir=args.report,
        json_out=args.json,
    )
    print(format_table({args.data.name: result}))
    print(
        f"{result['n_good']} good and {result['n_defect']} defective test tiles; at the "
        f"calibrated threshold {result.get('fpr_at_threshold', float('nan')):.3f} of good tiles "
        f"flagged, {result.get('recall_at_threshold', float('nan')):.3f} of defective ones caught"
    )
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from distill.data.aitex import import_aitex

    counts = import_aitex(
        args.src,
        args.dst,
        tile=args.tile,
        n_train_strips=args.train_strips,
        fabrics=args.fabric,
        overwrite=args.overwrite,
        defect_strip_good=args.defect_strip_good_tiles,
    )
    print(json.dumps(counts, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from scheduler.demo import run_demo

    run_demo(
        args.workdir,
        json_out=args.json,
        teacher_weights=args.teacher_weights,
        **({} if args.epochs is None else {"epochs": args.epochs}),
    )
    return 0


def _submit(args: argparse.Namespace) -> int:
    from scheduler.submit import submit
    from storage.database import database_url, upgrade
    from storage.schema import Roll
    from worker.tasks import context

    ctx = context()
    if ctx.settings.embedded_database:
        upgrade(database_url(ctx.settings))
    submission = submit(ctx, args.target)
    with ctx.session() as session:
        roll = session.get(Roll, submission.roll_id)
        status, reason = roll.status, roll.failure_reason
    print(f"roll {submission.roll_id}: {len(submission.frames)} frames submitted, status {status}")
    if reason:
        print(f"  reason: {reason}")
    return 1 if status == "failed" else 0


COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "datasets": _datasets,
    "demo": _demo,
    "submit": _submit,
    "db": lambda args: args.db_handler(args),
    "models": lambda args: args.models_handler(args),
    "grade": lambda args: args.grade_handler(args),
    "scheduler": lambda args: args.scheduler_handler(args),
    "resume": lambda args: args.scheduler_handler(args),
    "reprocess": lambda args: args.reprocess_handler(args),
    "rolls": lambda args: args.results_handler(args),
    "defects": lambda args: args.results_handler(args),
    "report": lambda args: args.results_handler(args),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"rollscan {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
