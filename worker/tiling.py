"""The tile grid of a roll: where tiles start, which tiles score a band, when a band may be scored.

A roll is H rows (along the roll, growing as frames arrive) by W columns. The model scores
square tiles cut with an overlap (256 px, stride 224); overlapping tile maps merge by maximum.

The grid is a function of ABSOLUTE roll coordinates, never of the band: rows start at
k·stride for every k with k·stride + tile ≤ H, plus one tile flush with the roll's end
(H − tile) when that grid stops short of H; columns likewise over W (`tile_origins`). A band
of rows is scored with exactly the grid tiles that touch it, read from the band plus a halo
(`band_tiles`, `band_read_window`), so the bands' maps laid end to end are the map of the
whole roll scored at once: the same tiles, each scored on the same pixels (a tile's float sums
may differ in the last bit with the batch it falls in, as convolutions choose their kernels by
the batch's shape).

Streaming. Only the flush tile depends on H, and H is known only once the roll is complete.
Any H ≥ rows_ingested is still possible before that, so a band may be scored early only if
no such H can change its tiles (`band_ready`). Once the rule says yes, the tiles of the band
are the same for every possible H, in particular for H = rows_ingested: a scorer of an
incomplete roll passes `roll_rows=rows_ingested`.

On the fabric. A camera sees the table beside the fabric; for a model trained so
(`TrainConfig.tile_layout == "fabric"`) the worker lays each tile row's columns on the fabric
(`fabric_band_tiles`, `row_columns`): the fabric, and the table on either
side, are each tiled as above as if they were images of their own, so the fabric's first columns
come from a tile that starts at its edge. The columns come from the fabric's extents over whole
blocks of rows (`worker.fabric_mask`), so they too are the same whichever band scores a tile;
each such `Tile` carries the columns it gives the band map.

Images smaller than a tile (H < tile or W < tile) get a single tile along that axis, padded
by reflection in `cut_tiles` so batches stay uniform; `stitch_max` crops the map back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

TILE = 256
STRIDE = 224

# Largest finite float16: scores are stored as float16, anything above would become inf.
_F16_MAX = float(torch.finfo(torch.float16).max)


def _check_grid(tile: int, stride: int) -> None:
    if tile < 1:
        raise ValueError(f"tile must be ≥ 1, got {tile}")
    if not 1 <= stride <= tile:  # a stride beyond the tile would leave uncovered gaps
        raise ValueError(f"stride must be in 1..tile ({tile}), got {stride}")


def tile_origins(length: int, tile: int = TILE, stride: int = STRIDE) -> list[int]:
    """Start offsets of tiles covering [0, length), the last one flush with the end.

    k·stride while k·stride + tile ≤ length, then length − tile if that grid falls short.
    A length ≤ tile gives [0]: the caller pads the short image to a full tile.
    """
    _check_grid(tile, stride)
    if length < 1:
        raise ValueError(f"length must be ≥ 1, got {length}")
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, stride))
    if origins[-1] + tile < length:
        origins.append(length - tile)
    return origins


def band_bounds(band_index: int, band_height: int, roll_rows: int) -> tuple[int, int]:
    """Rows [start, stop) of band `band_index`: the last band is clipped at `roll_rows`."""
    if band_height < 1:
        raise ValueError(f"band_height must be ≥ 1, got {band_height}")
    start = band_index * band_height
    if band_index < 0 or start >= roll_rows:
        raise ValueError(f"band {band_index} is outside a roll of {roll_rows} rows")
    return start, min(start + band_height, roll_rows)


def _band_row_origins(
    band_start: int, band_stop: int, roll_rows: int, tile: int, stride: int
) -> list[int]:
    """Row origins of the roll grid whose tiles touch rows [band_start, band_stop)."""
    if not 0 <= band_start < band_stop <= roll_rows:
        raise ValueError(
            f"band rows [{band_start}, {band_stop}) must be non-empty and inside "
            f"a roll of {roll_rows} rows"
        )
    # A linear scan of the roll's origins: a few thousand ints even for a 100 m roll, and it
    # keeps the grid defined in exactly one place (tile_origins).
    return [
        r for r in tile_origins(roll_rows, tile, stride) if r < band_stop and r + tile > band_start
    ]


def band_tiles(
    band_start: int,
    band_stop: int,
    roll_rows: int,
    width: int,
    tile: int = TILE,
    stride: int = STRIDE,
) -> list[tuple[int, int]]:
    """(row, col) origins, in absolute roll rows, of every grid tile touching the band's rows.

    Row-major order. Before the roll is complete pass `roll_rows=rows_ingested` (valid once
    `band_ready` says so).
    """
    rows = _band_row_origins(band_start, band_stop, roll_rows, tile, stride)
    cols = tile_origins(width, tile, stride)
    return [(r, c) for r in rows for c in cols]


class Tile(NamedTuple):
    """A tile at absolute (row, col) that gives the band map the columns [left, right)."""

    row: int
    col: int
    left: int
    right: int


def _span_columns(
    a: int, b: int, width: int, tile: int, stride: int, margin: int
) -> list[tuple[int, int, int]]:
    """(col, left, right) of the tiles covering columns [a, b) as an image of its own: the grid
    over the span, the last tile flush with its end (overlaps merge by maximum), `margin`
    trimmed off each tile edge inside it; a span narrower than a tile gets one tile, as far into
    it as the roll's width allows."""
    if b - a < tile:
        cols = [max(min(a, width - tile), 0)]
    else:
        cols = [a + c for c in tile_origins(b - a, tile, stride)]
    return [(c, *_kept_columns(c, a, b, tile, margin)) for c in cols]


def _kept_columns(c: int, a: int, b: int, tile: int, margin: int) -> tuple[int, int]:
    """The columns [left, right) the tile at column c gives a span [a, b) tiled as an image of
    its own: `margin` trimmed off each tile edge inside the span, none at its ends."""
    return (a if c <= a else c + margin, b if c + tile >= b else c + tile - margin)


def row_columns(
    width: int, tile: int, stride: int, margin: int, left: int = 0, right: int | None = None
) -> list[tuple[int, int, int]]:
    """(col, left, right) of one tile row's tiles when the fabric lies in columns [left, right)
    of all its rows: the fabric and the table on either side are each tiled apart, so every
    tile giving fabric columns lies wholly on it (the first starts at its edge) and a tile
    giving table columns gives nothing else.

    Why: a tile holding a strip of table beside the fabric maps the fabric's first millimetres
    high (the table and the tile's border both within the features' reach, a view no training
    tile gave); a tile starting at the edge sees it as the training tiles cut from the same
    edge do (`distill.data.aitex`). No margin, a fabric narrower than a tile, or an image
    narrower than a tile: the plain grid (`tile_origins`)."""
    right = width if right is None else right
    if width <= tile or right - left < tile or (left <= 0 and right >= width):
        return _span_columns(0, width, width, tile, stride, margin)
    spans = [(0, left)] * (left > 0) + [(left, right)] + [(right, width)] * (right < width)
    return [col for a, b in spans for col in _span_columns(a, b, width, tile, stride, margin)]


def fabric_band_tiles(
    band_start: int, band_stop: int, roll_rows: int, width: int, tile: int, stride: int,
    fabric_span: Callable[[int, int], tuple[int, int]],
) -> Iterator[Tile]:  # fmt: skip
    """`band_tiles` with each tile row's columns laid on the fabric (`row_columns`), row by row
    as they are needed: `fabric_span(start, stop)` gives the columns on fabric in all the rows
    [start, stop) — measured from whole blocks of rows, so a tile is the same whichever band
    scores it."""
    margin = (tile - stride) // 2
    for r in _band_row_origins(band_start, band_stop, roll_rows, tile, stride):
        left, right = fabric_span(r, min(r + tile, roll_rows))
        for c, lo, hi in row_columns(width, tile, stride, margin, left, right):
            yield Tile(r, c, lo, hi)


def band_read_window(
    band_start: int, band_stop: int, roll_rows: int, tile: int = TILE, stride: int = STRIDE
) -> tuple[int, int]:
    """Rows [read_start, read_stop) to read (band plus halo) so all the band's tiles fit.

    Clipped at `roll_rows`: only a roll shorter than one tile needs padding beyond it.
    """
    rows = _band_row_origins(band_start, band_stop, roll_rows, tile, stride)
    return rows[0], min(rows[-1] + tile, roll_rows)


def band_ready(
    band_index: int,
    band_height: int,
    rows_ingested: int,
    complete: bool,
    tile: int = TILE,
    stride: int = STRIDE,
) -> bool:
    """May band `band_index` be scored now, with a result that can never change later?

    Complete roll (rows_ingested = H): yes for every band of the roll (a band index past the
    roll's end raises ValueError).

    Incomplete roll: yes iff rows_ingested ≥ (band_index + 1)·band_height + tile.
    Why: the final H can still be any value ≥ rows_ingested. A roll of H rows ends with a
    flush tile at H − tile whenever H is off the regular grid, and that tile touches the band
    iff H < band_stop + tile. While rows_ingested < band_stop + tile − 1 at least two such H
    remain possible, and with stride ≥ 2 one of any two consecutive H is off the grid: the
    band's tiles could still change. At rows_ingested ≥ band_stop + tile no H can touch it,
    the band is full height, and its read window (which ends before band_stop + tile) is in.
    The rule is exact for stride ≥ 2 but for one corner: rows_ingested = band_stop + tile − 1
    with (rows_ingested − tile) on the grid, where it waits one row longer than needed (and
    with stride 1 no flush tile ever exists). tests/test_tiling.py checks this exhaustively.
    """
    _check_grid(tile, stride)
    if band_height < 1:
        raise ValueError(f"band_height must be ≥ 1, got {band_height}")
    if band_index < 0 or rows_ingested < 0:
        raise ValueError(f"band_index and rows_ingested must be ≥ 0: {band_index}, {rows_ingested}")
    start = band_index * band_height
    if complete:
        if start >= rows_ingested:
            raise ValueError(f"band {band_index} is outside a roll of {rows_ingested} rows")
        return True
    return rows_ingested >= start + band_height + tile


def cut_tiles(
    window: np.ndarray,
    window_row0: int,
    origins: Sequence[tuple[int, ...]],
    tile: int = TILE,
) -> np.ndarray:
    """Cut (N, tile, tile[, C]) tiles from `window`, whose first row is absolute row window_row0.

    `origins` are absolute (row, col). A tile running past the window is padded by reflection,
    which is only right for an image smaller than a tile, so the tile must then start at the
    image's first row/column (absolute 0); otherwise the caller's halo is wrong: ValueError.
    (A window cut short at absolute row 0 cannot be told apart from a short roll.)
    """
    if window.ndim not in (2, 3):
        raise ValueError(f"window must be (rows, width[, channels]), got shape {window.shape}")
    rows, width = window.shape[:2]
    out = np.empty((len(origins), tile, tile, *window.shape[2:]), dtype=window.dtype)
    extra = [(0, 0)] * (window.ndim - 2)
    for i, (r, c, *_) in enumerate(origins):
        top = r - window_row0
        if not (0 <= top < rows and 0 <= c < width):
            raise ValueError(
                f"tile origin ({r}, {c}) is outside the window rows "
                f"[{window_row0}, {window_row0 + rows}) × cols [0, {width})"
            )
        piece = window[top : top + tile, c : c + tile]
        short_r, short_c = tile - piece.shape[0], tile - piece.shape[1]
        if short_r or short_c:
            if (short_r and r != 0) or (short_c and c != 0):
                raise ValueError(
                    f"tile ({r}, {c}) runs past the window: read the band's full read window"
                )
            piece = np.pad(piece, [(0, short_r), (0, short_c), *extra], mode="reflect")
        out[i] = piece
    return out


class BandStitcher:
    """A band's full-resolution map, built batch by batch: per pixel the maximum over all tile
    maps covering it. Adding each batch as it comes keeps one band map in memory rather than
    every tile map of the band as well (for a 16 000 px band, hundreds of MiB).

    Tile maps are (tile, tile) at absolute row/column origins. Parts outside rows
    [band_start, band_stop) or beyond `width` (halo, padding) are cropped away. `margin` trims
    that many pixels off each tile edge that lies inside the roll (not on row 0, column 0, the
    last column or — when `roll_rows` is given — the last row): a CNN's map runs high along its
    zero-padded borders, and without the trim every seam between tiles would carry those values
    into the roll map. With margin ≤ overlap / 2 the trimmed tiles still cover every pixel. NaN
    propagates (np.maximum), so a broken model output is caught downstream, not hidden.
    """

    def __init__(
        self, band_start: int, band_stop: int, width: int, tile: int = TILE, *,
        margin: int = 0, roll_rows: int | None = None,
    ) -> None:  # fmt: skip
        if not 0 <= band_start < band_stop or width < 1:
            raise ValueError(f"empty band [{band_start}, {band_stop}) × {width}")
        self.band_start, self.band_stop, self.width, self.tile = band_start, band_stop, width, tile
        self.margin, self.roll_rows = margin, roll_rows
        self.shape = (band_stop - band_start, width)
        self._allocate()

    def _allocate(self) -> None:
        """The band map, all -inf, and which of its pixels a tile has covered."""
        self.out = np.full(self.shape, -np.inf, dtype=np.float32)
        self.covered = np.zeros(self.shape, dtype=bool)

    def add(self, maps: np.ndarray, origins: Sequence[tuple[int, ...]]) -> None:
        """Merge tile maps (N, tile, tile), in the order of `origins`, into the band map."""
        maps, tile, b0 = np.asarray(maps), self.tile, self.band_start
        if maps.shape != (len(origins), tile, tile):
            raise ValueError(f"maps must be ({len(origins)}, {tile}, {tile}), got {maps.shape}")
        for tile_map, origin in zip(maps, origins, strict=True):
            r, c = origin[:2]
            if (window := self.crop_window(*origin)) is None:
                continue  # a tile of the halo only
            top, bottom, left, right = window
            dst = self.out[top - b0 : bottom - b0, left:right]
            np.maximum(dst, tile_map[top - r : bottom - r, left - c : right - c], out=dst)
            self.covered[top - b0 : bottom - b0, left:right] = True

    def crop_window(
        self, r: int, c: int, left: int | None = None, right: int | None = None
    ) -> tuple[int, int, int, int] | None:
        """The absolute rows [top, bottom) × columns [left, right) the tile at (r, c) gives the
        band after cropping and trimming; None for a tile that gives it nothing. A `Tile`'s own
        columns (`row_columns`) replace the grid's."""
        tile, m = self.tile, self.margin
        trim_bottom = m if self.roll_rows is not None and r + tile < self.roll_rows else 0
        top = max(r + (m if r > 0 else 0), self.band_start)
        bottom = min(r + tile - trim_bottom, self.band_stop)
        if left is None or right is None:  # a grid tile: the whole width is its span
            left, right = _kept_columns(c, 0, self.width, tile, m)
        return None if top >= bottom or left >= right else (top, bottom, left, right)

    def result(self) -> np.ndarray:
        """The band map; ValueError if some pixel of the band is covered by no tile."""
        if not self.covered.all():
            raise ValueError("the tile origins do not cover the whole band")
        return self.out


def stitch_max(
    maps: np.ndarray,
    origins: Sequence[tuple[int, ...]],
    band_start: int,
    band_stop: int,
    width: int,
    tile: int = TILE,
    *,
    margin: int = 0,
    roll_rows: int | None = None,
) -> np.ndarray:
    """All of a band's tile maps at once through a `BandStitcher` (see there)."""
    stitcher = BandStitcher(band_start, band_stop, width, tile, margin=margin, roll_rows=roll_rows)
    stitcher.add(maps, origins)
    return stitcher.result()


def ceil_float16(values: torch.Tensor) -> torch.Tensor:
    """Round float32 values UP to the nearest float16 (after clipping to its finite range),
    on the tensor's device.

    Rounding to nearest could take a score just above the threshold to just below it when
    the map is stored as float16; rounding up never loses a defect pixel (it may add one
    whose score is within float16 precision, ~0.05 %, under the threshold).
    """
    clipped = values.float().clamp(-_F16_MAX, _F16_MAX)  # NaN passes through
    half = clipped.half()
    # the next float16 up is one step of the bit pattern: away from zero above it, towards it
    # below (a -0.0 is never below its value: it stands for a negative one)
    bits = half.view(torch.int16)
    up = torch.where(half < 0, bits - 1, bits + 1).view(torch.float16)
    return torch.where(half.float() < clipped, up, half).float()


def downsample_max(band_map: np.ndarray | torch.Tensor, factor: int = 4) -> np.ndarray:
    """Max-pool by `factor` (ceil sizes: a partial block at the edge is pooled over its real
    pixels only).

    A hot pixel anywhere survives; NaN too. Returns float32 holding float16 values rounded up,
    so the caller's float16 store is exact and never lowers a score. For band maps to
    concatenate into the whole roll's ¼ map, the band height must be a multiple of `factor`.
    Runs in torch where the map lies: a GPU's band map is pooled there and only the ¼ map
    crosses to the host; on the CPU torch's pooling ran 3.5× numpy's block maximum.
    """
    if band_map.ndim != 2:
        raise ValueError(f"band_map must be 2-D, got shape {tuple(band_map.shape)}")
    if factor < 1:
        raise ValueError(f"factor must be ≥ 1, got {factor}")
    full = torch.as_tensor(band_map).float()
    pooled = F.max_pool2d(full[None, None], factor, ceil_mode=True)[0, 0]
    return ceil_float16(pooled).cpu().numpy()
