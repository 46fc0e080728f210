"""The fabric's extent across each band: measured while scoring, stored, used at finalize.

Scoring measures, per block of rows, where the fabric lies (`distill.fabric_region`) and
stores it (`storage.fabric_extents`). Finalize turns the stored extents into a mask over the
¼-resolution score map: a ¼-res pixel is on fabric when the full-resolution columns it covers overlap the fabric's, so
the selvage itself is scored as fabric and only the table beside it is left out. Rows with no
stored extent (a roll scored before extents existed) count as fabric from side to side.
"""

from __future__ import annotations

import bisect

import numpy as np

from distill.fabric_region import Extent, band_extents


def measure_band(pixels: np.ndarray, pixels_row0: int, start: int, stop: int) -> list[Extent]:
    """Extents of the rows [start, stop) of a band whose pixels (read with their halo) begin
    at roll row `pixels_row0`."""
    return band_extents(pixels[start - pixels_row0 : stop - pixels_row0], row_start=start)


def quarter_fabric_mask(
    extents: list[Extent], q0: int, q1: int, width_q: int, scale: int
) -> np.ndarray:
    """(q1 − q0, width_q) booleans over ¼-res rows [q0, q1): True where the full-resolution
    block a ¼-res pixel covers overlaps the fabric (or no extent covers its rows).

    `extents` are in row order without overlaps (as stored): only those reaching into the
    rows are visited, so finalize's band-by-band calls cost O(log n) each, not O(n)."""
    mask = np.ones((q1 - q0, width_q), dtype=bool)
    first = bisect.bisect_right(extents, q0 * scale, key=lambda e: e.row_stop)
    stop = bisect.bisect_left(extents, q1 * scale, key=lambda e: e.row_start)
    for e in extents[first:stop]:
        lo = max(e.row_start // scale, q0)
        hi = min(-(-e.row_stop // scale), q1)
        if lo >= hi:
            continue
        c0, c1 = e.left // scale, -(-e.right // scale)
        mask[lo - q0 : hi - q0, :c0] = False
        mask[lo - q0 : hi - q0, c1:] = False
    return mask
