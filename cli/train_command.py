"""`rollscan train`: train a model on one category in MVTec AD layout, calibrate it, save it."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from cli.arg_types import LazyChoices, options


def _teachers() -> list[str]:
    from distill.teacher import TEACHERS

    return list(TEACHERS)


def _held_out_modes() -> tuple[str, ...]:
    from distill.train_config import HELD_OUT_MODES

    return HELD_OUT_MODES


def _tile_layouts() -> tuple[str, ...]:
    from distill.train_config import TILE_LAYOUTS

    return TILE_LAYOUTS


def _memory_strides() -> tuple[int, ...]:
    from distill.train_config import MEMORY_STRIDES

    return MEMORY_STRIDES


def _variants() -> tuple[str, ...]:
    from distill.torch_model import VARIANTS

    return VARIANTS


def _unused_options(args: argparse.Namespace) -> str | None:
    """Options the chosen scorer would ignore: the engineer would think they trained another
    model than the one they got (its card records them all the same)."""
    scorer = args.scorer or "auto"
    memory = [f"--{n.replace('_', '-')}" for n in ("memory_size", "memory_levels", "memory_stride")
              if getattr(args, n) is not None]  # fmt: skip
    # `--augment none` (or bare) and `--loss pixel`, the defaults written out, change nothing
    student = ["--loss"] if args.loss not in (None, "pixel") else []
    student += ["--augment"] if set(args.augment or ()) - {"none"} else []
    if args.fusion_weight is not None and scorer != "fused":
        return (f"--fusion-weight applies to --scorer fused only (auto chooses the weight on "
                f"synthetic defects; student and memory fix it), not --scorer {scorer}")  # fmt: skip
    if memory and scorer == "student":
        return f"{', '.join(memory)}: --scorer student builds no memory bank"
    if student and scorer == "memory":
        return f"{', '.join(student)}: --scorer memory trains no student"
    return None


def _train(args: argparse.Namespace) -> int:
    from distill.calibration import MIN_CALIBRATION_TILES
    from distill.checkpoint import partial_checkpoint
    from distill.teacher import DEFAULT_TEACHER
    from distill.train import TrainConfig, train

    unused = _unused_options(args)
    if unused:
        raise ValueError(unused)
    config = TrainConfig(
        teacher=args.teacher or DEFAULT_TEACHER,
        level_weights=tuple(args.level_weights),
        **options(args, "teacher_weights variant epochs batch lr tile seed device fpr max_minutes "
                  "resize"),
        # not given: TrainConfig's defaults
        **options(args, "loss scorer fusion_weight memory_size memory_stride edge precision "
                  "held_out tile_layout teacher_cache_mb px_per_mm", skip_none=True),
        **({} if args.memory_levels is None else {"memory_levels": tuple(args.memory_levels)}),
        **({} if args.augment is None else {"augment": tuple(a for a in args.augment if a != "none")}),
    )  # fmt: skip
    try:
        card = train(args.data, args.out, config)
    except KeyboardInterrupt:
        partial = partial_checkpoint(args.out)
        kept = f"; the best student so far is in {partial}" if partial.exists() else ""
        print(f"\ninterrupted: {args.out} is as it was{kept} (uncalibrated: train again to the "
              "end to register a model)", file=sys.stderr)  # fmt: skip
        return 130
    m = card.metrics
    student = (
        "no student trained (the memory bank's map alone)" if not m["epochs"] else
        f"best epoch {m['best_epoch']}/{m['epochs']}, validation loss {m['best_val_loss']:.4f}"
    )  # fmt: skip
    how = "chosen on synthetic defects" if config.scorer == "auto" else f"--scorer {config.scorer}"
    print(
        f"saved {args.out}: {student}, fusion weight {card.fusion['weight']:g} (the student's "
        f"share, {how}), threshold {card.threshold:.4f} (fpr {card.target_fpr}, from "
        f"{m['n_held_out']} held-out good tiles)"
    )
    if m["n_held_out"] < MIN_CALIBRATION_TILES:
        print(
            f"warning: the threshold rests on {m['n_held_out']} held-out good tiles (the "
            f"{config.val_ratio:.0%} held out of {m['n_good_tiles']}): the share "
            f"of good tiles it flags may be far from {card.target_fpr}; train on at least "
            f"{math.ceil(MIN_CALIBRATION_TILES / config.val_ratio)} good tiles",
            file=sys.stderr,
        )
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `train` to the main parser's subparsers."""
    p = subparsers.add_parser("train", help="train a model on one category in MVTec AD layout")
    p.add_argument("--data", required=True, type=Path, help="category folder with train/good/")
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    p.add_argument("--teacher", default=None, choices=LazyChoices(_teachers), metavar="NAME",
                   help="one of %(choices)s (default efficientnet_lite1)")  # fmt: skip
    p.add_argument(
        "--teacher-weights", default=None, help="local weight file, or 'random' (tests only)"
    )
    p.add_argument("--variant", default="residual", choices=LazyChoices(_variants),
                   metavar="VARIANT", help="one of %(choices)s (default residual)")  # fmt: skip
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
    p.add_argument("--memory-levels", type=int, nargs="+", default=None, metavar="L",
                   help="the teacher's levels (0-3) the memory bank compares (default: 2 3 or 1 2 3, "
                   "chosen by synthetic defects)")  # fmt: skip
    p.add_argument("--memory-stride", type=int, default=None, choices=LazyChoices(_memory_strides),
                   metavar="N", help="input pixels per bank patch, the bank map's grid: one of "
                   "%(choices)s (default 8)")  # fmt: skip
    p.add_argument("--edge", default=None, help="mask or exclude tiles across the fabric edge")
    p.add_argument(
        "--tile-layout", default=None, choices=LazyChoices(_tile_layouts), metavar="grid|fabric",
        help="how the pipeline lays a roll's tiles for this model: grid (default) over the whole "
        "width, or fabric: laid on the fabric, the first tile starting at its edge (train on "
        "data holding such tiles: import-aitex --edge-start-tiles)",
    )  # fmt: skip
    p.add_argument(
        "--held-out", default=None, choices=LazyChoices(_held_out_modes), metavar="random|last",
        help="the 30 %% held out for selection and calibration: random tiles (default) or the "
        "last ones in name order (the fabric scanned last: calibration sees drift)",
    )  # fmt: skip
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop training the student once this time is spent (checked after each epoch)",
    )
    p.add_argument(
        "--resize", action="store_true",
        help="resize whole images (a benchmark such as MVTec AD) to the tile; without it the "
        "training images must be tiles of --tile px, the scale the worker scores rolls at",
    )  # fmt: skip
    p.add_argument(
        "--precision", default=None, help="fp32 (default), bf16 autocast, or auto (bf16 if native)"
    )
    p.add_argument(
        "--teacher-cache-mb", type=int, default=None, metavar="MIB",
        help="bf16 training keeps the frozen teacher's features of every tile (computed once, "
        "read every epoch) when they fit in this many MiB (default 4096; 0: recomputed each step)",
    )  # fmt: skip
    p.add_argument(
        "--px-per-mm", type=float, default=None, metavar="PX",
        help="the training tiles' resolution, px per mm across and along: recorded, and a "
        "worker refuses to score a roll scanned more than 15 %% away from it",
    )  # fmt: skip
    p.set_defaults(handler=_train)
    return p
