"""Accuracy on real fabric: train on each AITEX roll's good strips, evaluate on the rest.

    python bench/aitex_accuracy.py [--data ../shared/data/aitex] [--fabric 01 …] [--json OUT]
        [--loss pixel|flat|hard] [--augment flip jitter shift] [--teacher NAME]
        [--scorer auto|student|memory|fused] [--edge mask|exclude] [--epochs N]
        [--max-minutes M] [--precision fp32|bf16|auto]

Per fabric: import the strips as 256² tiles (first 15 good strips of the roll train, the rest
and the defect strips test; off-fabric pixels found by the fabric-region tracker are left out
of every figure, as the product leaves them out of its defects), train with the given recipe
(the memory bank and the fusion weight chosen by synthetic defects on held-out good tiles —
never by the test tiles), evaluate in fp32, and print one table: the model's figures, each
map's alone (student, memory bank), the operating point at the calibrated threshold, and
anomalib's PatchCore with the same ImageNet teacher weights (figures given in the issues,
measured on the same split).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from distill.augment import AUGMENTATIONS
from distill.data.aitex import import_aitex
from distill.evaluate import evaluate
from distill.inference import PRECISIONS
from distill.loss import LOSSES
from distill.malloc_tuning import keep_freed_memory
from distill.teacher import TEACHERS
from distill.train import train
from distill.train_config import EDGE_MODES, HELD_OUT_MODES, SCORERS, TILE_LAYOUTS, TrainConfig

PATCHCORE = {
    "00": (0.988, 0.934),
    "01": (0.887, 0.945),
    "03": (0.848, 0.822),
    "04": (0.848, 0.959),
    "06": (0.916, 0.656),
}
GOAL = (0.95, 0.97)


def _parser() -> argparse.ArgumentParser:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=root.parent / "shared" / "data" / "aitex")
    p.add_argument("--work", type=Path, default=root / "runs" / "aitex")
    p.add_argument("--fabric", action="append", default=None)
    p.add_argument("--teacher", default=TrainConfig.teacher, choices=sorted(TEACHERS))
    p.add_argument("--loss", default=TrainConfig.loss, choices=LOSSES)
    p.add_argument("--augment", nargs="*", default=list(TrainConfig.augment), choices=AUGMENTATIONS)
    p.add_argument("--scorer", default=TrainConfig.scorer, choices=SCORERS)
    p.add_argument("--edge", default=TrainConfig.edge, choices=EDGE_MODES)
    p.add_argument("--tile-layout", default=TrainConfig.tile_layout, choices=TILE_LAYOUTS,
                   help="fabric: import the tiles starting at the fabric's edges and lay the "
                   "pipeline's tiles on the fabric")  # fmt: skip
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--precision", default=TrainConfig.precision, choices=PRECISIONS)
    p.add_argument("--held-out", default=TrainConfig.held_out, choices=HELD_OUT_MODES)
    p.add_argument("--memory-levels", type=int, nargs="+", default=None, help="default: chosen")
    p.add_argument("--memory-stride", type=int, default=TrainConfig.memory_stride)
    p.add_argument("--memory-size", type=int, default=TrainConfig.memory_size, help="bank patches")
    p.add_argument("--max-minutes", type=float, default=None, help="training budget per fabric")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="training's seed")
    p.add_argument("--tag", default="", help="names this run's models and JSON")
    p.add_argument("--json", type=Path, default=None)
    return p


def _row(name: str, r: dict) -> str:
    def cell(key: str, width: int = 8) -> str:
        value = r.get(key, float("nan"))
        return f"{'–':>{width}}" if value != value else f"{value:>{width}.3f}"

    return f"{name:<18}{cell('image_auroc')}{cell('pixel_auroc')}{cell('aupro')}" + (
        f"{cell('fpr_at_threshold', 9)}{cell('recall_at_threshold', 9)}"
    )


def main() -> None:
    args = _parser().parse_args()
    keep_freed_memory()  # as `rollscan train` and `rollscan evaluate` run
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        raise SystemExit(f"no AITEX data at {args.data}")
    fabrics = args.fabric or sorted(PATCHCORE)
    tiles = args.work / "tiles"
    counts = import_aitex(args.data, tiles, fabrics=fabrics, overwrite=True,
                          edge_start_tiles=args.tile_layout == "fabric")  # fmt: skip
    results, lines = {}, []
    header = f"{'':<18}{'tile':>8}{'pixel':>8}{'AUPRO':>8}{'fpr@thr':>9}{'rec@thr':>9}"
    for code in fabrics:
        category = tiles / f"fabric{code}"
        model = args.work / f"fabric{code}{args.tag}.pt"
        config = TrainConfig(
            teacher=args.teacher, loss=args.loss, augment=tuple(args.augment),
            scorer=args.scorer, edge=args.edge, epochs=args.epochs, max_minutes=args.max_minutes,
            precision=args.precision, held_out=args.held_out, tile_layout=args.tile_layout,
            memory_levels=args.memory_levels and tuple(args.memory_levels), memory_stride=args.memory_stride,
            memory_size=args.memory_size, seed=args.seed,
        )  # fmt: skip
        started = time.perf_counter()
        card = train(category, model, config)
        train_s = time.perf_counter() - started
        fp32 = evaluate(model, category, precision="fp32", batch_size=8, progress=False,
                        report_dir=args.work / f"report{code}{args.tag}")  # fmt: skip
        results[code] = {
            "counts": counts[f"fabric{code}"], "train_seconds": round(train_s),
            "epochs": card.metrics["epochs"], "best_epoch": card.metrics["best_epoch"],
            "selection": card.metrics["selection"], "threshold": card.threshold, "fp32": fp32,
        }  # fmt: skip
        pc = PATCHCORE.get(code, (float("nan"),) * 2)
        lines += [
            f"fabric {code}: {card.metrics['epochs']} epochs in {train_s:.0f} s, fusion weight "
            f"{fp32['fusion_weight']:g} (chosen on synthetic defects), {fp32['tiles_per_s']:.1f} "
            f"tiles/s; test {fp32['n_good']} good / {fp32['n_defect']} defective tiles",
            _row(f"  {code} model", fp32),
            *(_row(f"    {name}", r) for name, r in fp32.get("scorers", {}).items()),
            f"  {code} PatchCore     {pc[0]:>8.3f}{pc[1]:>8.3f}",
        ]
        print(header, *lines, sep="\n", flush=True)
    tile = [results[c]["fp32"]["image_auroc"] for c in fabrics]
    pixel = [results[c]["fp32"]["pixel_auroc"] for c in fabrics]
    beats = [
        results[c]["fp32"]["image_auroc"] >= PATCHCORE[c][0]
        and results[c]["fp32"]["pixel_auroc"] >= PATCHCORE[c][1]
        for c in fabrics
        if c in PATCHCORE
    ]
    print(
        f"\nmean tile AUROC {np.mean(tile):.3f}, pixel AUROC {np.mean(pixel):.3f} (goal "
        f"{GOAL[0]} / {GOAL[1]}); at least PatchCore on both: {sum(beats)}/{len(beats)} fabrics"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": vars(args) | {"data": str(args.data),
                             "work": str(args.work), "json": str(args.json)},
                             "results": results}, indent=2, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
