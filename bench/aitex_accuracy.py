"""Accuracy on real fabric: train on each AITEX roll's good strips, evaluate on the rest.

    python bench/aitex_accuracy.py [--data ../shared/data/aitex] [--fabric 01 …] [--json OUT]

Per fabric: import the strips as 256² tiles (first 15 good strips of the roll train, the rest
and the defect strips test), train with the official recipe (optionally within a time budget),
evaluate in fp32 and bf16, and print the table next to anomalib's PatchCore with the same
ImageNet teacher weights (figures given in issue #2, measured on the same split).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distill.data.aitex import import_aitex
from distill.evaluate import evaluate, format_table
from distill.inference import bf16_supported
from distill.train import TrainConfig, train

PATCHCORE = {
    "00": (0.988, 0.934),
    "01": (0.887, 0.945),
    "03": (0.848, 0.822),
    "04": (0.848, 0.959),
    "06": (0.916, 0.656),
}
GOAL = (0.95, 0.97)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=root.parent / "shared" / "data" / "aitex")
    parser.add_argument("--work", type=Path, default=root / "runs" / "aitex")
    parser.add_argument("--fabric", action="append", default=None)
    parser.add_argument("--teacher", default="efficientnet_lite0")
    parser.add_argument("--variant", default="residual")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="training budget per fabric"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no AITEX data at {args.data}")
    fabrics = args.fabric or sorted(PATCHCORE)
    tiles = args.work / "tiles"
    counts = import_aitex(args.data, tiles, fabrics=fabrics, overwrite=True)
    results, rows = {}, {}
    for code in fabrics:
        category = tiles / f"fabric{code}"
        model = args.work / f"fabric{code}.pt"
        started = time.perf_counter()
        config = TrainConfig(
            teacher=args.teacher,
            variant=args.variant,
            epochs=args.epochs,
            max_minutes=args.max_minutes,
        )
        card = train(category, model, config)
        train_s = time.perf_counter() - started
        fp32 = evaluate(
            model, category, precision="fp32", batch_size=8, report_dir=args.work / f"report{code}"
        )
        entry = {
            "counts": counts[f"fabric{code}"],
            "train_seconds": round(train_s),
            "epochs": card.metrics["epochs"],
            "fp32": fp32,
        }
        rows[f"{code} fp32"] = fp32
        if bf16_supported(__import__("torch").device("cpu")):
            entry["bf16"] = evaluate(
                model, category, precision="bf16", batch_size=8, progress=False
            )
            rows[f"{code} bf16"] = entry["bf16"]
        results[code] = entry
        print(format_table(rows))
    print()
    print(
        f"{'fabric':<8}{'tile AUROC':>12}{'pixel AUROC':>13}{'PatchCore tile/pixel':>22}{'goal met':>10}"
    )
    for code, entry in results.items():
        r = entry["fp32"]
        met = r["image_auroc"] >= GOAL[0] and r["pixel_auroc"] >= GOAL[1]
        pc = PATCHCORE.get(code, (float("nan"),) * 2)
        print(
            f"{code:<8}{r['image_auroc']:>12.3f}{r['pixel_auroc']:>13.3f}{pc[0]:>13.3f} / {pc[1]:.3f}{'yes' if met else 'no':>10}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
