"""One roll per AITEX strip: the stacked roll's strips scored apart, so that no seam between two
photographs is scored.

`build_aitex_roll` stacks independent photographs; where two meet, each one's anomaly map
reaches into the other and a bright strip next to a dark one is a step no good tile showed,
so false defects gather at the seams (docs/benchmarks.md). A real roll has no such seams.
`split_strip_rolls` cuts a stacked roll into one roll per strip — the same pixels, masks and
planted flaws, moved to row 0 — for `bench/aitex_roll.py --layout per-strip`, which sums the
counts over them. `strip_levels` measures how high each strip's flawless fabric scores.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import tifffile

from rollscan_testing.synthetic_roll import PlantedDefect
from worker.band_scores import SCORE_SCALE


def _shifted(flaw: PlantedDefect, rows: int) -> PlantedDefect:
    y0, x0, y1, x1 = flaw.bbox_px
    return replace(
        flaw,
        center_px=(flaw.center_px[0] - rows, flaw.center_px[1]),
        bbox_px=(y0 - rows, x0, y1 - rows, x1),
        pixels=[(y - rows, x) for y, x in flaw.pixels],
    )


def split_strip_rolls(
    roll_dir: str | Path, planted: list[PlantedDefect], dst: str | Path
) -> list[tuple[Path, list[PlantedDefect]]]:
    """Write one roll per strip of the stacked roll at `roll_dir` under `dst` (roll ids
    ``<roll id>-sNN``); returns each roll's folder with its planted flaws, in strip order."""
    roll_dir, dst = Path(roll_dir), Path(dst)
    manifest = json.loads((roll_dir / "manifest.json").read_text())
    strips = json.loads((roll_dir / "strips.json").read_text())
    frames = sorted((roll_dir / "frames").glob("*.tif"))
    image = np.concatenate([tifffile.imread(f) for f in frames])
    rolls = []
    for k, strip in enumerate(strips):
        r0, r1 = strip["row"], strip["row"] + strip["rows"]
        inside = [_shifted(p, r0) for p in planted if r0 <= p.bbox_px[0] < r1]
        roll_id = f"{manifest['roll_id']}-s{k:02d}"
        out = dst / roll_id
        (out / "frames").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(out / "frames" / "000001.tif", image[r0:r1], compression="zlib")
        (out / "manifest.json").write_text(
            json.dumps(manifest | {"roll_id": roll_id, "frames": 1}, indent=2) + "\n"
        )
        (out / "strips.json").write_text(json.dumps([strip | {"row": 0}], indent=1) + "\n")
        rolls.append((out, inside))
    return rolls


def strip_levels(
    scores: np.ndarray,
    strips: list[dict],
    planted: list[PlantedDefect],
    block: int,
    scale: int = SCORE_SCALE,
) -> list[float]:
    """Per strip, how high its flawless fabric scores: the median peak of its `block`-wide
    columns of on-fabric ¼-res pixels clear of every planted mask, over the strip's interior
    rows — a quarter of a block from either end is left out, where the neighbouring strip, a
    different photograph, reaches into the map (a stacked roll's seams, which a real roll
    does not have)."""
    clear = np.isfinite(scores)
    for p in planted:
        yx = np.asarray(p.pixels, dtype=np.int64).reshape(-1, 2) // scale
        clear[yx[:, 0], yx[:, 1]] = False
    levels, margin = [], block // 4
    for strip in strips:
        q0 = strip["row"] // scale + margin
        q1 = (strip["row"] + strip["rows"]) // scale - margin
        peaks = [
            scores[q0:q1, c : c + block].max()
            for c in range(0, scores.shape[1], block)
            if q1 > q0 and clear[q0:q1, c : c + block].all()
        ]  # fmt: skip
        levels.append(float(np.median(peaks)) if peaks else float("nan"))
    return levels
