"""Real fabric end to end: a roll built from one AITEX fabric's strips, through the whole pipeline.

    python bench/aitex_roll.py [--data ../shared/data/aitex] --fabric 01 [--model PATH] [--json OUT]

The roll (`rollscan_testing.aitex_fabric_roll.build_aitex_roll`): the fabric's good strips that do not
train (strips 16+ of its roll folder, in name order) with its defect strips interleaved at
known rows, 256 rows each, full width; the planted defects are the physical flaws of the defect
strips' masks: a strip's connected components merged by the rule finalize merges found
defects with (boxes within `ROLLSCAN_MERGE_GAP_MM`, default 10 mm, across and along are one
flaw; `--merge-gap-mm`), so one crease drawn as a dozen specks is one planted defect. The
table prints both counts: `flaws` (what recall and false alarms count) and `comps` (mask
components). The model: `--model PATH` reuses a checkpoint; otherwise one is
trained with `distill.train` on the tiles of the first 15 good strips (`--epochs`,
`--max-minutes`; the official recipe's 100 epochs by default). It is registered and
activated for the roll's fabric type, and the roll is submitted in this process (no broker)
on the configured database (the embedded server by default) and a local object store in a
temporary folder, then graded.

Figures: recall = planted defects overlapped by a reported defect / planted; false defects =
reported defects overlapping no planted mask, per metre of roll — both by the reported box
(`match_defects`' rule); the "strict" columns use the defects' own pixels instead, since an
under-trained model can report one defect whose box spans the whole roll. `--layout
per-strip` scores every strip as a roll of its own and sums the counts: a stacked roll's seams
between photographs draw false defects a real roll has none of
(`rollscan_testing.aitex_strip_rolls`). The threshold is the one the run applied
(`--roll-threshold`, default the setting `ROLLSCAN_ROLL_THRESHOLD`: the model's); the roll's
own estimate is printed beside it. The grade: ASTM
D5430, default rules. tiles/s = tiles scored / seconds from submit to finalized (model
loaded before). AITEX states no scale: lengths use a nominal 10 px/mm (`--px-per-mm`), so
metres, false defects per metre and the grade are nominal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from distill.data.aitex import import_aitex
from distill.teacher import DEFAULT_TEACHER
from distill.train import TrainConfig, train
from rollscan_testing.aitex_fabric_roll import (
    build_aitex_roll,
    report,
    run_aitex_roll,
    use_model,
)
from rollscan_testing.aitex_strip_rolls import split_strip_rolls
from rollscan_testing.roll_matching import AITEX_PX_PER_MM
from storage.database import database_url, make_engine, upgrade
from storage.objectstore_local import LocalStore
from storage.settings import get_settings
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer
from worker.roll_threshold import ROLL_THRESHOLD_MODES


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=root.parent / "shared" / "data" / "aitex")
    parser.add_argument("--fabric", required=True, help="AITEX fabric code: 00, 01, 03, 04, 06")
    parser.add_argument("--model", type=Path, default=None, help="reuse this checkpoint")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--max-minutes", type=float, default=None, help="training budget")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--strips-per-frame", type=int, default=4)
    parser.add_argument("--px-per-mm", type=float, default=AITEX_PX_PER_MM, help="nominal")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="keep roll, tiles, model here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge-gap-mm", type=float, default=None,
                        help="fragment merge gap in mm, planted and found (default: the "
                        "setting ROLLSCAN_MERGE_GAP_MM)")  # fmt: skip
    parser.add_argument("--layout", choices=("stacked", "per-strip"), default="stacked",
                        help="stacked: one roll of all strips (seams between photographs); "
                        "per-strip: one roll per strip, counts summed")  # fmt: skip
    parser.add_argument("--roll-threshold", choices=ROLL_THRESHOLD_MODES, default=None,
                        help="the threshold a run applies (default: the setting "
                        "ROLLSCAN_ROLL_THRESHOLD)")  # fmt: skip
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no AITEX data at {args.data}")
    code = args.fabric.removeprefix("fabric")
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="rollscan-aitex-roll-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, code, tmp)
    finally:
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(code, result)
    if args.json:
        args.json.write_text(json.dumps(report(result), indent=2) + "\n")


def run(args: argparse.Namespace, code: str, tmp: Path) -> dict:
    checkpoint = args.model
    if checkpoint is None:
        import_aitex(args.data, tmp / "tiles", fabrics=[code], overwrite=True, progress=False)
        checkpoint = tmp / f"fabric{code}.pt"
        config = TrainConfig(teacher=args.teacher, epochs=args.epochs, max_minutes=args.max_minutes)
        card = train(tmp / "tiles" / f"fabric{code}", checkpoint, config)
        print(f"trained {checkpoint}: {card.metrics.get('epochs')} epochs")
    options = {"device": args.device, "batch_size": args.batch}
    if args.merge_gap_mm is not None:
        options["merge_gap_mm"] = args.merge_gap_mm
    if args.roll_threshold is not None:
        options["roll_threshold"] = args.roll_threshold
    settings = get_settings(data_dir=tmp / "data", **options)
    if settings.database_url is None:  # the embedded server lives in the usual data dir
        settings = get_settings(**options)
    upgrade(database_url(settings))
    enqueuer = InlineEnqueuer()
    ctx = WorkerContext(settings, make_engine(settings), LocalStore(tmp / "objects"), enqueuer,
                        device=args.device, batch_size=args.batch)  # fmt: skip
    enqueuer.ctx = ctx
    model, fabric_type = use_model(ctx, checkpoint, f"aitex-{code}")
    roll_id = f"aitex{code}-{time.strftime('%Y%m%d-%H%M%S')}"
    roll_dir = tmp / "rolls" / roll_id
    manifest, planted = build_aitex_roll(
        args.data, code, roll_dir, roll_id, strips_per_frame=args.strips_per_frame,
        px_per_mm=args.px_per_mm, fabric_type=fabric_type, merge_gap_mm=settings.merge_gap_mm,
    )  # fmt: skip
    strips = json.loads((roll_dir / "strips.json").read_text())
    print(f"roll {roll_id}: {len(strips)} strips ({sum(s['defect'] is not None for s in strips)} "
          f"with defects), {manifest['frames']} frames, {len(planted)} planted flaws from "
          f"{sum(p.components for p in planted)} mask components (merge gap "
          f"{settings.merge_gap_mm:g} mm); model {model.version}")  # fmt: skip
    if args.layout == "stacked":
        result = run_aitex_roll(ctx, roll_dir, planted)
    else:
        rolls = split_strip_rolls(roll_dir, planted, tmp / "strip-rolls")
        result = sum_strip_rolls([run_aitex_roll(ctx, d, p) for d, p in rolls])
        print(f"scored as {len(rolls)} rolls of one strip each (no seams), counts summed")
    print(f"\n{'planted':<14}{'rows':>12}{'cols':>12}{'px':>8}{'comps':>6}   "
          f"found (bbox mm, max score)")  # fmt: skip
    for i, p in enumerate(planted):
        y0, x0, y1, x1 = p.bbox_px
        line = (f"{p.kind:<14}{f'{y0}–{y1}':>12}{f'{x0}–{x1}':>12}{len(p.pixels):>8}"
                f"{p.components:>6}   ")  # fmt: skip
        if i in result["matches"]:
            d = result["defects"][result["matches"][i]]
            line += (f"#{d['defect_no']} {d['x1_mm'] - d['x0_mm']:.1f}×{d['y1_mm'] - d['y0_mm']:.1f}"
                     f", {d['max_score']:.3f}")  # fmt: skip
        print(line + ("" if i in result["matches"] else "missed"))
    print(f"\nflawless fabric's level per strip (median block peak clear of every mask), "
          f"against the threshold applied {result['threshold']:.3g}:")  # fmt: skip
    for kind in ("good", "defect"):
        levels = [v for s, v in zip(strips, result["strip_levels"], strict=True)
                  if (s["defect"] is None) == (kind == "good")]  # fmt: skip
        print(f"  {kind:<7}" + " ".join(f"{v:.3g}" for v in levels))
    return result


SUMMED = ("planted", "planted_components", "matched", "matched_px", "false_defects",
          "false_defects_px", "found", "tiles", "seconds", "roll_length_m", "off_fabric",
          "false_at_seam", "false_at_selvage")  # fmt: skip


def sum_strip_rolls(results: list[dict]) -> dict:
    """One result for rolls scored one strip each: counts and lengths summed, rates of the
    sums, the grades counted; planted and found indices follow the strips' order."""
    total = results[0] | {k: sum(r[k] for r in results) for k in SUMMED}
    total |= {
        "recall": total["matched"] / total["planted"] if total["planted"] else None,
        "false_per_m": total["false_defects"] / total["roll_length_m"],
        "tiles_per_s": total["tiles"] / total["seconds"],
        "grade": " ".join(
            f"{g}×{n}" for g, n in sorted(Counter(r["grade"] for r in results).items())
        ),
        "points_per_100yd2": float("nan"),
        "roll_threshold": None,  # a strip has too few blocks for its own
        "strip_levels": [v for r in results for v in r["strip_levels"]],
        "extents": [e for r in results for e in r["extents"]],
        "defects": [d for r in results for d in r["defects"]],
        "matches": {},
    }
    planted = found = 0
    for r in results:
        total["matches"] |= {planted + i: found + j for i, j in r["matches"].items()}
        planted, found = planted + r["planted"], found + r["found"]
    return total


def print_table(code: str, r: dict) -> None:
    recall = "n/a" if r["recall"] is None else f"{r['recall']:.2f}"
    recall_px = "n/a" if not r["planted"] else f"{r['matched_px'] / r['planted']:.2f}"
    print()
    print(f"{'fabric':<7}{'comps':>6}{'flaws':>6}{'matched':>8}{'recall':>7}{'found':>6}"
          f"{'false':>6}{'false/m':>8}{'length m':>9}{'grade':>7}{'pts/100yd²':>11}{'tiles':>6}"
          f"{'tiles/s':>8}   {'strict: recall':>14}{'false':>6}")  # fmt: skip
    print(f"{code:<7}{r['planted_components']:>6}{r['planted']:>6}{r['matched']:>8}{recall:>7}"
          f"{r['found']:>6}{r['false_defects']:>6}{r['false_per_m']:>8.1f}"
          f"{r['roll_length_m']:>9.4f} {r['grade']:>6}{r['points_per_100yd2']:>11.1f}{r['tiles']:>6}"
          f"{r['tiles_per_s']:>8.1f}   {recall_px:>14}{r['false_defects_px']:>6}")  # fmt: skip
    strict_per_m = r["false_defects_px"] / r["roll_length_m"]
    fabric = [e for e in r["extents"] if e[3] > e[2]]  # blocks without fabric have no edges
    widths = np.array([right - left for _, _, left, right in fabric]) / r["px_per_mm"]
    own = "not estimated" if r["roll_threshold"] is None else f"{r['roll_threshold']:.4g}"
    print(f"threshold applied {r['threshold']:.4g} (the model's {r['model_threshold']:.4g}, "
          f"the roll's own {own})")  # fmt: skip
    print(
        f"false defects (box rule) within a quarter tile of a seam between two strips (two "
        f"photographs; a real roll has none): {r['false_at_seam']} of {r['false_defects']}"
    )
    print(
        f"false defects (box rule) the grading ignores at the selvage (whole box within "
        f"its margin of a measured edge): {r['false_at_selvage']} of {r['false_defects']}"
    )
    print(f"strict false / m {strict_per_m:.2f}; defects off the fabric: {r['off_fabric']}; "
          f"graded on the {r['width_source']} width, {r['graded_width_mm']:.1f} mm")  # fmt: skip
    if len(widths):
        lefts = [e[2] for e in fabric]
        rights = [e[3] for e in fabric]
        print(f"fabric extents: {len(widths)} blocks ({len(r['extents']) - len(widths)} without fabric), left edge {min(lefts)}–{max(lefts)} px, "
              f"right edge {min(rights)}–{max(rights)} px, width {widths.min():.1f}–"
              f"{widths.max():.1f} mm (median {np.median(widths):.1f})")  # fmt: skip
    print(f"(lengths at a nominal scale; model {r['model_version']}; pipeline "
          f"{r['seconds']:.1f} s; comps: the masks' connected components, flaws: those merged "
          f"as found defects are, what recall and false count; 'strict': a defect's own "
          f"pixels, not its box, must touch the mask)")  # fmt: skip


if __name__ == "__main__":
    main()
