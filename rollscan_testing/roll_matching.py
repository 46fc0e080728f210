"""How a roll's reported defects are matched against the flaws planted in it: by box (a found
box holds a pixel of the flaw's mask), by pixel (the reported pixels touch the mask), and the
check that nothing is reported off the fabric's measured edges."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rollscan_testing.synthetic_roll import PlantedDefect
from worker.band_scores import SCORE_SCALE
from worker.components import merge_groups
from worker.fabric_mask import Extent

AITEX_PX_PER_MM = 10.0  # nominal: the data set states no resolution


def match_planted(
    planted: list[PlantedDefect], found: list[dict], px_per_mm: float
) -> tuple[dict[int, int], list[int]]:
    """`rollscan_testing.synthetic_roll.match_defects`'s rule (a found box matches a planted defect
    when it holds at least one pixel of its mask), vectorised for masks of 10⁵ pixels."""
    pixels = [np.asarray(p.pixels, dtype=np.int64).reshape(-1, 2) for p in planted]
    matched: dict[int, int] = {}
    used: set[int] = set()
    for j, d in enumerate(found):
        x0, x1 = d["x0_mm"] * px_per_mm, d["x1_mm"] * px_per_mm
        y0, y1 = d["y0_mm"] * px_per_mm, d["y1_mm"] * px_per_mm
        for i, (p, yx) in enumerate(zip(planted, pixels, strict=True)):
            py0, px0, py1, px1 = p.bbox_px
            if py1 <= y0 or py0 >= y1 or px1 <= x0 or px0 >= x1:
                continue
            ys, xs = yx[:, 0], yx[:, 1]
            if np.any((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)):
                matched.setdefault(i, j)
                used.add(j)
    return matched, [j for j in range(len(found)) if j not in used]


def pixel_matches(
    scores: np.ndarray,
    threshold: float,
    planted: list[PlantedDefect],
    scale: int = SCORE_SCALE,
    *,
    px_per_mm: float = AITEX_PX_PER_MM,
    merge_gap_mm: float | None = None,
) -> tuple[set[int], int]:
    """The stricter rule: (planted indices whose mask touches a reported defect's own pixels,
    reported defects touching no mask). `scores` is the roll's ¼-res map; finalize reports its
    8-connected components above `threshold` (all of them), merged by `merge_groups` with
    `merge_gap_mm` (finalize's setting; None: not merged), so labelling it again and merging
    alike gives the reported defects' pixels — a box that spans the roll matches no more than
    it covers."""
    labels, n = ndimage.label(scores > threshold, structure=np.ones((3, 3), dtype=bool))
    if merge_gap_mm is not None and n > 1:
        box = np.array(
            [(c.start, s.start, c.stop, s.stop) for s, c in ndimage.find_objects(labels)]
        )
        group = merge_groups(box * (scale / px_per_mm), merge_gap_mm)  # as finalize
        labels = np.concatenate([[0], group + 1])[labels]
        n = int(group.max()) + 1
    found, hit = set(), set()
    for i, p in enumerate(planted):
        yx = np.asarray(p.pixels, dtype=np.int64).reshape(-1, 2) // scale
        touched = labels[yx[:, 0], yx[:, 1]]
        if touched.any():
            found.add(i)
            hit.update(np.unique(touched[touched > 0]).tolist())
    return found, n - len(hit)


def off_fabric(found: list[dict], extents: list[Extent], px_per_mm: float, tol_mm: float) -> int:
    """Found defects whose box reaches past the fabric's measured edges (by more than one ¼-res
    pixel) in the rows it spans, or lies wholly in rows without fabric: finalize must never
    report one."""
    count = 0
    for d in found:
        rows = [e for e in extents if e.row_start < d["y1_mm"] * px_per_mm
                and e.row_stop > d["y0_mm"] * px_per_mm]  # fmt: skip
        if rows and all(e.right == e.left for e in rows):
            count += 1
            continue
        rows = [e for e in rows if e.right > e.left]
        left = min((e.left for e in rows), default=0) / px_per_mm
        right = max((e.right for e in rows), default=10**9) / px_per_mm
        count += d["x0_mm"] < left - tol_mm or d["x1_mm"] > right + tol_mm
    return count
