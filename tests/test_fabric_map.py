"""A tile that holds the table beside the fabric maps its fabric from the fabric alone: the
table's scores never reach the selvage, tiles wholly on fabric keep their map bit for bit, and
in the pipeline each tile's mask comes from whole blocks of rows, so bands still add up to the
whole roll."""

import numpy as np
import pytest
import torch

from distill.anomaly_map import AnomalyMap
from distill.checkpoint import load_detector, random_checkpoint
from distill.fabric_region import BLOCK_ROWS, band_extents, region_mask
from distill.preprocess import edge_tiles
from worker.band_scores import band_map
from worker.fabric_mask import WindowFabric, block_window
from worker.tiling import band_read_window, band_tiles, cut_tiles

SIZE = (128, 128)
TABLE = 32  # the table covers the tiles' first 32 columns


def _edges(n: int, table_tiles: int = 1):
    fabric = np.ones((n, *SIZE), bool)
    fabric[:table_tiles, :, :TABLE] = False
    return edge_tiles(fabric, torch.zeros(n, 3, *SIZE))


def test_the_tables_scores_never_reach_the_fabric():
    """On fabric, the map does not depend on what the cells wholly off it score: bank and
    student maps alike."""
    smooth = AnomalyMap(4.0)
    grid = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))  # stride 8
    loud = grid.clone()
    loud[:, :, : TABLE // 8] = 50.0  # the table: not fabric, not in the bank
    edges = _edges(2)
    quiet_map, loud_map = smooth.upsampled(grid, SIZE, edges), smooth.upsampled(loud, SIZE, edges)
    assert torch.equal(quiet_map[0, :, TABLE:], loud_map[0, :, TABLE:])
    plain = smooth.upsampled(loud, SIZE)
    assert (plain[0, :, TABLE : TABLE + 16] - quiet_map[0, :, TABLE : TABLE + 16]).max() > 1.0
    # the student's levels (strides 4 to 32): its features changed only off the fabric
    gen = torch.Generator().manual_seed(1)
    teacher = [torch.randn(2, 8, 128 // s, 128 // s, generator=gen) for s in (4, 8, 16, 32)]
    student = [t + 0.3 * torch.randn(t.shape, generator=gen) for t in teacher]
    changed = [s.clone() for s in student]
    for s, stride in zip(changed, (4, 8, 16, 32), strict=True):
        s[:, :, :, : TABLE // stride] = -s[:, :, :, : TABLE // stride]
    quiet_map, loud_map = (
        smooth(teacher, student, SIZE, edges),
        smooth(teacher, changed, SIZE, edges),
    )
    assert torch.equal(quiet_map[0, :, TABLE:], loud_map[0, :, TABLE:])
    assert not torch.equal(smooth(teacher, student, SIZE)[0], smooth(teacher, changed, SIZE)[0])


def test_a_constant_score_stays_constant_up_to_the_edge_and_other_tiles_keep_their_map():
    smooth = AnomalyMap(4.0)
    grid = torch.ones(3, 16, 16)
    grid[:, :, : TABLE // 8] = 20.0
    edges = _edges(3, table_tiles=2)
    maps = smooth.upsampled(grid, SIZE, edges)
    torch.testing.assert_close(maps[:2, :, TABLE:], torch.ones(2, 128, 128 - TABLE))
    assert torch.equal(maps[2], smooth.upsampled(grid, SIZE)[2])  # wholly fabric: untouched
    assert edges.index.tolist() == [0, 1]
    assert edge_tiles(np.ones((3, *SIZE), bool), torch.zeros(3, 3, *SIZE)) is None
    with pytest.raises(ValueError, match="fabric must be"):
        edge_tiles(np.ones((2, *SIZE), bool), torch.zeros(3, 3, *SIZE))


def _table_roll(rows: int = 3 * BLOCK_ROWS + 40, width: int = 200, seed: int = 0) -> np.ndarray:
    """Textured fabric with a white table beside it whose edge moves between blocks."""
    rng = np.random.default_rng(seed)
    image = rng.normal(90, 25, (rows, width)).clip(0, 255).astype(np.uint8)
    for k, left in enumerate((40, 56, 48, 40)):
        image[k * BLOCK_ROWS : (k + 1) * BLOCK_ROWS, :left] = 245
    # the table reaches further in the lower part of block 1: only its whole rows tell its extent
    image[BLOCK_ROWS + 100 : 2 * BLOCK_ROWS, :72] = 245
    return image


def test_a_window_measures_whole_blocks_and_cuts_masks_like_its_tiles():
    image = _table_roll()
    assert block_window(300, 700, len(image)) == (256, 768)
    assert block_window(300, 800, len(image)) == (256, len(image))  # clipped at the roll
    assert block_window(0, 224, 5000) == (0, 256)
    fabric = WindowFabric(image, 0)
    extents = fabric.extents(0, len(image))
    assert extents == band_extents(image)  # the stored extents are the blocks' own
    assert [e.left for e in extents] == [40, 72, 48, 40]
    origins = [(0, 0), (224, 64), (448, 0)]
    want = cut_tiles(region_mask(extents, slice(0, len(image)), image.shape[1]), 0, origins, 64)
    np.testing.assert_array_equal(fabric.tile_masks(origins, 64), want)
    later = WindowFabric(image[BLOCK_ROWS:], BLOCK_ROWS)
    assert later.extents(BLOCK_ROWS, 2 * BLOCK_ROWS) == extents[1:2]
    with pytest.raises(ValueError, match="starts on a block"):
        WindowFabric(image[10:], 10)
    with pytest.raises(ValueError, match="outside the window"):
        later.block(0)


def test_bands_with_their_fabric_masks_equal_the_whole_roll(tmp_path):
    """Each band reads whole blocks around its tiles: a tile's mask, and so its map, is the
    same whichever band scores it."""
    detector, _ = load_detector(
        random_checkpoint(tmp_path / "m.pt", tile=64), precision="fp32", batch_size=1
    )
    image = _table_roll(rows=2 * BLOCK_ROWS + 40, width=160)
    rows, width, tile, stride = len(image), image.shape[1], 64, 56
    margin = (tile - stride) // 2

    def scored(start: int, stop: int, fabric: bool = True) -> np.ndarray:
        read_start, read_stop = block_window(
            *band_read_window(start, stop, rows, tile, stride), rows
        )
        pixels = image[read_start:read_stop]
        mask = WindowFabric(pixels, read_start) if fabric else None
        origins = band_tiles(start, stop, rows, width, tile, stride)
        return band_map(detector, pixels, read_start, origins, start, stop, width, tile, margin,
                        rows, mask)  # fmt: skip

    whole = scored(0, rows)
    bands = np.concatenate([scored(0, BLOCK_ROWS), scored(BLOCK_ROWS, 2 * BLOCK_ROWS),
                            scored(2 * BLOCK_ROWS, rows)])  # fmt: skip
    np.testing.assert_array_equal(bands, whole)
    plain = scored(0, rows, fabric=False)
    on_fabric = region_mask(band_extents(image), slice(0, rows), width)
    assert not np.array_equal(plain[on_fabric], whole[on_fabric])  # the masks were used
