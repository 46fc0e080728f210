"""A band's score map from its pixels: tiles cut, scored in batches, max-stitched, pooled to the
stored ¼ resolution. Plain numpy and torch — no database, no Celery — so the worker, the
benchmarks and the GPU check all run this one path.

On the CPU a reader thread cuts the next batch's tiles (and their fabric masks, measuring the
fabric's edges as it goes) and a stitcher thread merges the last batch's maps while the model
computes. On a GPU the host only queues work: the band's pixels cross to the device once, tiles
are gathered there, the band map is built there, and only its ¼ pooling (1/16 of the pixels)
comes back, once per band. Any host work per batch (cutting,
merging, copying maps back) would leave the GPU idle: measured by bench/band_throughput.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from distill.preprocess import as_batch
from worker.fabric_mask import WindowFabric
from worker.tiling import BandStitcher, cut_tiles, downsample_max

SCORE_SCALE = 4  # the stored score map is ¼ of the image's resolution, per axis

# one reader thread per process: the next batch's tiles are cut while the model computes; one
# stitcher thread: the last batch's maps are merged while the model computes the next
_prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollscan-prefetch")
_stitch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollscan-stitch")


class DeviceStitcher(BandStitcher):
    """`BandStitcher`'s band map as a tensor on a torch device, tile maps added as tensors on
    it. A batch merges in one scatter (maximum) with no wait for the device: per tile, the same
    crop window as `BandStitcher`; pixels outside it go to a spill area past the map's end, one
    element per tile pixel (one element would serialise a quarter of a batch's atomic writes).
    A NaN is counted apart (a scatter's maximum need not keep it) and wins its pixel."""

    def __init__(
        self, band_start: int, band_stop: int, width: int, tile: int, *, margin: int = 0,
        roll_rows: int | None = None, device: torch.device,
    ) -> None:  # fmt: skip
        self.device = device
        super().__init__(band_start, band_stop, width, tile, margin=margin, roll_rows=roll_rows)

    def _allocate(self) -> None:  # flat, with the spill area after the map
        tile, device = self.tile, self.device
        self._size = self.shape[0] * self.shape[1]
        total = self._size + tile * tile
        self.out = torch.full((total,), -torch.inf, dtype=torch.float32, device=device)
        self.covered = torch.zeros(total, dtype=torch.bool, device=device)
        self.nans = torch.zeros(total, dtype=torch.int32, device=device)
        self._offsets = torch.arange(tile, device=device)
        self._spill = self._size + torch.arange(tile * tile, device=device).view(tile, tile)

    def add(self, maps: torch.Tensor, origins: Sequence[tuple[int, int]]) -> None:
        tile = self.tile
        if tuple(maps.shape) != (len(origins), tile, tile):
            raise ValueError(f"maps must be ({len(origins)}, {tile}, {tile}), got {maps.shape}")
        boxes = [(r, c, *(self.crop_window(r, c) or (0, 0, 0, 0))) for r, c in origins]
        r, c, top, bottom, left, right = _on_device(boxes, self.device).T[:, :, None]
        rows, cols = r + self._offsets, c + self._offsets  # (N, tile) each
        in_rows, in_cols = (rows >= top) & (rows < bottom), (cols >= left) & (cols < right)
        inside = in_rows[:, :, None] & in_cols[:, None, :]  # (N, tile, tile)
        flat = (rows - self.band_start)[:, :, None] * self.width + cols[:, None, :]
        index = torch.where(inside, flat, self._spill).flatten()
        values = maps.float().flatten()
        nan = values.isnan()
        self.out.scatter_reduce_(0, index, values.masked_fill(nan, -torch.inf), "amax")
        self.covered[index] = True
        self.nans.index_put_((index,), nan.int(), accumulate=True)

    def result(self) -> torch.Tensor:
        size, shape = self._size, self.shape
        if not bool(self.covered[:size].all()):
            raise ValueError("the tile origins do not cover the whole band")
        band = self.out[:size].view(shape)
        return torch.where(self.nans[:size].view(shape) > 0, torch.nan, band)


def _on_device(rows: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """Small integer rows to the device through pinned memory: queued behind the device's work
    rather than waiting for it to finish (a copy from pageable memory may wait)."""
    return torch.tensor(rows, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def gather_tiles(
    window: torch.Tensor, window_row0: int, origins: Sequence[tuple[int, int]], tile: int
) -> torch.Tensor:
    """`cut_tiles` on a torch device: (N, tile, tile, C) tiles of an (H, W, C) window tensor,
    every tile inside it (no reflection padding: that is `cut_tiles`' job)."""
    offsets = torch.arange(tile, device=window.device)
    corner = _on_device([(r - window_row0, c) for r, c in origins], window.device)
    rows, cols = corner[:, :1] + offsets, corner[:, 1:] + offsets  # (N, tile) each
    return window[rows[:, :, None], cols[:, None, :]]


def band_map(
    detector, pixels: np.ndarray, window_row0: int, origins: list[tuple[int, int]],
    band_start: int, band_stop: int, width: int, tile: int, margin: int, roll_rows: int,
    fabric: WindowFabric | None = None,
) -> np.ndarray | torch.Tensor:  # fmt: skip
    """Full-resolution map of a band: tiles scored in batches, each batch merged by maximum
    into the band map as it comes (one band map in memory, not every tile map as well).
    `fabric`: where the fabric lies in the window (None: everywhere); tiles reaching off it are
    mapped from their fabric alone (`distill.anomaly_map`).

    A numpy array on the CPU; on another device, a tensor there (see the module's docstring)."""
    batch = detector.batch_size
    chunks = [origins[i : i + batch] for i in range(0, len(origins), batch)]
    place = {"margin": margin, "roll_rows": roll_rows}

    def masks(chunk: list[tuple[int, int]]) -> np.ndarray | None:
        return None if fabric is None else fabric.tile_masks(chunk, tile)

    if detector.device.type == "cpu":
        # made on the stitcher thread (a 2,048 × 18,000 band's map takes ~0.2 s to allocate),
        # beside the model's first batch; each merge queued behind it there
        stitcher = _stitch.submit(BandStitcher, band_start, band_stop, width, tile, **place)

        def cut(chunk: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
            return cut_tiles(pixels, window_row0, chunk, tile), masks(chunk)

        _merge_on_host(detector, cut, chunks, stitcher)
        return stitcher.result().result()
    stitcher = DeviceStitcher(band_start, band_stop, width, tile, **place, device=detector.device)
    rows, cols = pixels.shape[:2]
    if all(r - window_row0 + tile <= rows and c + tile <= cols for r, c in origins):
        window = as_batch(pixels)[0].to(detector.device)  # the whole window crosses once
        for chunk in chunks:  # queued on the device's stream: nothing here waits for it
            tiles = gather_tiles(window, window_row0, chunk, tile)
            stitcher.add(detector.score_tensor(tiles, masks(chunk)), chunk)
    else:  # an image smaller than a tile: padded by reflection on the host, as on the CPU
        for chunk in chunks:
            tiles = as_batch(cut_tiles(pixels, window_row0, chunk, tile))
            stitcher.add(detector.score_tensor(tiles, masks(chunk)), chunk)
    return stitcher.result()


def _merge_on_host(detector, cut, chunks, stitcher: Future) -> None:
    """Cutting the next batch (its tiles and fabric masks: `cut`) and merging the last one run
    beside the model (numpy releases the GIL), so the model waits for neither. `stitcher`: the
    stitcher thread's future of it."""
    future = _prefetch.submit(cut, chunks[0])
    merged = None
    for k, chunk in enumerate(chunks):
        tiles, fabric = future.result()
        if k + 1 < len(chunks):
            future = _prefetch.submit(cut, chunks[k + 1])
        maps = detector.predict(tiles, fabric).maps
        if merged is not None:
            merged.result()  # one merge at a time: the stitcher is not thread-safe
        merged = _stitch.submit(lambda m=maps, c=chunk: stitcher.result().add(m, c))
    merged.result()


def band_scores(
    detector, pixels: np.ndarray, window_row0: int, origins: list[tuple[int, int]],
    band_start: int, band_stop: int, width: int, tile: int, margin: int, roll_rows: int,
    fabric: WindowFabric | None = None,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """What a band stores: its ¼-resolution score map and its full-resolution maximum
    (`quarter_scores`). Arguments as `band_map`'s."""
    full = band_map(detector, pixels, window_row0, origins, band_start, band_stop, width, tile,
                    margin, roll_rows, fabric)  # fmt: skip
    return quarter_scores(full)


def quarter_scores(full: np.ndarray | torch.Tensor) -> tuple[np.ndarray, float]:
    """A band map's ¼ max pooling (`downsample_max`: float16 values rounded up) and maximum."""
    return downsample_max(full, SCORE_SCALE), float(full.max())
