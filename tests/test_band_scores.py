"""A band's map built on a device (worker/band_scores.py, `DeviceStitcher`): the same
values as the numpy path, checked here with torch on the CPU — a GPU runs the same torch code
(bench/gpu_band.py checks it there against the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.band_scores import (
    SCORE_SCALE,
    DeviceStitcher,
    ceil_float16,
    gather_tiles,
    quarter_scores,
)
from worker.tiling import band_read_window, band_tiles, cut_tiles, downsample_max, stitch_max

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
def test_a_tensor_band_pools_to_the_same_quarter_map_and_maximum(shape):
    rng = np.random.default_rng(sum(shape))
    full = (rng.gamma(2.0, size=shape) * 1e3).astype(np.float32)  # beyond float16's step of 1
    full[0, -1] = 70_000.0  # clipped to float16's largest
    expected_map, expected_max = quarter_scores(full)
    assert expected_map.shape == (-(-shape[0] // SCORE_SCALE), -(-shape[1] // SCORE_SCALE))
    np.testing.assert_array_equal(expected_map, downsample_max(full, SCORE_SCALE))
    quarter, peak = quarter_scores(torch.from_numpy(full))
    np.testing.assert_array_equal(quarter, expected_map)
    assert peak == expected_max == 70_000.0


def test_a_nan_in_a_tensor_band_reaches_the_stored_map():
    full = torch.zeros(9, 9)
    full[8, 8] = torch.nan  # the partial corner block: pooled over its one real pixel
    quarter, _ = quarter_scores(full)
    assert np.isnan(quarter[2, 2]) and np.isfinite(np.delete(quarter.ravel(), -1)).all()


def test_tensors_round_up_into_float16_as_numpy_does():
    rng = np.random.default_rng(3)
    exact = np.array([0, 1, -1, 2048, -2048, 65504, -65504, 6e-8, -6e-8], np.float32)
    between = np.array([1 + 2**-12, -1 - 2**-12, 3e-8, -3e-8, 1e-9, -1e-9, 7e4, -7e4, 2049.5,
                        -2049.5, np.inf, -np.inf, np.nan, -0.0], np.float32)  # fmt: skip
    wide = (rng.normal(size=50_000) * 10.0 ** rng.integers(-9, 6, 50_000)).astype(np.float32)
    values = np.concatenate([exact, between, wide])
    expected = downsample_max(values[None, :], 1)[0]
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
