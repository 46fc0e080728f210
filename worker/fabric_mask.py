"""The fabric's extent across each band: measured while scoring, stored, used at finalize.

Scoring measures, per block of rows, where the fabric lies (`distill.fabric_region`): each tile
row's columns (laid on the fabric: `worker.tiling.row_columns`), each tile's fabric mask (the
model maps the fabric from the fabric alone) and the band's stored extents
(`storage.fabric_extents`) come from the same blocks (`WindowFabric`). Finalize turns the
stored extents into a mask over the ¼-resolution score map: a ¼-res pixel is on fabric when the
full-resolution columns it covers overlap the fabric's, so the selvage itself is scored as fabric
and only the table beside it is left out. Rows with no stored extent (a roll scored before
extents existed) count as fabric from side to side.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from distill.fabric_region import BLOCK_ROWS, Extent, block_extents, region_mask
from worker.tiling import band_read_window, cut_tiles

# Rows of fabric beside a stretch without any (a leader, the lights off) that are not inspected:
# the model's features there see the dark rows, a view no good tile gave, and mapped the
# fabric's first and last rows as one roll-wide defect at each end of the stretch. Counted as
# not inspected by `roll_widths.unseen_mm` (storage/sql_views.py), which writes it out: keep both
UNSEEN_REACH = 64


def block_window(read_start: int, read_stop: int, roll_rows: int) -> tuple[int, int]:
    """The rows to read for a band's tiles, [read_start, read_stop), widened to whole blocks of
    `BLOCK_ROWS` (clipped at the roll's rows): every block is then measured on all its rows,
    whichever band reads it."""
    return read_start // BLOCK_ROWS * BLOCK_ROWS, min(
        -(-read_stop // BLOCK_ROWS) * BLOCK_ROWS, roll_rows
    )


def block_reach(tile: int) -> int:
    """How far a band's scoring reads past either end of the band: its tiles' reach (`tile`),
    rounded up to whole blocks by `block_window` (bands start and stop on block boundaries)."""
    return -(-tile // BLOCK_ROWS) * BLOCK_ROWS


def band_window(
    band_start: int, band_stop: int, roll_rows: int, tile: int, stride: int
) -> tuple[int, int]:
    """The rows a band's scoring reads: its tiles' rows (`band_read_window`, reaching into the
    neighbouring bands) widened to whole blocks (`block_window`)."""
    return block_window(
        *band_read_window(band_start, band_stop, roll_rows, tile, stride), roll_rows
    )


class WindowFabric:
    """Where the fabric lies in a window of a roll's rows that starts on a block boundary: the
    extent of each block (`BLOCK_ROWS` absolute rows, `distill.fabric_region.block_extent`)
    measured once, when the first tile row reaching it is laid out (`span`) or cut. A block's
    extent depends on its own rows alone, so a tile's columns and mask are the same whichever
    band scores it (bands laid end to end stay the map of the whole roll)."""

    def __init__(self, pixels: np.ndarray, row0: int) -> None:
        if row0 % BLOCK_ROWS:
            raise ValueError(f"a fabric window starts on a block of {BLOCK_ROWS} rows, not {row0}")
        self.pixels, self.row0 = pixels, row0
        self.stop = row0 + pixels.shape[0]
        self._blocks: dict[int, list[Extent]] = {}

    def block(self, k: int) -> list[Extent]:
        """The extents of block k (rows k·BLOCK_ROWS onwards, `block_extents`: one, or more
        where a run of rows without fabric lies within it), measured on first use."""
        if k not in self._blocks:
            start = k * BLOCK_ROWS
            stop = min(start + BLOCK_ROWS, self.stop)
            if not self.row0 <= start < stop:
                raise ValueError(f"block {k} is outside the window [{self.row0}, {self.stop})")
            self._blocks[k] = block_extents(
                self.pixels[start - self.row0 : stop - self.row0], start
            )
        return self._blocks[k]

    def extents(self, start: int, stop: int) -> list[Extent]:
        """The extents of the rows [start, stop), block by block (clipped to them)."""
        blocks = (self.block(k) for k in range(start // BLOCK_ROWS, -(-stop // BLOCK_ROWS)))
        return [
            Extent(max(e.row_start, start), min(e.row_stop, stop), e.left, e.right)
            for extents in blocks
            for e in extents
            if e.row_start < stop and e.row_stop > start
        ]

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """The columns [left, right) on fabric in every row of [start, stop) (clipped to the
        window) that holds any: the narrowest of the blocks those rows touch; (0, 0) where none
        holds fabric."""
        extents = self.extents(start, min(stop, self.stop))
        fabric = [e for e in extents if e.right > e.left] or extents
        return max(e.left for e in fabric), min(e.right for e in fabric)

    def tile_masks(self, origins: Sequence[tuple[int, ...]], tile: int) -> np.ndarray:
        """(N, tile, tile) booleans, True on fabric, for tiles at absolute `origins` ((row, col)
        or `Tile`), padded as `cut_tiles` pads the tiles' pixels."""
        top = min(r for r, *_ in origins)
        bottom = min(max(r for r, *_ in origins) + tile, self.stop)
        window = region_mask(self.extents(top, bottom), slice(top, bottom), self.pixels.shape[1])
        return cut_tiles(window, top, origins, tile)


def quarter_fabric_mask(
    extents: list[Extent], q0: int, q1: int, width_q: int, scale: int
) -> np.ndarray:
    """(q1 − q0, width_q) booleans over ¼-res rows [q0, q1): True where the full-resolution
    block a ¼-res pixel covers overlaps the fabric (or no extent covers its rows); False also
    within `UNSEEN_REACH` rows of a stretch without fabric (an empty extent).

    `extents` are in row order without overlaps (as stored): only those reaching into the
    rows are visited, so finalize's band-by-band calls cost O(log n) each, not O(n)."""
    mask = np.ones((q1 - q0, width_q), dtype=bool)
    first = bisect.bisect_right(extents, q0 * scale - UNSEEN_REACH, key=lambda e: e.row_stop)
    stop = bisect.bisect_left(extents, q1 * scale + UNSEEN_REACH, key=lambda e: e.row_start)
    for e in extents[first:stop]:
        reach = UNSEEN_REACH if e.right == e.left else 0
        lo = max((e.row_start - reach) // scale, q0)
        hi = min(-(-(e.row_stop + reach) // scale), q1)
        if lo >= hi:
            continue
        c0, c1 = e.left // scale, -(-e.right // scale)
        mask[lo - q0 : hi - q0, :c0] = False
        mask[lo - q0 : hi - q0, c1:] = False
    return mask
