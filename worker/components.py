"""Defects of a roll: connected components of the thresholded ¼-resolution score map.

The map is fed band by band, in order (`DefectFinder.add_band`). Each band is labelled on its
own with `scipy.ndimage.label`; components touching the previous band's last row are joined
by union-find, so a defect straddling band boundaries (even one whose arms meet only several
bands later, like a U) comes out as one defect, exactly as labelling the whole roll at once.
Memory holds one band plus a few numbers per component, never the whole roll.

Geometry. A ¼-res pixel (row, col) covers full-resolution pixels [scale·row, scale·(row+1))
× [scale·col, scale·(col+1)); x runs across the roll (columns, px_per_mm_x), y along it
(rows, px_per_mm_y). Lengths come from the bounding box: ASTM D5430 measures a defect's
length along the warp or the weft, so length_mm = max(bbox width, bbox height) and
width_mm = the other one (a diagonal scratch is not measured along its diagonal). A bbox in
the roll's last ¼-res row or column may reach up to scale − 1 full-res pixels past the
image, since that ¼-res pixel covers a partial block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Defect:
    """One defect. Millimetres from the roll's top-left corner; bbox in ¼-res pixels."""

    defect_no: int  # 1..n along the roll: by bbox top, then left edge
    x_mm: float  # bbox centre, across
    y_mm: float  # bbox centre, along
    x0_mm: float
    y0_mm: float
    x1_mm: float
    y1_mm: float
    length_mm: float  # max(bbox width, bbox height)
    width_mm: float  # min(bbox width, bbox height)
    area_mm2: float  # defect pixels only, not the bbox
    max_score: float
    mean_score: float
    row0: int  # ¼-res bbox, inclusive bounds
    col0: int
    row1: int
    col1: int
    pixels: int  # ¼-res pixels above the threshold


class DefectFinder:
    """Streaming connected-component labeller over a roll's ¼-res score map.

    A pixel is a defect pixel iff its score > threshold (strict); NaN anywhere raises
    ValueError (a broken map must not pass as clean fabric). Components of fewer than
    `min_area_px` ¼-res pixels are dropped at `finish` (they may still grow until then).
    """

    def __init__(
        self,
        threshold: float,
        px_per_mm_x: float,
        px_per_mm_y: float,
        scale: int = 4,
        connectivity: int = 8,
        min_area_px: int = 1,
    ) -> None:
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        for name, value in (("px_per_mm_x", px_per_mm_x), ("px_per_mm_y", px_per_mm_y)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if scale < 1:
            raise ValueError(f"scale must be ≥ 1, got {scale}")
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
        if min_area_px < 1:
            raise ValueError(f"min_area_px must be ≥ 1, got {min_area_px}")
        self.threshold = float(threshold)
        self.px_per_mm_x = float(px_per_mm_x)
        self.px_per_mm_y = float(px_per_mm_y)
        self.scale = int(scale)
        self.connectivity = connectivity
        self.min_area_px = int(min_area_px)
        self._structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
        self._next_row = 0
        self._width: int | None = None
        self._last_row: np.ndarray | None = None  # global ids of the previous band's last row
        self._finished = False
        # Per-component stats, indexed by global id; valid at union-find roots only.
        self._n = 0
        self._parent = np.zeros(0, dtype=np.int64)
        self._bbox = np.zeros((0, 4), dtype=np.int64)  # row0, col0, row1, col1 (inclusive)
        self._count = np.zeros(0, dtype=np.int64)
        self._max = np.zeros(0, dtype=np.float64)
        self._sum = np.zeros(0, dtype=np.float64)

    def add_band(self, rows: np.ndarray, row0: int) -> None:
        """Add the next ¼-res score rows; `row0` is the ¼-res index of their first row."""
        if self._finished:
            raise RuntimeError("add_band after finish")
        band = np.asarray(rows)
        if band.ndim != 2:
            raise ValueError(f"rows must be 2-D, got shape {band.shape}")
        if row0 != self._next_row:
            raise ValueError(f"bands must come in order: expected row {self._next_row}, got {row0}")
        if self._width is None:
            self._width = band.shape[1]
        elif band.shape[1] != self._width:
            raise ValueError(f"band width {band.shape[1]} != roll width {self._width}")
        if band.shape[0] == 0:
            return
        # float64: compares exactly against the float threshold (a float32 compare would round
        # the threshold) and sums without visible rounding.
        values = band.astype(np.float64)
        if np.isnan(values).any():
            raise ValueError(f"NaN score in ¼-res rows {row0}..{row0 + band.shape[0] - 1}")
        labels, n = ndimage.label(values > self.threshold, structure=self._structure)
        base = self._n
        if n:
            self._append(labels, n, values, row0)
        first = np.where(labels[0] > 0, labels[0] + (base - 1), -1)
        if self._last_row is not None:
            self._join(self._last_row, first)
        self._last_row = np.where(labels[-1] > 0, labels[-1] + (base - 1), -1)
        self._next_row += band.shape[0]

    def finish(self) -> list[Defect]:
        """All defects, numbered 1..n by bbox top then left edge. Idempotent."""
        self._finished = True
        n = self._n
        roots = np.flatnonzero(self._parent[:n] == np.arange(n))
        roots = roots[self._count[roots] >= self.min_area_px]
        bbox, count = self._bbox[roots], self._count[roots]
        smax, ssum = self._max[roots], self._sum[roots]
        # Ties on the top-left corner are possible (it need not be a pixel of the component):
        # the rest of the stats break them, so the numbering never depends on the banding.
        order = np.lexsort((smax, count, bbox[:, 3], bbox[:, 2], bbox[:, 1], bbox[:, 0]))
        sx = self.scale / self.px_per_mm_x
        sy = self.scale / self.px_per_mm_y
        pixel_area = self.scale * self.scale / (self.px_per_mm_x * self.px_per_mm_y)
        defects = []
        for no, k in enumerate(order, start=1):
            r0, c0, r1, c1 = (int(v) for v in bbox[k])
            x0, x1 = c0 * sx, (c1 + 1) * sx
            y0, y1 = r0 * sy, (r1 + 1) * sy
            w, h = x1 - x0, y1 - y0
            defects.append(
                Defect(
                    defect_no=no,
                    x_mm=((c0 + c1) / 2 + 0.5) * sx,
                    y_mm=((r0 + r1) / 2 + 0.5) * sy,
                    x0_mm=x0,
                    y0_mm=y0,
                    x1_mm=x1,
                    y1_mm=y1,
                    length_mm=max(w, h),
                    width_mm=min(w, h),
                    area_mm2=int(count[k]) * pixel_area,
                    max_score=float(smax[k]),
                    mean_score=float(ssum[k] / count[k]),
                    row0=r0,
                    col0=c0,
                    row1=r1,
                    col1=c1,
                    pixels=int(count[k]),
                )
            )
        return defects

    # -- internals ---------------------------------------------------------------------------

    def _append(self, labels: np.ndarray, n: int, values: np.ndarray, row0: int) -> None:
        """Give the band's labels 1..n the global ids self._n..self._n+n−1, with their stats."""
        base, need = self._n, self._n + n
        if need > len(self._parent):  # grow by doubling: amortised O(1) per component
            cap = max(need, 2 * len(self._parent), 64)
            self._parent = _grow(self._parent, cap)
            self._bbox = _grow(self._bbox, cap)
            self._count = _grow(self._count, cap)
            self._max = _grow(self._max, cap)
            self._sum = _grow(self._sum, cap)
        flat = labels.ravel()
        index = np.arange(1, n + 1)
        slices = ndimage.find_objects(labels, max_label=n)
        self._parent[base:need] = np.arange(base, need)
        self._bbox[base:need] = [
            (rs.start + row0, cs.start, rs.stop - 1 + row0, cs.stop - 1) for rs, cs in slices
        ]
        self._count[base:need] = np.bincount(flat, minlength=n + 1)[1:]
        self._sum[base:need] = np.bincount(flat, weights=values.ravel(), minlength=n + 1)[1:]
        self._max[base:need] = ndimage.maximum(values, labels, index)
        self._n = need

    def _join(self, above: np.ndarray, below: np.ndarray) -> None:
        """Union components of two adjacent rows (global ids, −1 = background) that touch."""
        # below[j] touches above[j] and, with 8-connectivity, above[j − 1] and above[j + 1]
        pairs = [(above, below)]
        if self.connectivity == 8:
            pairs += [(above[:-1], below[1:]), (above[1:], below[:-1])]
        a = np.concatenate([p for p, _ in pairs])
        b = np.concatenate([q for _, q in pairs])
        touch = (a >= 0) & (b >= 0)
        if not touch.any():
            return
        for x, y in np.unique(np.stack([a[touch], b[touch]], axis=1), axis=0):
            self._union(int(x), int(y))

    def _find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = int(parent[i])
        return i

    def _union(self, i: int, j: int) -> None:
        ri, rj = self._find(i), self._find(j)
        if ri == rj:
            return
        root, other = min(ri, rj), max(ri, rj)
        self._parent[other] = root
        rb, ob = self._bbox[root], self._bbox[other]
        self._bbox[root] = (
            min(rb[0], ob[0]),
            min(rb[1], ob[1]),
            max(rb[2], ob[2]),
            max(rb[3], ob[3]),
        )
        self._count[root] += self._count[other]
        self._sum[root] += self._sum[other]
        self._max[root] = max(self._max[root], self._max[other])


def _grow(array: np.ndarray, capacity: int) -> np.ndarray:
    grown = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[: len(array)] = array
    return grown
