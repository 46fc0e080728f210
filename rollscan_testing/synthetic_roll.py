"""A synthetic roll on disk in the scanner's format: TIFF frames + manifest, defects at known places.

Used by `rollscan demo`, the pipeline tests and the load benchmark. The fabric comes from
`distill.data.synthetic`, far along the same procedural roll the demo model trains on, so the
training tiles never overlap the inspected rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile

from distill.data.synthetic import make_fabric
from distill.data.synthetic_defects import plant_defect

ROLL_ROW_OFFSET = 1_000_000  # rows of the procedural roll kept apart from training tiles


@dataclass
class PlantedDefect:
    """A defect planted in a synthetic roll at a known place, to check what the pipeline finds."""

    kind: str
    center_px: tuple[int, int]  # (row along the roll, column across)
    bbox_px: tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive) of the mask
    pixels: list[tuple[int, int]]  # every mask pixel (row, col), for overlap tests

    def center_mm(self, px_per_mm: float) -> tuple[float, float]:
        """(x_mm across, y_mm along) of the mask's bbox centre."""
        y0, x0, y1, x1 = self.bbox_px
        return ((x0 + x1) / 2 / px_per_mm, (y0 + y1) / 2 / px_per_mm)


def default_plan(
    rows: int, width: int, band_height: int = 2048
) -> list[tuple[str, tuple[int, int]]]:
    """Defects spread along the roll, one straddling each band boundary it can."""
    kinds = ("hole", "knot", "stain", "broken_pick", "slub", "hole", "knot")
    plan = []
    for k, boundary in enumerate(range(band_height, rows - 128, band_height)):
        plan.append((kinds[k % len(kinds)], (boundary, width // 3 + 97 * k)))
    for k, fraction in enumerate((0.12, 0.45, 0.8)):
        row = int(rows * fraction)
        if all(abs(row - r) > 400 for _, (r, _c) in plan):
            plan.append((kinds[(k + 3) % len(kinds)], (row, int(width * (0.2 + 0.3 * k)))))
    return plan


def write_synthetic_roll(
    dst: str | Path,
    roll_id: str,
    *,
    frames: int = 6,
    frame_rows: int = 1024,
    width: int = 2048,
    px_per_mm: float = 10.0,
    weave: str = "twill",
    seed: int = 7,
    fabric_type: str = "demo-twill",
    plan: list[tuple[str, tuple[int, int]]] | None = None,
    complete: bool = True,
    table: tuple[int, int, int] | None = None,
    dark: Sequence[tuple[int, int]] = (),
) -> tuple[dict, list[PlantedDefect]]:
    """Write `dst/manifest.json`, `dst/frames/000001.tif`, … and `dst/planted.json`.

    `table` = (left px, right px, grey level): the camera also sees that much of an even,
    slightly noisy table beside the fabric on each side (the manifest's width stays the
    image's, as a scanner that does not measure its fabric would write it). `dark`: row ranges
    [start, stop) where the camera saw no fabric (the lights off, the line's start before the
    fabric's): a camera's dark noise, from side to side."""
    dst = Path(dst)
    rows = frames * frame_rows
    image = make_fabric(rows, width, weave=weave, seed=seed, row_offset=ROLL_ROW_OFFSET)
    if table is not None:
        left, right, grey = table
        noise = np.random.default_rng(seed + 2).normal(grey, 2.0, (rows, left + right))
        sides = np.clip(noise, 0, 255).astype(image.dtype)
        image[:, :left], image[:, width - right :] = sides[:, :left], sides[:, left:]
    for start, stop in dark:
        noise = np.random.default_rng(seed + 3).normal(
            3.0, 0.8, (stop - start, width, *image.shape[2:])
        )
        image[start:stop] = np.clip(noise, 0, 255).astype(image.dtype)
    rng = np.random.default_rng(seed + 1)
    planted = []
    for kind, center in plan if plan is not None else default_plan(rows, width):
        mask = plant_defect(image, kind, rng=rng, center=center)
        ys, xs = np.nonzero(mask)
        planted.append(
            PlantedDefect(
                kind,
                (int(center[0]), int(center[1])),
                (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1),
                [(int(y), int(x)) for y, x in zip(ys, xs, strict=True)],
            )
        )
    (dst / "frames").mkdir(parents=True, exist_ok=True)
    for k in range(frames):
        block = image[k * frame_rows : (k + 1) * frame_rows]
        tifffile.imwrite(dst / "frames" / f"{k + 1:06d}.tif", block, compression="zlib")
    manifest = {
        "roll_id": roll_id,
        "fabric_type": fabric_type,
        "width_mm": width / px_per_mm,
        "px_per_mm": px_per_mm,
        "frames": frames,
        "complete": complete,
        "meta": {"loom": "synthetic", "weave": weave, "seed": seed},
    }
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (dst / "planted.json").write_text(
        json.dumps(
            [{k: v for k, v in asdict(p).items() if k != "pixels"} for p in planted], indent=2
        )
    )
    return manifest, planted


def write_training_tiles(
    dst: str | Path, *, rows: int, width: int, tile: int, weave: str, seed: int
) -> Path:
    """Good tiles over the roll's whole width (MVTec layout `dst/train/good`).

    Yarns differ from column to column, so a model must see the full width of the fabric it
    will inspect — tiles cut from one narrow strip would make every other column look new.
    """
    good = Path(dst) / "train" / "good"
    good.mkdir(parents=True, exist_ok=True)
    image = make_fabric(rows, width, weave=weave, seed=seed)
    k = 0
    for r in range(0, rows - tile + 1, tile):
        for c in range(0, width - tile + 1, tile):
            tifffile.imwrite(good / f"{k:05d}.tif", image[r : r + tile, c : c + tile])
            k += 1
    return Path(dst)


def match_defects(
    planted: list[PlantedDefect], found: list[dict], px_per_mm: float
) -> tuple[dict[int, int], list[int]]:
    """Planted index → found index for each planted defect a found box overlaps; unmatched found.

    `found` rows carry x0_mm, y0_mm, x1_mm, y1_mm; a found box matches a planted defect when it
    contains at least one pixel of the planted mask.
    """
    matched: dict[int, int] = {}
    used: set[int] = set()
    for j, d in enumerate(found):
        x0, x1 = d["x0_mm"] * px_per_mm, d["x1_mm"] * px_per_mm
        y0, y1 = d["y0_mm"] * px_per_mm, d["y1_mm"] * px_per_mm
        for i, p in enumerate(planted):
            if any(y0 <= y < y1 and x0 <= x < x1 for y, x in p.pixels):
                matched.setdefault(i, j)
                used.add(j)
    return matched, [j for j in range(len(found)) if j not in used]
