"""Decisions kept: tile and pixel AUROC of one trained model scored four ways — fp32 eager,
bf16 eager, bf16 compiled (torch.compile, inductor with freezing), int8 (features quantized by
OpenVINO/NNCF, map compiled) — on its test tiles.

int8 calibrates on the good tiles the checkpoint keeps; a checkpoint from before they were kept
calibrates on tiles picked the same way from the category's train/good.

    python bench/compiled_decisions.py --model runs/aitex/fabric01_m5.pt \\
        --data runs/aitex/tiles/fabric01 [--model … --data …] [--json OUT]

Pairs of --model/--data in order. The goal: every mode within 0.005 of fp32 eager.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from distill.checkpoint import load_detector, read_checkpoint
from distill.data.mvtec import Category, load_stack
from distill.evaluate import evaluate_detector
from distill.int8_features import pick_calibration_tiles

MODES = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16 compiled": {"precision": "bf16", "compile": True},
    "int8": {"precision": "int8", "compile": True},
}


def training_tiles(data: Path, tile: int) -> torch.Tensor:
    """Calibration tiles as training keeps them, from the category's good training tiles."""
    images = torch.from_numpy(load_stack(Category.open(data).train, tile))
    return pick_calibration_tiles(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, action="append", required=True)
    p.add_argument("--data", type=Path, action="append", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--modes", nargs="+", choices=list(MODES), help="fp32 and these (default all)")
    args = p.parse_args()
    if len(args.model) != len(args.data):
        raise SystemExit("give one --data per --model")
    results = {}
    print(f"{'model':<28}{'mode':<16}{'tile':>8}{'pixel':>8}{'Δ tile':>8}{'Δ pixel':>8}")
    for model, data in zip(args.model, args.data, strict=True):
        rows = {}
        card, state = read_checkpoint(model)
        kept = state.get("calibration_tiles")
        calibration = kept if kept is not None else training_tiles(data, card.tile)
        for name, options in MODES.items():
            if args.modes and name != "fp32" and name not in args.modes:
                continue
            detector, card = load_detector(model, device="cpu", batch_size=args.batch,
                                           calibration=calibration, **options)  # fmt: skip
            r = evaluate_detector(detector, data, card.tile, progress=False)
            rows[name] = {"image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"]}
            base = rows["fp32"]
            print(f"{model.name:<28}{name:<16}{r['image_auroc']:>8.4f}{r['pixel_auroc']:>8.4f}"
                  f"{r['image_auroc'] - base['image_auroc']:>+8.4f}"
                  f"{r['pixel_auroc'] - base['pixel_auroc']:>+8.4f}", flush=True)  # fmt: skip
        results[str(model)] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
