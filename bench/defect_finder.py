"""Finalize's labelling and merging on wide rolls: `worker.components.DefectFinder` per band,
and the merge's memory with many defects.

    python bench/defect_finder.py [--widths 1152 4500] [--bands 10] [--specks 50 2000]

Per ¼-res band of 512 rows (a 2,048-row band; 4,500 columns = 18,000 px) with `specks` 2×2
defects on noise, the seconds `DefectFinder.add_band` takes, against the call it replaced for
the components' peaks (`scipy.ndimage.maximum`, which sorts the whole band) timed on the same
band in the same run; then `finish` (the 10 mm merge) with tracemalloc's peak, at the sweep's
chunk of candidate pairs now and before (2²⁰, 2²²), in the same run.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from scipy import ndimage

from worker import components
from worker.components import DefectFinder

ROWS_Q = 512  # a 2,048-row band at ¼ resolution


def _band(rng: np.random.Generator, width: int, specks: int) -> np.ndarray:
    band = rng.random((ROWS_Q, width)) * 0.1 + 0.3
    rows, cols = rng.integers(0, ROWS_Q - 2, specks), rng.integers(0, width - 2, specks)
    for r, c in zip(rows, cols, strict=True):
        band[r : r + 2, c : c + 2] = 5.0
    return band


def _finder(merge_gap_mm: float | None) -> DefectFinder:
    return DefectFinder(threshold=1.0, px_per_mm_x=10.0, px_per_mm_y=10.0, scale=4,
                        merge_gap_mm=merge_gap_mm)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1152, 4500])
    parser.add_argument("--bands", type=int, default=10)
    parser.add_argument("--specks", type=int, nargs="+", default=[50, 2000])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        "| width (¼-res) | specks / band | add_band s / band | the call it replaced, "
        "`ndimage.maximum`, alone: s | finish s | finish traced peak MB, chunk 2²⁰ | 2²² |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for width in args.widths:
        for specks in args.specks:
            bands = [_band(rng, width, specks) for _ in range(args.bands)]
            finder, added, old = _finder(10.0), 0.0, 0.0
            for i, band in enumerate(bands):
                start = time.perf_counter()
                finder.add_band(band, i * ROWS_Q)
                added += time.perf_counter() - start
                labels, n = ndimage.label(band > 1.0, structure=np.ones((3, 3)))
                start = time.perf_counter()
                ndimage.maximum(band, labels, np.arange(1, n + 1))
                old += time.perf_counter() - start
            peaks, took = [], 0.0
            for chunk in (1 << 20, 1 << 22):
                components._PAIRS_PER_CHUNK = chunk
                again = _finder(10.0)
                for i, band in enumerate(bands):
                    again.add_band(band, i * ROWS_Q)
                tracemalloc.start()
                start = time.perf_counter()
                again.finish()
                took = took or time.perf_counter() - start
                peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
                tracemalloc.stop()
            print(f"| {width} | {specks} | {added / len(bands):.3f} | {old / len(bands):.3f} | "
                  f"{took:.2f} | {peaks[0]:.0f} | {peaks[1]:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
