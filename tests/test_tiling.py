"""Tile grid, band scoring and streaming readiness (worker/tiling.py).

The "model" here is a deterministic function of a tile's CONTENT (smoothing with reflect
edges plus a per-tile offset), like a real detector: a pixel's value depends on which tile
it came from and on the halo rows around it, so the max-merge and the halo both matter.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from scipy import ndimage

from worker.tiling import (
    BandStitcher,
    band_bounds,
    band_read_window,
    band_ready,
    band_tiles,
    cut_tiles,
    downsample_max,
    stitch_max,
    tile_origins,
)


def fake_model(tiles: np.ndarray) -> np.ndarray:
    x = tiles.astype(np.float32)
    if x.ndim == 4:
        x = x.mean(axis=3)
    smooth = ndimage.gaussian_filter(x, sigma=(0, 1.5, 1.5), mode="reflect")
    return (smooth + 0.5 * x.std(axis=(1, 2), keepdims=True)).astype(np.float32)


def reference_map(image: np.ndarray, tile: int, stride: int) -> np.ndarray:
    """The definition, written independently: every grid tile scored, merged by maximum."""
    h, w = image.shape[:2]
    out = np.full((h, w), -np.inf, dtype=np.float32)
    for r in tile_origins(h, tile, stride):
        for c in tile_origins(w, tile, stride):
            piece = image[r : r + tile, c : c + tile]
            pad = [(0, tile - piece.shape[0]), (0, tile - piece.shape[1])]
            piece = np.pad(piece, pad + [(0, 0)] * (image.ndim - 2), mode="reflect")
            m = fake_model(piece[None])[0][: min(tile, h - r), : min(tile, w - c)]
            region = out[r : r + tile, c : c + tile]
            np.maximum(region, m, out=region)
    return out


def score_band(
    image: np.ndarray, start: int, stop: int, roll_rows: int, tile: int, stride: int
) -> np.ndarray:
    """What the score task does, reading only the band's read window of `image`."""
    read_start, read_stop = band_read_window(start, stop, roll_rows, tile, stride)
    assert read_stop <= len(image), "the read window needs rows that are not there yet"
    window = image[read_start:read_stop]
    origins = band_tiles(start, stop, roll_rows, image.shape[1], tile, stride)
    maps = fake_model(cut_tiles(window, read_start, origins, tile))
    return stitch_max(maps, origins, start, stop, image.shape[1], tile)


def score_by_bands(image: np.ndarray, band_height: int, tile: int, stride: int) -> np.ndarray:
    h = len(image)
    bands = [
        score_band(image, *band_bounds(b, band_height, h), h, tile, stride)
        for b in range(-(-h // band_height))
    ]
    return np.concatenate(bands)


# -- tile_origins --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (1, [0]),
        (100, [0]),
        (256, [0]),
        (257, [0, 1]),
        (480, [0, 224]),  # tile + stride: the grid lands on the end, no extra tile
        (481, [0, 224, 225]),
        (704, [0, 224, 448]),  # tile + 2·stride
        (1000, [0, 224, 448, 672, 744]),
    ],
)
def test_tile_origins_defaults(length, expected):
    assert tile_origins(length) == expected


@pytest.mark.parametrize("length", [*range(1, 120), 1000, 1001, 4096])
@pytest.mark.parametrize(("tile", "stride"), [(32, 24), (16, 16), (10, 3)])
def test_tile_origins_cover_flush_and_overlap(length, tile, stride):
    o = tile_origins(length, tile, stride)
    assert o[0] == 0 and o == sorted(set(o))
    if length <= tile:
        assert o == [0]
        return
    assert o[-1] + tile == length  # flush with the end, never past it
    assert all(0 < b - a <= stride for a, b in pairwise(o))  # no gaps
    assert o[:-1] == list(range(0, stride * (len(o) - 1), stride))  # absolute grid


@pytest.mark.parametrize(("length", "tile", "stride"), [(0, 256, 224), (10, 16, 17), (10, 16, 0)])
def test_tile_origins_rejects(length, tile, stride):
    with pytest.raises(ValueError):
        tile_origins(length, tile, stride)


# -- band by band == whole roll ------------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "w", "band_height"),
    [
        (200, 70, 40),
        (203, 70, 40),  # H not a multiple of the band height
        (203, 70, 7),  # bands shorter than a tile
        (203, 70, 1),
        (203, 70, 500),  # one band
        (20, 70, 8),  # H < tile
        (203, 20, 64),  # W < tile
        (5, 3, 4),  # both smaller than a tile
        (32, 32, 16),  # exactly one tile
    ],
)
def test_bands_equal_whole_roll(h, w, band_height):
    rng = np.random.default_rng(h * 1000 + w + band_height)
    image = rng.integers(0, 256, (h, w), dtype=np.uint8)
    whole = reference_map(image, 32, 24)
    by_bands = score_by_bands(image, band_height, 32, 24)
    assert by_bands.dtype == np.float32
    np.testing.assert_array_equal(by_bands, whole)


def test_bands_equal_whole_roll_default_tiles_rgb():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (1100, 300, 3), dtype=np.uint8)
    whole = reference_map(image, 256, 224)
    np.testing.assert_array_equal(score_by_bands(image, 256, 256, 224), whole)


def test_halo_matters():
    """Guard for the test above: scoring a band from its own rows alone differs."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (200, 50), dtype=np.uint8)
    start, stop = 40, 80
    origins = band_tiles(start, stop, 200, 50, 32, 24)
    padded = np.pad(image[start:stop], [(start, 200 - stop), (0, 0)])  # no halo: zeros
    maps = fake_model(cut_tiles(padded, 0, origins, 32))
    naive = stitch_max(maps, origins, start, stop, 50, 32)
    assert not np.array_equal(naive, reference_map(image, 32, 24)[start:stop])


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_stitching_batch_by_batch_equals_all_at_once(batch):
    """`score_band` adds each batch's maps as they come: the band map must not change."""
    rng = np.random.default_rng(5)
    start, stop, rows, width = 40, 120, 200, 90
    origins = band_tiles(start, stop, rows, width, 32, 24)
    maps = rng.random((len(origins), 32, 32), dtype=np.float32)
    whole = stitch_max(maps, origins, start, stop, width, 32, margin=4, roll_rows=rows)
    stitcher = BandStitcher(start, stop, width, 32, margin=4, roll_rows=rows)
    for i in range(0, len(origins), batch):
        stitcher.add(maps[i : i + batch], origins[i : i + batch])
    np.testing.assert_array_equal(stitcher.result(), whole)
    partial = BandStitcher(start, stop, width, 32, margin=4, roll_rows=rows)
    partial.add(maps[:batch], origins[:batch])
    with pytest.raises(ValueError, match="do not cover"):
        partial.result()  # a batch not added leaves pixels uncovered


def test_band_tiles_and_window():
    # roll 1000 rows, tile 256 / stride 224: rows 0, 224, 448, 672 and the flush 744
    assert band_tiles(0, 500, 1000, 10) == [(0, 0), (224, 0), (448, 0)]
    assert band_read_window(0, 500, 1000) == (0, 704)
    assert sorted({r for r, _ in band_tiles(500, 1000, 1000, 10)}) == [448, 672, 744]
    assert band_read_window(500, 1000, 1000) == (448, 1000)
    assert band_tiles(0, 10, 10, 300) == [(0, 0), (0, 44)]
    assert band_read_window(0, 10, 10) == (0, 10)
    with pytest.raises(ValueError):
        band_tiles(5, 5, 10, 10)
    with pytest.raises(ValueError):
        band_read_window(0, 11, 10)


def test_cut_tiles_pads_small_images_by_reflection():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (t,) = cut_tiles(image, 0, [(0, 0)], 8)
    np.testing.assert_array_equal(t, np.pad(image, [(0, 5), (0, 4)], mode="reflect"))
    rgb = np.stack([image, image + 1, image + 2], axis=2)
    assert cut_tiles(rgb, 0, [(0, 0)], 8).shape == (1, 8, 8, 3)


def test_cut_tiles_rejects_a_short_window():
    image = np.zeros((100, 40), np.uint8)
    with pytest.raises(ValueError, match="runs past the window"):
        cut_tiles(image[:50], 0, [(24, 0)], 32)  # rows 24..56 needed, only 0..50 read
    with pytest.raises(ValueError, match="outside the window"):
        cut_tiles(image[30:], 30, [(24, 0)], 32)  # the halo above is missing


def test_stitch_max_takes_the_maximum_and_checks_coverage():
    origins = [(0, 0), (0, 3), (3, 0), (3, 3)]  # tile 4, stride 3 over 7 × 7
    maps = np.zeros((4, 4, 4), np.float32)
    maps[0, 3, 3], maps[3, 0, 0] = 5.0, 2.0  # both land on pixel (3, 3)
    maps[3, 1, 1] = 7.0
    maps[1, 3, 0] = -1.0  # pixel (3, 3) again: lower than the others
    out = stitch_max(maps, origins, 0, 7, 7, 4)
    assert out.shape == (7, 7) and out[3, 3] == 5.0 and out[4, 4] == 7.0
    assert out.sum() == 12.0
    np.testing.assert_array_equal(stitch_max(maps, origins, 4, 7, 7, 4), out[4:])
    with pytest.raises(ValueError, match="cover"):
        stitch_max(maps[:3], origins[:3], 0, 7, 7, 4)  # rows 4..7 × cols 4..7 uncovered
    nan = maps.copy()
    nan[0, 0, 0] = np.nan
    assert np.isnan(stitch_max(nan, origins, 0, 7, 7, 4)[0, 0])


# -- downsampling --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9, 11), (8, 8), (1, 1), (4, 13)])
def test_downsample_never_drops_a_hot_pixel(shape):
    out_shape = (-(-shape[0] // 4), -(-shape[1] // 4))
    for r in range(shape[0]):
        for c in range(shape[1]):
            band = np.zeros(shape, np.float32)
            band[r, c] = 3.0
            out = downsample_max(band, 4)
            assert out.shape == out_shape and out.dtype == np.float32
            assert out[r // 4, c // 4] == 3.0 and out.sum() == 3.0


def test_downsample_of_bands_equals_downsample_of_roll():
    rng = np.random.default_rng(11)
    roll = rng.random((203, 37), dtype=np.float32)
    bands = [downsample_max(roll[s : s + 40]) for s in range(0, 203, 40)]
    np.testing.assert_array_equal(np.concatenate(bands), downsample_max(roll))


def test_downsample_rounds_up_into_float16():
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.random(1000, dtype=np.float32) * 10, [1e6, -1e6, 0.5]])
    out = downsample_max(values.reshape(1, -1).astype(np.float32), 1)[0]
    assert np.array_equal(out.astype(np.float16).astype(np.float32), out)  # exact in float16
    assert np.all(out[:-3] >= values[:-3])  # never lowered
    assert np.isfinite(out).all() and out[-3] == np.finfo(np.float16).max
    threshold = 0.5
    just_above = np.float32(0.50001)  # rounds to 0.5 in float16 (to nearest)
    stored = downsample_max(np.array([[just_above]]), 1).astype(np.float16)
    assert stored[0, 0] > threshold
    assert np.isnan(downsample_max(np.array([[np.nan, 0.0]], np.float32), 2)[0, 0])


# -- streaming readiness -------------------------------------------------------------------


def _signature(b, band_height, h, tile, stride):
    """Everything a band's result depends on, for a roll of h rows (None: no such band)."""
    if b * band_height >= h:
        return None
    start, stop = band_bounds(b, band_height, h)
    rows = tuple(sorted({r for r, _ in band_tiles(start, stop, h, 1, tile, stride)}))
    return start, stop, rows, band_read_window(start, stop, h, tile, stride)


@pytest.mark.parametrize(("tile", "stride"), [(8, 6), (8, 8), (10, 3), (12, 11)])
@pytest.mark.parametrize("band_height", [1, 4, 7, 20])
def test_band_ready_is_safe_and_tight(tile, stride, band_height):
    for b in range(4):
        stop_full = (b + 1) * band_height
        for rows in range(0, stop_full + 2 * tile + 2):
            horizon = range(max(rows, 1), stop_full + 2 * tile + stride + 2)
            sigs = {_signature(b, band_height, h, tile, stride) for h in horizon}
            stable = len(sigs) == 1 and None not in sigs and next(iter(sigs))[3][1] <= rows
            if band_ready(b, band_height, rows, False, tile, stride):
                assert stable, (b, rows)  # safe: no final length can change the band
            elif stable:
                # tight: the only band waited for needlessly is the documented corner
                assert rows == stop_full + tile - 1 and (rows - tile) % stride == 0, (b, rows)


def test_band_ready_complete_and_errors():
    assert band_ready(0, 2048, 10, True)
    assert band_ready(4, 2048, 4 * 2048 + 1, True)
    assert not band_ready(0, 2048, 2048 + 255, False)
    assert band_ready(0, 2048, 2048 + 256, False)
    with pytest.raises(ValueError):
        band_ready(5, 2048, 4 * 2048 + 1, True)  # no band 5 in that roll
    with pytest.raises(ValueError):
        band_ready(0, 0, 10, False)


@pytest.mark.parametrize("seed", range(12))
def test_streaming_arrival_gives_the_whole_roll_map(seed):
    """Frames in random chunks; bands scored the moment band_ready allows, from the rows
    present then (roll_rows = rows ingested); the result equals scoring the finished roll."""
    rng = np.random.default_rng(seed)
    tile, stride = 16, int(rng.integers(9, 17))
    h = int(rng.integers(1, 260))
    band_height = int(rng.choice([4, 8, 12, 32, 100]))
    image = rng.integers(0, 256, (h, 23), dtype=np.uint8)
    cuts = np.sort(
        rng.choice(np.arange(1, h), size=min(h - 1, int(rng.integers(0, 12))), replace=False)
    )
    arrivals = [*cuts.tolist(), h]
    if rng.random() < 0.5:
        arrivals.append(h)  # the manifest turns complete after the last frame
    scored: dict[int, np.ndarray] = {}
    for i, rows in enumerate(arrivals):
        complete = i == len(arrivals) - 1
        present = image[:rows]  # the scorer cannot see rows that have not arrived
        for b in range(-(-rows // band_height)):
            if b not in scored and band_ready(b, band_height, rows, complete, tile, stride):
                start, stop = band_bounds(b, band_height, rows)
                scored[b] = score_band(present, start, stop, rows, tile, stride)
    assert sorted(scored) == list(range(-(-h // band_height)))
    np.testing.assert_array_equal(
        np.concatenate([scored[b] for b in sorted(scored)]), reference_map(image, tile, stride)
    )


def test_frame_by_frame_scores_each_band_as_soon_as_safe():
    rng = np.random.default_rng(0)
    tile, stride, band_height, h = 16, 12, 20, 150
    image = rng.integers(0, 256, (h, 30), dtype=np.uint8)
    scored_at: dict[int, int] = {}
    scored: dict[int, np.ndarray] = {}
    for rows in range(1, h + 1):
        for b in range(-(-rows // band_height)):
            if b not in scored and band_ready(b, band_height, rows, rows == h, tile, stride):
                start, stop = band_bounds(b, band_height, rows)
                scored[b] = score_band(image[:rows], start, stop, rows, tile, stride)
                scored_at[b] = rows
    # bands 0..5 go early, at band end + one tile; 6 and 7 (the end's flush tile) wait
    assert scored_at == {0: 36, 1: 56, 2: 76, 3: 96, 4: 116, 5: 136, 6: 150, 7: 150}
    np.testing.assert_array_equal(
        np.concatenate([scored[b] for b in range(8)]), reference_map(image, tile, stride)
    )
