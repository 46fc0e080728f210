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
width_mm = the other one (a diagonal scratch is not measured along its diagonal). The roll's
last ¼-res row or column covers a partial block: given the image's full-resolution size
(`image_px`, finalize passes it), a bbox ends at the image's edge, not up to scale − 1 pixels
past it (a defect's y1_mm beyond the roll's length; its centre and length follow the box).

Fragments of one flaw (`merge_groups`). A hole's rim, a broken pick that dips below the
threshold where the weave hides it, a crease seen as a dotted line: one physical flaw often
comes out as several components. With `merge_gap_mm = D`, two components are one defect when
their bounding boxes, in mm, are at most D apart across AND at most D apart along the roll
(the gap between two boxes along an axis is the empty space between their extents, 0 when they
touch or overlap) — repeated over the merged boxes until no two defects are that close, so
every reported defect is more than D away from every other along at least one axis. D = 0
merges only boxes that touch or overlap; None (the default here; finalize passes the setting
`ROLLSCAN_MERGE_GAP_MM`) merges nothing. It runs in `finish`, over the whole roll's
components, so fragments in different bands merge exactly as in one. A merged defect's bbox is
the union of its fragments', its pixels and area their sum, max score the max, mean score the
pixel-weighted mean. `min_area_px` applies after merging: fragments of one flaw add up, a lone
speck still drops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

_PAIRS_PER_CHUNK = 1 << 20  # candidate pairs examined at once by `merge_groups`' sweep (~175 MB)


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
    fragments: int = 1  # connected components merged into this defect (not stored)


class DefectFinder:
    """Streaming connected-component labeller over a roll's ¼-res score map.

    A pixel is a defect pixel iff its score > threshold (strict); NaN anywhere raises
    ValueError (a broken map must not pass as clean fabric). At `finish`, components within
    `merge_gap_mm` of each other become one defect (module docstring; None: no merging), then
    defects of fewer than `min_area_px` ¼-res pixels are dropped.
    """

    def __init__(
        self,
        threshold: float,
        px_per_mm_x: float,
        px_per_mm_y: float,
        scale: int = 4,
        connectivity: int = 8,
        min_area_px: int = 1,
        merge_gap_mm: float | None = None,
        image_px: tuple[int, int] | None = None,
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
        if merge_gap_mm is not None and not (math.isfinite(merge_gap_mm) and merge_gap_mm >= 0):
            raise ValueError(f"merge_gap_mm must be None or a number ≥ 0, got {merge_gap_mm}")
        self.threshold = float(threshold)
        self.px_per_mm_x = float(px_per_mm_x)
        self.px_per_mm_y = float(px_per_mm_y)
        self.scale = int(scale)
        self.connectivity = connectivity
        self.min_area_px = int(min_area_px)
        self.merge_gap_mm = None if merge_gap_mm is None else float(merge_gap_mm)
        # (rows, width) in full-resolution pixels: the boxes' far edges end there (see above)
        self.image_px = image_px
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
        bbox, count = self._bbox[roots], self._count[roots]
        smax, ssum = self._max[roots], self._sum[roots]
        fragments = np.ones(len(roots), dtype=np.int64)
        sx = self.scale / self.px_per_mm_x
        sy = self.scale / self.px_per_mm_y
        if self.merge_gap_mm is not None and len(roots) > 1:
            boxes_mm = np.stack(
                [bbox[:, 1] * sx, bbox[:, 0] * sy, (bbox[:, 3] + 1) * sx, (bbox[:, 2] + 1) * sy],
                axis=1,
            )
            group = merge_groups(boxes_mm, self.merge_gap_mm)
            bbox, count, smax, ssum, fragments = _aggregate(group, bbox, count, smax, ssum)
        keep = count >= self.min_area_px
        bbox, count, smax, ssum = bbox[keep], count[keep], smax[keep], ssum[keep]
        fragments = fragments[keep]
        # Ties on the top-left corner are possible (it need not be a pixel of the component):
        # the rest of the stats break them, so the numbering never depends on the banding.
        order = np.lexsort((smax, count, bbox[:, 3], bbox[:, 2], bbox[:, 1], bbox[:, 0]))
        pixel_area = self.scale * self.scale / (self.px_per_mm_x * self.px_per_mm_y)
        defects = []
        for no, k in enumerate(order, start=1):
            r0, c0, r1, c1 = (int(v) for v in bbox[k])
            x0, x1 = c0 * sx, (c1 + 1) * sx
            y0, y1 = r0 * sy, (r1 + 1) * sy
            if self.image_px is not None:
                y1 = min(y1, self.image_px[0] / self.px_per_mm_y)
                x1 = min(x1, self.image_px[1] / self.px_per_mm_x)
            w, h = x1 - x0, y1 - y0
            defects.append(
                Defect(
                    defect_no=no,
                    x_mm=(x0 + x1) / 2,
                    y_mm=(y0 + y1) / 2,
                    x0_mm=x0,
                    y0_mm=y0,
                    x1_mm=x1,
                    y1_mm=y1,
                    length_mm=max(w, h),
                    width_mm=min(w, h),
                    # its blocks' area, at most its box's (the last ones may be partial)
                    area_mm2=min(int(count[k]) * pixel_area, w * h),
                    max_score=float(smax[k]),
                    mean_score=float(ssum[k] / count[k]),
                    row0=r0,
                    col0=c0,
                    row1=r1,
                    col1=c1,
                    pixels=int(count[k]),
                    fragments=int(fragments[k]),
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
        slices = ndimage.find_objects(labels, max_label=n)
        self._parent[base:need] = np.arange(base, need)
        self._bbox[base:need] = [
            (rs.start + row0, cs.start, rs.stop - 1 + row0, cs.stop - 1) for rs, cs in slices
        ]
        self._count[base:need] = np.bincount(flat, minlength=n + 1)[1:]
        self._sum[base:need] = np.bincount(flat, weights=values.ravel(), minlength=n + 1)[1:]
        # a masked max over the labelled pixels alone: `ndimage.maximum` sorts the whole band
        # (4/5 of a wide roll's finalize: 0.35 s a band of 18,000 px, 1 ms this way)
        peaks = np.full(n + 1, -np.inf)
        on = flat > 0
        np.maximum.at(peaks, flat[on], values.ravel()[on])
        self._max[base:need] = peaks[1:]
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


def merge_groups(boxes_mm: np.ndarray, gap_mm: float) -> np.ndarray:
    """Group ids (0..g−1, by first appearance) of boxes that are one flaw by the merge rule.

    `boxes_mm`: (n, 4) rows x0, y0, x1, y1 — a box covers [x0, x1) × [y0, y1). Two boxes link
    when the gap between them is ≤ `gap_mm` across and ≤ `gap_mm` along (0 when they touch or
    overlap; a gap equal to `gap_mm` up to float rounding links); linked boxes are one group,
    transitively, and groups whose union boxes are that close are merged again until none are,
    so no two groups' boxes end up within `gap_mm` of each other on both axes. The result does
    not depend on the boxes' order.

    Cost: a sweep down the boxes sorted by top edge; each box is compared with the boxes that
    start no further than its bottom + `gap_mm` below its top, so O(n log n + P) for P such
    pairs — a roll's components lie along its length, and P stays near n.
    """
    boxes = np.asarray(boxes_mm, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError("boxes must be finite, with x0 ≤ x1 and y0 ≤ y1")
    if not (math.isfinite(gap_mm) and gap_mm >= 0):
        raise ValueError(f"gap_mm must be a number ≥ 0, got {gap_mm}")
    group = np.arange(len(boxes))
    while len(boxes) > 1:
        linked = _link(boxes, gap_mm)
        if linked.max() + 1 == len(boxes):
            break  # no two boxes within the gap: a fixed point
        group = linked[group]
        merged = np.empty((linked.max() + 1, 4))
        merged[:, :2] = np.inf
        merged[:, 2:] = -np.inf
        np.minimum.at(merged[:, 0], linked, boxes[:, 0])
        np.minimum.at(merged[:, 1], linked, boxes[:, 1])
        np.maximum.at(merged[:, 2], linked, boxes[:, 2])
        np.maximum.at(merged[:, 3], linked, boxes[:, 3])
        boxes = merged
    if not len(group):
        return group
    _, first, inverse = np.unique(group, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)  # renumber by first appearance
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse]


def _link(boxes: np.ndarray, gap: float) -> np.ndarray:
    """Connected components (ids in any order) of the graph 'boxes within `gap` on both axes'."""
    n = len(boxes)
    tol = 1e-9 * max(1.0, gap)  # millimetres from pixel counts × a float scale round
    order = np.argsort(boxes[:, 1], kind="stable")
    b = boxes[order]
    # candidates of box i (in top order): the boxes after it whose top is within gap of its
    # bottom; every other box is further than gap below or above it
    stop = np.searchsorted(b[:, 1], b[:, 3] + gap + tol, side="right")
    counts = np.maximum(stop - np.arange(1, n + 1), 0)
    ends = np.cumsum(counts)  # candidates of boxes 0..i
    heads, tails = [], []
    i = 0
    while i < n:  # boxes i..j−1 at once: about _PAIRS_PER_CHUNK candidate pairs
        done = int(ends[i - 1]) if i else 0
        j = max(int(np.searchsorted(ends, done + _PAIRS_PER_CHUNK, side="right")), i + 1)
        first = np.repeat(np.arange(i, j), counts[i:j])
        if len(first):
            # the k-th candidate of box a is box a + 1 + k
            second = first + 1 + np.arange(len(first)) - np.repeat(ends[i:j] - counts[i:j] - done,
                                                                   counts[i:j])  # fmt: skip
            p, q = b[first], b[second]
            gap_x = np.maximum(p[:, 0], q[:, 0]) - np.minimum(p[:, 2], q[:, 2])
            gap_y = np.maximum(p[:, 1], q[:, 1]) - np.minimum(p[:, 3], q[:, 3])
            near = (gap_x <= gap + tol) & (gap_y <= gap + tol)
            heads.append(first[near])
            tails.append(second[near])
        i = j
    rows = np.concatenate(heads) if heads else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(tails) if tails else np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    linked = np.empty(n, dtype=np.int64)
    linked[order] = labels
    return linked


def _aggregate(
    group: np.ndarray, bbox: np.ndarray, count: np.ndarray, smax: np.ndarray, ssum: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group: union bbox, summed pixels, max of maxima, summed scores, fragments."""
    g = int(group.max()) + 1
    box = np.empty((g, 4), dtype=np.int64)
    box[:, :2] = np.iinfo(np.int64).max
    box[:, 2:] = np.iinfo(np.int64).min
    for k, reduce in ((0, np.minimum), (1, np.minimum), (2, np.maximum), (3, np.maximum)):
        reduce.at(box[:, k], group, bbox[:, k])
    top = np.full(g, -np.inf)
    np.maximum.at(top, group, smax)
    return (
        box,
        np.bincount(group, weights=count, minlength=g).astype(np.int64),
        top,
        np.bincount(group, weights=ssum, minlength=g),
        np.bincount(group, minlength=g).astype(np.int64),
    )


def _grow(array: np.ndarray, capacity: int) -> np.ndarray:
    grown = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[: len(array)] = array
    return grown
