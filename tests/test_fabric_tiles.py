"""A tile row laid on the fabric (worker.tiling.row_columns, fabric_band_tiles): the fabric and
the table beside it are tiled apart, so the fabric's first columns are mapped by a tile that
starts at its edge — never by one holding a strip of table — every column is given to the band
map by exactly one tile, a roll with no margin keeps the plain grid, and bands still add up to
the whole roll."""

import numpy as np
import pytest

from distill.checkpoint import load_detector, random_checkpoint
from distill.fabric_region import BLOCK_ROWS, Extent, band_extents
from worker.band_scores import band_map, quarter_scores
from worker.fabric_mask import WindowFabric, band_window, block_reach, block_window
from worker.tiling import (
    BandStitcher,
    Tile,
    band_read_window,
    band_ready,
    band_tiles,
    fabric_band_tiles,
    row_columns,
    tile_origins,
)

TILE, STRIDE, MARGIN = 256, 224, 16


def _owners(columns: list[tuple[int, int, int]], width: int) -> np.ndarray:
    owners = np.zeros(width, int)
    for _, lo, hi in columns:
        owners[lo:hi] += 1
    return owners


@pytest.mark.parametrize(("left", "right"), [(600, 17400), (37, 18000), (0, 17990), (250, 900)])
def test_the_fabric_and_the_table_are_tiled_apart(left, right):
    width = 18000
    columns = row_columns(width, TILE, STRIDE, MARGIN, left, right)
    assert (_owners(columns, width) >= 1).all()  # every column (overlaps merge by maximum)
    for c, lo, hi in columns:
        assert c <= lo < hi <= c + TILE <= width
        if hi > left and lo < right:  # gives fabric columns: wholly on fabric
            assert left <= c and c + TILE <= right and left <= lo and hi <= right
        else:  # gives table columns only
            assert hi <= left or lo >= right
    on_fabric = [c for c, lo, hi in columns if lo < right and hi > left]
    assert min(on_fabric) == left and max(on_fabric) + TILE == right
    # the tile starting at the edge gives the band its own border: nothing trimmed there
    assert (left, left) in {(c, lo) for c, lo, _ in columns}


def test_no_margin_or_a_fabric_narrower_than_a_tile_keeps_the_plain_grid():
    width = 2000
    grid = [(c, c + (MARGIN if c > 0 else 0), min(c + TILE - (MARGIN if c + TILE < width else 0),
             width)) for c in tile_origins(width, TILE, STRIDE)]  # fmt: skip
    assert row_columns(width, TILE, STRIDE, MARGIN) == grid
    assert row_columns(width, TILE, STRIDE, MARGIN, 0, width) == grid
    assert row_columns(width, TILE, STRIDE, MARGIN, 900, 1100) == grid  # 200 px of fabric
    assert row_columns(200, TILE, STRIDE, MARGIN, 40, 160) == [(0, 0, 200)]  # a small image


def test_the_stitcher_takes_each_tiles_own_columns():
    width, rows = 1200, 256
    columns = row_columns(width, TILE, STRIDE, MARGIN, 300, 1100)
    tiles = [Tile(0, c, lo, hi) for c, lo, hi in columns]
    stitcher = BandStitcher(0, rows, width, TILE, margin=MARGIN, roll_rows=rows)
    # each tile's map is its index: the band map tells which tile gave each column
    stitcher.add(np.stack([np.full((TILE, TILE), k, np.float32) for k in range(len(tiles))]), tiles)
    given, expected = stitcher.result()[0], np.full(width, -1.0)
    for k, (_, lo, hi) in enumerate(columns):
        expected[lo:hi] = k  # a later tile's index is the higher one: the maximum
    np.testing.assert_array_equal(given, expected)


def _table_roll(rows: int, width: int, seed: int = 0) -> np.ndarray:
    """Textured fabric with a white table on either side whose edges move between blocks."""
    rng = np.random.default_rng(seed)
    image = rng.normal(90, 25, (rows, width)).clip(0, 255).astype(np.uint8)
    for k, (left, right) in enumerate([(70, 330), (86, 318), (78, 340)]):
        image[k * BLOCK_ROWS : (k + 1) * BLOCK_ROWS, :left] = 245
        image[k * BLOCK_ROWS : (k + 1) * BLOCK_ROWS, right:] = 245
    return image


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    path = random_checkpoint(tmp_path_factory.mktemp("m") / "m.pt", tile=64)
    return load_detector(path, precision="fp32", batch_size=3)[0]


def _scored(detector, image, start, stop, lay_on_fabric=True):
    rows, width, tile, stride = len(image), image.shape[1], 64, 56
    read_start, read_stop = block_window(*band_read_window(start, stop, rows, tile, stride), rows)
    pixels = image[read_start:read_stop]
    fabric = WindowFabric(pixels, read_start)
    if lay_on_fabric:
        origins = fabric_band_tiles(start, stop, rows, width, tile, stride, fabric.span)
    else:
        origins = band_tiles(start, stop, rows, width, tile, stride)
    return band_map(detector, pixels, read_start, origins, start, stop, width, tile,
                    (tile - stride) // 2, rows, fabric)  # fmt: skip


def test_the_fabrics_first_columns_are_mapped_by_the_tile_starting_at_its_edge(detector):
    image = _table_roll(BLOCK_ROWS, 400)
    (extent,) = band_extents(image)
    left = extent.left
    full = _scored(detector, image, 0, BLOCK_ROWS)
    # the tile row at rows 56..120 (inside the roll: trimmed by 4 above and below)
    alone = detector.predict(image[56:120, left : left + 64]).maps[0]
    # the same tile's map, scored in another batch (float sums may differ in the last bit)
    np.testing.assert_allclose(full[60:116, left : left + 30], alone[4:60, :30], rtol=1e-6)
    grid = _scored(detector, image, 0, BLOCK_ROWS, lay_on_fabric=False)
    assert not np.array_equal(grid[60:116, left : left + 30], full[60:116, left : left + 30])


def test_bands_laid_on_the_fabric_equal_the_whole_roll(detector):
    """The columns of a tile row come from whole blocks of rows: the same whichever band lays
    them out."""
    image = _table_roll(3 * BLOCK_ROWS, 400)
    rows = len(image)
    whole = _scored(detector, image, 0, rows)
    bands = [_scored(detector, image, k * 200, min((k + 1) * 200, rows)) for k in range(4)]
    # each tile scored in another batch: float sums may differ in the last bits (oneDNN's float32
    # kernels on a CPU with AMX), a tile laid elsewhere by whole units
    np.testing.assert_allclose(np.concatenate(bands), whole, rtol=1e-6)


def test_a_quarter_pixel_the_fabric_shares_with_the_table_pools_the_fabric_alone():
    full = np.zeros((8, 24), np.float32)
    full[:, :6] = 50.0  # the table scores high, up to the edge at column 6 …
    full[:, 18:] = 40.0  # … and from the edge at column 18
    full[:, 6:18] = np.arange(12, dtype=np.float32)  # the fabric
    extents = [Extent(100, 104, 6, 18), Extent(104, 108, 6, 18)]
    quarter, peak = quarter_scores(full, extents, row0=100)
    # ¼-res column 1 covers columns 4-7: table 4, 5 and fabric 6, 7 — the fabric's 0 and 1
    # only; column 4 covers 16-19: fabric 16, 17 (10, 11) and table 18, 19
    np.testing.assert_array_equal(quarter, [[50, 1, 5, 9, 11, 40]] * 2)
    assert peak == 50.0  # the band's maximum is the whole map's
    plain, _ = quarter_scores(full)
    np.testing.assert_array_equal(plain, [[50, 50, 5, 9, 40, 40]] * 2)


@pytest.mark.parametrize("tile", [64, 128, 256, 320, 384, 512, 640])
@pytest.mark.parametrize("band_height", [256, 512, 2048])
def test_a_streamed_band_waits_for_every_whole_block_it_reads(tile, band_height):
    """A band is ready (`band_ready` with `block_reach`) only once the whole blocks its window
    reads are in, and no final roll length can move that window: a tile of 320 px once let a
    band read its last block cut short, measuring that block's fabric on a few rows."""
    for stride in range(tile // 2, tile + 1, max(1, tile // 16)):
        for b in range(3):
            start, stop = b * band_height, (b + 1) * band_height
            first = next(
                rows
                for rows in range(stop, stop + 2 * BLOCK_ROWS + 2 * tile)
                if band_ready(b, band_height, rows, False, block_reach(tile), stride)
            )
            windows = {
                band_window(start, stop, h, tile, stride)
                for h in range(first, first + tile + stride + 2 * BLOCK_ROWS, 7)
            }
            window_stop = next(iter(windows))[1]
            assert len(windows) == 1 and window_stop <= first, (stride, b, first, windows)
