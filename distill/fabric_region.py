"""Where the fabric is: its left and right edges across a band, per block of rows.

A line-scan camera sees the fabric and, beside it, the conveyor or light table. Each block of
rows (256) is cut into narrow column cells (16 px), and each cell is described by its mean grey
level, its contrast (standard deviation) and its texture energy across and along the roll
(mean absolute first differences). The fabric's body is the median cell of the middle third
(or, for a fabric guided against one side of a wide field, of a side's third: `_fabric_cells`).
From the body, the tracker walks cell by cell towards each side, comparing each cell with a
running reference (the median of the last cells accepted as fabric, so lighting that falls off
towards the sides is followed): a cell deviates when a statistic differs by more than the larger
of an absolute and a relative step. A deviating run is a defect inside the fabric, not its
edge, when fabric resumes within LOOKAHEAD cells; otherwise the edge is there. Both directions
of difference count, so a white fabric on a dark table and a dark fabric on a white one are
found alike, and so is a table as bright as the fabric but of another texture (for a fabric
against one side of the field, where the middle is table, the more textured side is taken for
the fabric: `_fabric_cells`). Where margin and
body differ in brightness, the edge is refined to the column where the grey level crosses
half-way between them. A band narrower than 6 cells, or with no margin, is fabric from side to
side. A block without texture in any cell, every cell black or saturated (`NO_TEXTURE`,
`BLANK_GREY`: a dark or saturated frame — lights off, a capped lens, the line running before the
fabric's start or past its end) holds no fabric: its
extent is empty (left = right = 0), so nothing there is ever reported as a defect, and the
length it covers is reported as not seen. Where the fabric starts or ends within a block, or the
lights go off for a while, the block's rows without texture get an empty extent of their own
(`block_extents`): scored as fabric, the dark rows were one roll-wide defect at every leader.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CELL = 16
BLOCK_ROWS = 256
LOOKAHEAD = 8  # cells (128 px): a deviating run followed by fabric within this is a defect
_REFERENCE_CELLS = 8  # the running reference: the median of the last cells accepted as fabric
# A cell deviates when a statistic differs from the reference by more than the larger of an
# absolute and a relative step: mean grey level, contrast, texture across and along.
_ABSOLUTE_STEP = np.array([12.0, 2.0, 1.5, 1.5])
_RELATIVE_STEP = np.array([0.15, 0.35, 0.35, 0.35])
_TEXTURE_LEAD = 1.5  # how much more textured than the middle's a side region must be to win
# Grey levels (of 255) of contrast and texture across and along that no cell of a block without
# fabric reaches: a camera's dark noise or a saturated frame stays well below; the least textured
# cell of any AITEX fabric strip has 5.2 / 3.6 / 2.6. Any one cell above it (a hole in a smooth
# fabric, the fabric's end coming in) keeps the whole block scored.
NO_TEXTURE = 2.0
# ...and that a frame without fabric is: black (the lights off, a capped lens) or saturated (a
# light table); a smooth, evenly lit fabric between them is fabric, however little its texture
BLANK_GREY = (24.0, 240.0)
# a run of rows without texture shorter than this is scored as fabric (a weft-faced fabric's
# row may be even); a run is widened to ROW_STEP rows (the score map's ¼ resolution) into the
# fabric, so that no dark row is ever scored
MIN_BLANK_ROWS = 16
ROW_STEP = 4


@dataclass(frozen=True)
class Extent:
    """Fabric columns [left, right) of the rows [row_start, row_stop) of a roll."""

    row_start: int
    row_stop: int
    left: int
    right: int

    @property
    def width(self) -> int:
        return self.right - self.left


def grey_levels(block: np.ndarray) -> np.ndarray:
    """(rows, width) float32 grey levels of a block (rows, width[, channels]): the mean of its
    channels, as float32 of numpy's float64 mean.

    uint8 with one or three channels (what cameras send) takes an exact shortcut, the same bits
    ~10× faster (for colour pixels it was most of the edge tracker's time): the channels'
    sum is an exact integer, and float32 division of it by 3 rounds as the float64 mean
    rounded to float32 does (checked for every sum in tests/test_fabric_region.py)."""
    block = np.asarray(block)
    if block.ndim == 2:  # grey levels already (float32: as they are, not copied)
        return np.asarray(block, dtype=np.float32)
    if block.dtype == np.uint8 and block.shape[2] == 1:
        return block[..., 0].astype(np.float32)
    if block.dtype == np.uint8 and block.shape[2] == 3:
        total = block[..., 0].astype(np.uint16)
        total += block[..., 1]
        total += block[..., 2]
        return np.divide(total, np.float32(3), dtype=np.float32)
    return block.mean(axis=2).astype(np.float32)


def cell_statistics(grey: np.ndarray, cell: int = CELL) -> np.ndarray:
    """(cells, 4) statistics of (rows, width) grey pixels: mean, std, mean |dx|, mean |dy|."""
    rows, width = grey.shape
    n = width // cell
    if n == 0:
        return np.zeros((0, 4), np.float32)
    body = grey[:, : n * cell].reshape(rows, n, cell)
    dx = np.abs(np.diff(body, axis=2)).mean(axis=(0, 2))
    dy = np.abs(np.diff(body, axis=0)).mean(axis=(0, 2)) if rows > 1 else np.zeros(n, np.float32)
    return np.stack([body.mean(axis=(0, 2)), body.std(axis=(0, 2)), dx, dy], axis=1)


def _deviates(stats: np.ndarray, reference: np.ndarray) -> np.ndarray:
    step = np.maximum(_ABSOLUTE_STEP, _RELATIVE_STEP * np.abs(reference))
    return (np.abs(stats - reference) > step).any(axis=-1)


def _walk_to_edge(stats: np.ndarray, body: np.ndarray) -> int:
    """Cells of fabric walking from the body (index 0 here) to the side: where fabric ends.

    The reference follows the fabric as it drifts (lighting falls off towards the sides); a
    deviating run counts as a defect, not the edge, when fabric resumes within LOOKAHEAD cells.
    """
    accepted = [body] * _REFERENCE_CELLS
    i, n = 0, len(stats)
    while i < n:
        reference = np.median(accepted[-_REFERENCE_CELLS:], axis=0)
        if not _deviates(stats[i], reference):
            accepted.append(stats[i])
            i += 1
            continue
        ahead = stats[i + 1 : i + 1 + LOOKAHEAD]
        resumed = np.nonzero(~_deviates(ahead, reference))[0]
        if len(resumed) == 0:
            return i
        i += 1 + int(resumed[0])
    return n


def _refine(profile: np.ndarray, edge: int, cell: int, inward: int) -> int:
    """The column near a cell edge where the grey level crosses half-way to the body's."""
    lo, hi = max(edge - cell, 0), min(edge + cell, len(profile))
    if hi - lo < 2:
        return edge
    outside = profile[max(edge - 2 * cell, 0) : max(edge - cell, 1)] if inward > 0 else (
        profile[min(edge + cell, len(profile) - 1) : edge + 2 * cell])  # fmt: skip
    inside = (
        profile[edge : edge + 2 * cell] if inward > 0 else profile[max(edge - 2 * cell, 0) : edge]
    )
    if len(outside) == 0 or len(inside) == 0:
        return edge
    a, b = float(np.median(outside)), float(np.median(inside))
    if abs(a - b) < 10:  # no brightness step to refine on: keep the cell boundary
        return edge
    window = profile[lo:hi]
    crossing = np.nonzero((window - (a + b) / 2) * np.sign(b - a) > 0)[0]
    if len(crossing) == 0:
        return edge
    return lo + int(crossing[0] if inward > 0 else crossing[-1] + 1)


def _region_from(stats: np.ndarray, seed: int, body: np.ndarray) -> tuple[int, int]:
    """The cells [left, right) of the region like `body` around the cell `seed`."""
    return seed - _walk_to_edge(stats[:seed][::-1], body), seed + _walk_to_edge(stats[seed:], body)


def _texture(stats: np.ndarray, cells: tuple[int, int]) -> float:
    """The median texture energy (across + along) of the cells [left, right); 0 for none (a
    body taken across the edge, half table and half fabric, matches no cell)."""
    if cells[1] <= cells[0]:
        return 0.0
    return float(np.median(stats[cells[0] : cells[1], 2] + stats[cells[0] : cells[1], 3]))


def _fabric_cells(stats: np.ndarray) -> tuple[int, int]:
    """The fabric's cells [left, right): the region around the middle — unless it reaches a side
    of the field (or is narrower than a third of it) and a region grown from a sixth from the
    other side reaches that side and is clearly more textured (`_TEXTURE_LEAD` times). A fabric
    guided against one side of a wide field covers half of it or less: the middle was the
    table, the region found the table's, and the fabric's own flaws were masked off as table.
    A middle region with table on both sides is a centred fabric and is kept, however grainy
    the table (a mesh belt beside a smooth fabric)."""
    n = len(stats)
    middle = _region_from(stats, n // 2, np.median(stats[n // 3 : n - n // 3], axis=0))
    if middle[0] > 0 and middle[1] < n and middle[1] - middle[0] >= n // 3:
        return middle  # table on both sides of it: a centred fabric, whatever the table's grain
    best, lead = middle, _TEXTURE_LEAD * _texture(stats, middle)
    for seed, side in ((n // 6, 0), (n - 1 - n // 6, n)):
        if best[0] <= seed < best[1]:
            continue  # inside the region already chosen: the same region
        around = stats[max(0, seed - n // 6) : seed + n // 6 + 1]
        region = _region_from(stats, seed, np.median(around, axis=0))
        # the fabric against a side reaches it; the middle's region then reaches the other
        if side in region and (texture := _texture(stats, region)) > lead:
            best, lead = region, texture
    return best


def block_extent(pixels: np.ndarray, cell: int = CELL) -> tuple[int, int]:
    """(left, right) fabric columns of one block of rows (H, W[, C]); (0, 0) for a block that
    holds no fabric (`NO_TEXTURE`)."""
    grey = grey_levels(pixels)
    width = grey.shape[1]
    stats = cell_statistics(grey, cell)
    n = len(stats)
    if n and _blank(stats[:, 0], stats[:, 1:].max(axis=1)).all():
        return 0, 0
    if n < 6:
        return 0, width
    left_cells, right_cells = _fabric_cells(stats)
    profile = grey.mean(axis=0)
    left = _refine(profile, left_cells * cell, cell, 1) if left_cells > 0 else 0
    right = _refine(profile, right_cells * cell, cell, -1) if right_cells < n else width
    return left, max(right, left + 1)


def _blank(mean: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """Which cells (their mean grey level and greatest texture) a frame without fabric gives."""
    return (texture < NO_TEXTURE) & ((mean < BLANK_GREY[0]) | (mean > BLANK_GREY[1]))


def _textured_rows(grey: np.ndarray, index: np.ndarray, cell: int) -> np.ndarray:
    """Which of the rows `index` (ascending) of (rows ≥ 2, width ≥ cell) grey pixels have a cell
    that is not blank: contrast and texture along the row, and difference from the rows beside."""
    rows, width = grey.shape
    n = width // cell
    body = grey[:, : n * cell].reshape(rows, n, cell)
    here = body[index]
    up, down = body[np.maximum(index - 1, 0)], body[np.minimum(index + 1, rows - 1)]
    texture = np.maximum.reduce([
        here.std(axis=2), np.abs(np.diff(here, axis=2)).mean(axis=2),
        np.abs(here - up).mean(axis=2), np.abs(down - here).mean(axis=2),
    ])  # fmt: skip
    return ~_blank(here.mean(axis=2), texture).all(axis=1)


def blank_runs(pixels: np.ndarray, cell: int = CELL) -> list[tuple[int, int]]:
    """The runs of rows [a, b) of a block (H, W[, C]) without texture in any cell (`_blank`),
    `MIN_BLANK_ROWS` long or more, widened to `ROW_STEP` rows into the fabric beside them."""
    grey = grey_levels(pixels)
    rows, width = grey.shape
    if width < cell or rows < 2:
        return []
    # such a run holds a row every MIN_BLANK_ROWS // 2: where none of those is blank (nearly
    # every block), there is none
    if _textured_rows(grey, np.arange(0, rows, MIN_BLANK_ROWS // 2), cell).all():
        return []
    blank = ~_textured_rows(grey, np.arange(rows), cell)
    change = np.diff(np.r_[0, blank.astype(np.int8), 0])
    runs: list[tuple[int, int]] = []
    for a, b in zip(np.flatnonzero(change == 1), np.flatnonzero(change == -1), strict=True):
        if b - a < MIN_BLANK_ROWS:
            continue
        a, b = int(a) // ROW_STEP * ROW_STEP, min(-(-int(b) // ROW_STEP) * ROW_STEP, rows)
        if runs and a <= runs[-1][1]:
            a = runs.pop()[0]
        runs.append((a, b))
    return runs


def block_extents(pixels: np.ndarray, row_start: int = 0) -> list[Extent]:
    """The extents of one block of rows (H, W[, C]) starting at row `row_start`: an empty one
    for each run of its rows without texture (`blank_runs`: a leader, the lights off for a
    while), and the fabric's (`block_extent`) over the rows between. Whether a whole block
    holds fabric is `block_extent`'s to say."""
    grey = grey_levels(pixels)  # once, for the runs and the extents alike
    rows = grey.shape[0]
    runs = blank_runs(grey)
    if not runs or runs == [(0, rows)]:
        return [Extent(row_start, row_start + rows, *block_extent(grey))]
    extents, done = [], 0
    for a, b in runs:
        if done < a:
            extents.append(Extent(row_start + done, row_start + a, *block_extent(grey[done:a])))
        extents.append(Extent(row_start + a, row_start + b, 0, 0))
        done = b
    if done < rows:
        extents.append(Extent(row_start + done, row_start + rows, *block_extent(grey[done:])))
    return extents


def band_extents(pixels: np.ndarray, row_start: int = 0, block: int = BLOCK_ROWS) -> list[Extent]:
    """Fabric extents of a band's rows, block by block of `block` rows (the last may be short):
    one per block, or more where the fabric starts or ends within it (`block_extents`)."""
    return [
        extent
        for start in range(0, pixels.shape[0], block)
        for extent in block_extents(pixels[start : start + block], row_start + start)
    ]


def region_mask(extents: list[Extent], rows: slice, width: int) -> np.ndarray:
    """Boolean (rows, width) mask, True on fabric, for the rows of `rows` covered by extents."""
    start, stop = rows.start, rows.stop
    mask = np.zeros((stop - start, width), dtype=bool)
    for e in extents:
        lo, hi = max(e.row_start, start), min(e.row_stop, stop)
        if lo < hi:
            mask[lo - start : hi - start, e.left : e.right] = True
    return mask
