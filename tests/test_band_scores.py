"""A band's map built on a device (worker/band_scores.py, `DeviceStitcher`): the same
values as the numpy path, checked here with torch on the CPU — a GPU runs the same torch code
(bench/band_throughput.py checks it there against the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.band_scores import (
    SCORE_SCALE,
    DeviceStitcher,
    gather_tiles,
    quarter_scores,
)
from worker.tiling import (
    band_read_window,
    band_tiles,
    ceil_float16,
    cut_tiles,
    stitch_max,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_a_band_stitched_as_tensors_equals_the_numpy_band(batch):
    rng = np.random.default_rng(7)
    start, stop, rows, width = 40, 157, 230, 101
    origins = band_tiles(start, stop, rows, width, 32, 24)
    maps = rng.normal(size=(len(origins), 32, 32)).astype(np.float32)
    inner = next(k for k, (r, c) in enumerate(origins) if r > start and 0 < c < width - 32)
    maps[inner, 1, 1] = maps[inner, 10, 10] = np.nan  # trimmed away; kept
    expected = stitch_max(maps, origins, start, stop, width, 32, margin=4, roll_rows=rows)
    stitcher = DeviceStitcher(start, stop, width, 32, margin=4, roll_rows=rows, device=CPU)
    for i in range(0, len(origins), batch):
        stitcher.add(torch.from_numpy(maps[i : i + batch]), origins[i : i + batch])
    full = stitcher.result()
    assert isinstance(full, torch.Tensor) and full.dtype == torch.float32
    assert np.isnan(expected).sum() == 1  # the trimmed NaN spilled, the kept one won its pixel
    np.testing.assert_array_equal(full.numpy(), expected)


def test_a_tensor_band_checks_coverage_shape_and_keeps_nan():
    origins = [(0, 0), (0, 3), (3, 0), (3, 3)]  # tile 4, stride 3 over 7 × 7
    maps = torch.zeros(4, 4, 4)
    maps[0, 0, 0] = torch.nan
    partial = DeviceStitcher(0, 7, 7, 4, device=CPU)
    partial.add(maps[:3], origins[:3])
    with pytest.raises(ValueError, match="do not cover"):
        partial.result()
    with pytest.raises(ValueError, match="maps must be"):
        partial.add(maps[:2], origins[:3])
    whole = DeviceStitcher(0, 7, 7, 4, device=CPU)
    whole.add(maps.to(torch.bfloat16), origins)  # a bf16 model's maps are widened first
    assert torch.isnan(whole.result()[0, 0]) and whole.result().dtype == torch.float32


@pytest.mark.parametrize("shape", [(64, 64), (61, 203), (1, 5), (2048 // 8, 18000 // 16)])
def test_a_band_pools_to_its_block_maxima_and_maximum(shape):
    rng = np.random.default_rng(sum(shape))
    full = (rng.gamma(2.0, size=shape) * 1e3).astype(np.float32)  # beyond float16's step of 1
    full[0, -1] = 70_000.0  # clipped to float16's largest
    f = SCORE_SCALE
    hq, wq = -(-shape[0] // f), -(-shape[1] // f)
    padded = np.full((hq * f, wq * f), -np.inf, np.float32)
    padded[: shape[0], : shape[1]] = full
    blocks = padded.reshape(hq, f, wq, f).max(axis=(1, 3))  # numpy's block maximum
    expected = ceil_float16(torch.from_numpy(blocks)).numpy()
    for band in (full, torch.from_numpy(full)):  # the CPU's array, a device's tensor
        quarter, peak = quarter_scores(band)
        np.testing.assert_array_equal(quarter, expected)
        assert peak == 70_000.0 and quarter.dtype == np.float32


def test_a_nan_in_a_tensor_band_reaches_the_stored_map():
    full = torch.zeros(9, 9)
    full[8, 8] = torch.nan  # the partial corner block: pooled over its one real pixel
    quarter, _ = quarter_scores(full)
    assert np.isnan(quarter[2, 2]) and np.isfinite(np.delete(quarter.ravel(), -1)).all()


def test_rounding_up_into_float16_matches_numpy_nextafter():
    rng = np.random.default_rng(3)
    exact = np.array([0, 1, -1, 2048, -2048, 65504, -65504, 6e-8, -6e-8], np.float32)
    between = np.array([1 + 2**-12, -1 - 2**-12, 3e-8, -3e-8, 1e-9, -1e-9, 7e4, -7e4, 2049.5,
                        -2049.5, np.inf, -np.inf, np.nan, -0.0], np.float32)  # fmt: skip
    wide = (rng.normal(size=50_000) * 10.0 ** rng.integers(-9, 6, 50_000)).astype(np.float32)
    values = np.concatenate([exact, between, wide])
    clipped = np.clip(values, -65504, 65504)  # numpy's own rounding up, as the reference
    half = clipped.astype(np.float16)
    low = half.astype(np.float32) < clipped
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    expected = half.astype(np.float32)
    got = ceil_float16(torch.from_numpy(values)).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.float32 and not (got < np.clip(values, -65504, 65504)).any()


@pytest.mark.parametrize("channels", [None, 3])
def test_tiles_gathered_from_a_tensor_window_equal_the_cut_tiles(channels):
    rng = np.random.default_rng(4)
    start, stop, rows, width = 96, 160, 300, 150
    read_start, read_stop = band_read_window(start, stop, rows, 32, 24)
    shape = (read_stop - read_start, width) + ((channels,) if channels else ())
    window = rng.integers(0, 256, shape, dtype=np.uint8)
    origins = band_tiles(start, stop, rows, width, 32, 24)
    expected = cut_tiles(window, read_start, origins, 32)
    tensor = torch.from_numpy(window if channels else window[..., None])
    got = gather_tiles(tensor, read_start, origins, 32)
    assert got.shape == (len(origins), 32, 32, channels or 1)
    np.testing.assert_array_equal(got.numpy().reshape(expected.shape), expected)
