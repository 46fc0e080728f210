"""Reading a sharded roll image through zarr: obstore vs s3fs over S3, local for reference.

Starts moto's S3 server on loopback (`rollscan_testing.services`, as the test fixture does),
writes a roll image with the production layout (uint8, chunks 256×256, shards one band × full
width, zstd 1) and measures, per backend:

- random tiles: single 256×256 chunks at random aligned positions, read one after another
  (latency-bound: with shards, each is a ranged GET of the shard index plus one of the chunk);
- whole bands: every band (one shard) read in turn, as the scoring task does;
- writes: the whole image written band by band (one shard per band).

    python bench/zarr_store_read.py [--rows 8192 --width 4096] [--tiles 200] [--json OUT]

The image is real AITEX fabric (../shared/data/aitex, stacked strips) when present, else
synthetic texture. moto is a single Python process: absolute numbers are lower than with
MinIO or AWS; the ratio between clients is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from rollscan_testing.services import start_moto_server, stop_moto_server
from storage.objectstore import LocalStore, ObjectStore, S3Store
from storage.zarr_rolls import RollArrays, create_roll, delete_roll

ROOT = Path(__file__).resolve().parents[1]
AITEX = ROOT.parent / "shared" / "data" / "aitex"
TILE = 256


def fabric_image(rows: int, width: int, seed: int) -> tuple[np.ndarray, str]:
    """AITEX defect-free strips stacked along the roll, else a synthetic woven texture."""
    strips = sorted(AITEX.glob("NoDefect_images/*/*.png"))
    if strips:
        from PIL import Image

        parts, have = [], 0
        for path in strips:
            strip = np.asarray(Image.open(path).convert("L"))
            if strip.shape[1] >= width:
                parts.append(strip[:, :width])
                have += strip.shape[0]
            if have >= rows:
                return np.concatenate(parts)[:rows, :, np.newaxis], "AITEX strips"
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:width]
    weave = 128 + 40 * np.sin(x * 0.9) * np.sin(y * 0.7)
    image = np.clip(weave + rng.normal(0, 12, (rows, width)), 0, 255).astype(np.uint8)
    return image[:, :, np.newaxis], "synthetic texture"


def write_roll(store: ObjectStore, image: np.ndarray, band_height: int) -> tuple[RollArrays, float]:
    """Write the image band by band (one whole shard each); return the roll and seconds."""
    rows, width, channels = image.shape
    roll_id = f"bench-{os.getpid()}"
    delete_roll(store, roll_id)
    start = time.perf_counter()
    roll = create_roll(
        store, roll_id, width=width, channels=channels, band_height=band_height, manifest={}
    )
    for row in range(0, rows, band_height):
        roll.write_rows(row, image[row : row + band_height])
    seconds = time.perf_counter() - start
    np.testing.assert_array_equal(roll.read_rows(0, rows), image)  # the round trip is exact
    return roll, seconds


def read_tiles(roll: RollArrays, spots: list[tuple[int, int]]) -> None:
    for r, c in spots:
        roll.image[r : r + TILE, c : c + TILE]


def read_bands(roll: RollArrays, rows: int) -> None:
    for band in range(roll.band_count(rows)):
        roll.read_band(band, 0, rows)


def measure(stores: dict[str, ObjectStore], image: np.ndarray, args: argparse.Namespace) -> dict:
    """Rounds interleave the backends, so that load drifting on a shared machine hits all."""
    rows, width, channels = image.shape
    rng = np.random.default_rng(args.seed)
    spots = list(
        zip(
            (rng.integers(0, rows // TILE, args.tiles) * TILE).tolist(),
            (rng.integers(0, width // TILE, args.tiles) * TILE).tolist(),
            strict=True,
        )
    )
    rolls, writes = {}, {}
    for name, store in stores.items():
        print(f"writing through {name} ...", file=sys.stderr, flush=True)
        rolls[name], writes[name] = write_roll(store, image, args.band_height)
        read_tiles(rolls[name], spots[:10])  # warm-up: connections, clients
    tile_s: dict[str, list[float]] = {name: [] for name in stores}
    band_s: dict[str, list[float]] = {name: [] for name in stores}
    for round_ in range(args.repeat):
        print(f"round {round_ + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
        for name, roll in rolls.items():
            start = time.perf_counter()
            read_tiles(roll, spots)
            tile_s[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            read_bands(roll, rows)
            band_s[name].append(time.perf_counter() - start)
    for name, store in stores.items():
        delete_roll(store, rolls[name].roll_id)
    mb, tile_mb = image.nbytes / 1e6, TILE * TILE * channels / 1e6
    bands = -(-rows // args.band_height)
    results = {}
    for name in stores:
        tiles, band = statistics.median(tile_s[name]), statistics.median(band_s[name])
        results[name] = {
            "tiles_per_s": args.tiles / tiles,
            "tile_ms": 1000 * tiles / args.tiles,
            "tile_mb_per_s": args.tiles * tile_mb / tiles,
            "band_mb_per_s": mb / band,
            "band_ms": 1000 * band / bands,
            "write_mb_per_s": mb / writes[name],
            "tile_runs_s": tile_s[name],
            "band_runs_s": band_s[name],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--band-height", type=int, default=2048)
    parser.add_argument("--tiles", type=int, default=200, help="random chunks per run")
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    image, source = fabric_image(args.rows, args.width, args.seed)
    proc, endpoint, log = start_moto_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stores: dict[str, ObjectStore] = {"local": LocalStore(Path(tmp) / "objects")}
            for backend in ("s3fs", "obstore"):
                store = S3Store(endpoint, "bench", "us-east-1", "bench", "bench-secret", backend)
                store.ensure_bucket()
                stores[f"s3 {backend}"] = store
            results = measure(stores, image, args)
    finally:
        stop_moto_server(proc)
        log.unlink(missing_ok=True)

    base = results["s3 s3fs"]
    header = (
        f"{'backend':<12} {'tiles/s':>8} {'tile ms':>8} {'tile MB/s':>9} {'band MB/s':>9} "
        f"{'band ms':>8} {'write MB/s':>10} {'tiles ×s3fs':>11} {'bands ×s3fs':>11}"
    )
    print(
        f"\n{args.rows}×{args.width}×{image.shape[2]} uint8 ({source}), {image.nbytes / 1e6:.0f} MB;"
    )
    print(f"shards {args.band_height}×{-(-args.width // TILE) * TILE}, chunks {TILE}², zstd 1;")
    print(f"{args.tiles} random chunks, median of {args.repeat}; S3 = moto server on loopback\n")
    print(header)
    for name, r in results.items():
        print(
            f"{name:<12} {r['tiles_per_s']:>8.1f} {r['tile_ms']:>8.2f} {r['tile_mb_per_s']:>9.2f} "
            f"{r['band_mb_per_s']:>9.1f} {r['band_ms']:>8.0f} {r['write_mb_per_s']:>10.1f} "
            f"{r['tiles_per_s'] / base['tiles_per_s']:>11.2f} "
            f"{r['band_mb_per_s'] / base['band_mb_per_s']:>11.2f}"
        )
    if args.json:
        meta = {
            "rows": args.rows,
            "width": args.width,
            "band_height": args.band_height,
            "tiles": args.tiles,
            "repeat": args.repeat,
            "source": source,
            "zarr": zarr.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
