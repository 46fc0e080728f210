"""The roll map of the HTML report: the whole roll downsampled, its length running left → right
in metres, cut into segments stacked down the page when it is long; defects outlined and
numbered, the fabric's measured edges drawn in cyan.

Each segment draws only the defects and edges that fall in it, in one collection each, and
numbers its defects only when they are at most `MAX_LABELS`: a 300 m roll has ~12,000 measured blocks, and a model gone
wrong thousands of defects, which drawn one artist at a time took minutes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from storage.zarr_rolls import RollArrays, overview_factor

MAP_MAX_SIDE = 2048  # a segment's long side in the overview (px)
MAP_WIDTH_IN, MAP_DPI = 12.0, 120
MAX_SEGMENT_ASPECT = 10.0  # a longer roll map is cut into segments stacked down the page
MAX_SEGMENTS = 8
MAX_LABELS = 150  # a segment with more defects has them outlined only (the table numbers them)

IMSHOW = {"vmin": 0, "vmax": 255, "aspect": "auto", "interpolation": "antialiased"}
EDGE = {"colors": "#00c8ff", "linewidths": 1.6}  # the fabric's measured edges, cyan
BOX = {"facecolor": "none", "edgecolor": "#ff2a2a", "linewidth": 1.3}
LABEL = {
    "xytext": (0, 2), "textcoords": "offset points", "ha": "center", "va": "bottom", "fontsize": 7,
    "color": "#ff2a2a", "fontweight": "bold", "annotation_clip": True,
    "bbox": {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
}  # fmt: skip


def edge_lines(extents: list[dict[str, Any]]) -> np.ndarray:
    """(n, 2, 2) line segments (along m, across mm) of the left and right edges, blocks in a
    row with the same edge joined into one segment; none where no fabric was seen."""
    extents = [x for x in extents if x["width_mm"] > 0]
    if not extents:
        return np.zeros((0, 2, 2))
    y0 = np.array([x["y0_mm"] for x in extents]) / 1000
    y1 = np.array([x["y1_mm"] for x in extents]) / 1000
    lines = []
    for key in ("left_mm", "right_mm"):
        edge = np.array([x[key] for x in extents])
        # a new segment where the edge moves, or the blocks are not contiguous
        starts = np.flatnonzero(np.r_[True, (edge[1:] != edge[:-1]) | (y0[1:] != y1[:-1])])
        ends = np.r_[starts[1:], len(edge)] - 1
        lines.append(np.stack([np.c_[y0[starts], edge[starts]], np.c_[y1[ends], edge[starts]]], 1))
    return np.concatenate(lines)


def draw_roll_map(
    roll: RollArrays,
    length: int,
    px_per_mm: tuple[float, float],
    defects: list[dict[str, Any]],
    extents: list[dict[str, Any]],
    path: Path,
) -> Figure:
    """Draw the map of rows [0, `length`) of `roll` (`px_per_mm`: across, along) to `path`."""
    along_m = length / px_per_mm[1] / 1000.0
    across_mm = roll.width / px_per_mm[0]
    segments = min(MAX_SEGMENTS, max(1, math.ceil(along_m * 1000 / across_mm / MAX_SEGMENT_ASPECT)))
    seg_m = along_m / segments
    overview = roll.overview(length, MAP_MAX_SIDE * segments).transpose(1, 0, 2)  # along → cols
    # the last pixel on each side holds fewer than f rows or columns: drawn at f, and cut off
    # at the roll's edge by the axes' limits (stretched to the edge, a 3-pixel-wide overview
    # drew its marks 0.7× across beside their boxes)
    f = overview_factor(length, roll.width, MAP_MAX_SIDE * segments)
    drawn = (overview.shape[1] * f / px_per_mm[1] / 1000.0, overview.shape[0] * f / px_per_mm[0])
    axis_in = min(4.0, max(0.6, MAP_WIDTH_IN * across_mm / (seg_m * 1000)))
    fig = Figure(figsize=(MAP_WIDTH_IN, segments * (axis_in + 0.55) + 0.2), layout="constrained")
    FigureCanvasAgg(fig)
    grey = overview.shape[2] == 1
    pixels = overview[:, :, 0] if grey else overview[:, :, :3]
    min_w, min_h = seg_m * 0.004, across_mm * 0.04  # a 1 mm defect must still show
    edges = edge_lines(extents)
    x0 = np.array([d["y0_mm"] for d in defects], dtype=float) / 1000  # along, metres
    x1 = np.array([d["y1_mm"] for d in defects], dtype=float) / 1000
    y0 = np.array([d["x0_mm"] for d in defects], dtype=float)
    y1 = np.array([d["x1_mm"] for d in defects], dtype=float)
    w, h = np.maximum(x1 - x0, min_w), np.maximum(y1 - y0, min_h)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    for k, ax in enumerate(fig.subplots(segments, 1, squeeze=False)[:, 0]):
        lo, hi = k * seg_m, (k + 1) * seg_m
        ax.imshow(
            pixels, cmap="gray" if grey else None, extent=(0, drawn[0], drawn[1], 0), **IMSHOW
        )
        ax.set_xlim(lo, hi)
        ax.set_ylim(across_mm, 0)
        ax.set_ylabel("across (mm)", fontsize=8)
        ax.tick_params(labelsize=8)
        inside = (edges[:, 1, 0] >= lo) & (edges[:, 0, 0] <= hi)
        ax.add_collection(LineCollection(edges[inside], **EDGE), autolim=False)
        here = np.flatnonzero((cx + w / 2 >= lo) & (cx - w / 2 <= hi))
        boxes = [Rectangle((cx[i] - w[i] / 2, cy[i] - h[i] / 2), w[i], h[i]) for i in here]
        ax.add_collection(PatchCollection(boxes, **BOX), autolim=False)
        for i in here if len(here) <= MAX_LABELS else ():
            ax.annotate(str(defects[i]["defect_no"]), (cx[i], cy[i] - h[i] / 2), **LABEL)
    ax.set_xlabel("along the roll (m)", fontsize=9)
    fig.savefig(path, dpi=MAP_DPI)
    return fig
