"""A band's score map from its pixels: tiles cut, scored in batches, max-stitched, pooled to the
stored ¼ resolution. Plain numpy and torch — no database, no Celery — so the worker, the
benchmarks and the GPU check all run this one path.

On the CPU a reader thread cuts the next batch's tiles (and their fabric masks, measuring the
fabric's edges as it goes; for a fabric-layout model it also lays the tile rows on the fabric)
and a stitcher thread merges the last batch's maps while the model computes. On a GPU the host only queues work: the band's pixels cross to the device once, tiles
are gathered there, the band map is built there, and only its ¼ pooling (1/16 of the pixels)
comes back, once per band. Any host work per batch (cutting,
merging, copying maps back) would leave the GPU idle: measured by bench/band_throughput.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice

import numpy as np
import torch

from distill.fabric_region import Extent
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

    def add(self, maps: torch.Tensor, origins: Sequence[tuple[int, ...]]) -> None:
        tile = self.tile
        if tuple(maps.shape) != (len(origins), tile, tile):
            raise ValueError(f"maps must be ({len(origins)}, {tile}, {tile}), got {maps.shape}")
        boxes = [(o[0], o[1], *(self.crop_window(*o) or (0, 0, 0, 0))) for o in origins]
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
    window: torch.Tensor, window_row0: int, origins: Sequence[tuple[int, ...]], tile: int
) -> torch.Tensor:
    """`cut_tiles` on a torch device: (N, tile, tile, C) tiles of an (H, W, C) window tensor,
    every tile inside it (no reflection padding: that is `cut_tiles`' job)."""
    offsets = torch.arange(tile, device=window.device)
    corner = _on_device([(r - window_row0, c) for r, c, *_ in origins], window.device)
    rows, cols = corner[:, :1] + offsets, corner[:, 1:] + offsets  # (N, tile) each
    return window[rows[:, :, None], cols[:, None, :]]


def _batches(origins: Iterable[tuple[int, ...]], size: int) -> Iterator[list[tuple[int, ...]]]:
    it = iter(origins)
    while chunk := list(islice(it, size)):
        yield chunk


def band_map(
    detector, pixels: np.ndarray, window_row0: int, origins: Iterable[tuple[int, ...]],
    band_start: int, band_stop: int, width: int, tile: int, margin: int, roll_rows: int,
    fabric: WindowFabric | None = None,
) -> np.ndarray | torch.Tensor:  # fmt: skip
    """Full-resolution map of a band: tiles scored in batches, each batch merged by maximum
    into the band map as it comes (one band map in memory, not every tile map as well).
    `origins`: (row, col) or `Tile`s, possibly a lazy iterator (`fabric_band_tiles`, which
    measures the fabric's blocks as it goes: drawn by the reader thread on the CPU).
    `fabric`: where the fabric lies in the window (None: everywhere); tiles reaching off it are
    mapped from their fabric alone (`distill.anomaly_map`).

    A numpy array on the CPU; on another device, a tensor there (see the module's docstring)."""
    chunks = _batches(origins, detector.batch_size)
    place = {"margin": margin, "roll_rows": roll_rows}

    def masks(chunk: list[tuple[int, ...]]) -> np.ndarray | None:
        return None if fabric is None else fabric.tile_masks(chunk, tile)

    if detector.device.type == "cpu":
        # made on the stitcher thread (a 2,048 × 18,000 band's map takes ~0.2 s to allocate),
        # beside the model's first batch; each merge queued behind it there
        stitcher = _stitch.submit(BandStitcher, band_start, band_stop, width, tile, **place)

        def read() -> tuple | None:  # the next batch: its origins, tiles and fabric masks
            chunk = next(chunks, None)
            if chunk is None:
                return None
            return chunk, cut_tiles(pixels, window_row0, chunk, tile), masks(chunk)

        _merge_on_host(detector, read, stitcher)
        return stitcher.result().result()
    stitcher = DeviceStitcher(band_start, band_stop, width, tile, **place, device=detector.device)
    rows, cols = pixels.shape[:2]
    window = None
    for chunk in chunks:  # queued on the device's stream: nothing here waits for it
        if all(r - window_row0 + tile <= rows and c + tile <= cols for r, c, *_ in chunk):
            if window is None:  # the whole window crosses once
                window = as_batch(pixels)[0].to(detector.device)
            tiles = gather_tiles(window, window_row0, chunk, tile)
        else:  # an image smaller than a tile: padded by reflection on the host, as on the CPU
            tiles = as_batch(cut_tiles(pixels, window_row0, chunk, tile))
        stitcher.add(detector.score_tensor(tiles, masks(chunk)), chunk)
    return stitcher.result()


def _merge_on_host(detector, read, stitcher: Future) -> None:
    """Reading the next batch (its origins, tiles and fabric masks: `read`, None past the last)
    and merging the last one run beside the model (numpy releases the GIL), so the model waits
    for neither. `stitcher`: the stitcher thread's future of it."""
    future = _prefetch.submit(read)
    merged = None
    while (batch := future.result()) is not None:
        chunk, tiles, fabric = batch
        future = _prefetch.submit(read)
        maps = detector.predict(tiles, fabric).maps
        if merged is not None:
            merged.result()  # one merge at a time: the stitcher is not thread-safe
        merged = _stitch.submit(lambda m=maps, c=chunk: stitcher.result().add(m, c))
    if merged is not None:
        merged.result()


def band_scores(
    detector, pixels: np.ndarray, window_row0: int, origins: Iterable[tuple[int, ...]],
    band_start: int, band_stop: int, width: int, tile: int, margin: int, roll_rows: int,
    fabric: WindowFabric | None = None,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """What a band stores: its ¼-resolution score map and its full-resolution maximum
    (`quarter_scores`; with `fabric`, a ¼-res pixel its edge cuts through pools the fabric
    alone). Arguments as `band_map`'s."""
    full = band_map(detector, pixels, window_row0, origins, band_start, band_stop, width, tile,
                    margin, roll_rows, fabric)  # fmt: skip
    extents = None if fabric is None else fabric.extents(band_start, band_stop)
    return quarter_scores(full, extents, band_start)


def quarter_scores(
    full: np.ndarray | torch.Tensor, extents: Sequence[Extent] | None = None, row0: int = 0
) -> tuple[np.ndarray, float]:
    """A band map's ¼ max pooling (`downsample_max`: float16 values rounded up) and maximum.

    `extents`: the fabric's, in absolute rows (the map's first row is `row0`). A ¼-res pixel
    that the fabric's edge cuts through pools the fabric's pixels alone, so the table's scores
    beside the edge (a tile of table only is mapped as it is) never reach the fabric's first
    ¼-res column; ¼-res pixels wholly on the table keep the table's scores."""
    quarter = downsample_max(full, SCORE_SCALE)
    for e in extents or ():
        rows = slice(e.row_start - row0, e.row_stop - row0)
        q_rows = slice(rows.start // SCORE_SCALE, -(-rows.stop // SCORE_SCALE))
        left_cut = (e.left, -(-e.left // SCORE_SCALE) * SCORE_SCALE)  # fabric's part of the cell
        right_cut = (e.right // SCORE_SCALE * SCORE_SCALE, e.right)
        for first, stop in (left_cut, right_cut):
            if first < stop and (first % SCORE_SCALE or stop % SCORE_SCALE):
                column = downsample_max(full[rows, first:stop], SCORE_SCALE)[:, 0]
                quarter[q_rows, first // SCORE_SCALE] = column
    return quarter, float(full.max())
