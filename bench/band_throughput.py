"""A production band (2,048 rows × 18,000 px) through `worker.band_scores.band_scores` — cut
tiles, model, max-stitch, ¼ pooling — against the model alone on the same tiles, same run.

    python bench/band_throughput.py [--device cuda] [--teacher resnet34] [--scorer student]
        [--batch 256] [--precision auto] [--compile] [--width 18000] [--json OUT]

The model alone scores the band's tiles already on the device (uint8, as the band's are), so
the ratio band / model is the share of the band's time the model is busy: on a GPU, the busy
share of the GPU (issue 15's goal ≥ 80 %), on the CPU the pipeline's overhead (goal ≥ 0.9×).
The band's pixels are in memory: reading them (zarr decode) is `bench/zarr_store_read.py`'s
and the worker's `score_band` adds the database and the store around this.

Then, on a device other than the CPU, two small bands scored there and by the CPU in fp32:
the largest difference of their ¼ maps relative to the CPU map's range, and the share of
pixels on which a threshold at the CPU map's 99.9th percentile decides differently.
Random weights and a textured random band: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from model_throughput import random_bank

from distill.anomaly_map import MapFusion
from distill.inference import Detector, resolve_device
from distill.memory_bank import DEFAULT_LEVELS
from distill.preprocess import as_batch
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, TEACHERS, build_teacher
from distill.torch_model import ReverseDistillation
from worker.band_scores import band_scores
from worker.tiling import STRIDE, TILE, band_read_window, band_tiles, cut_tiles

BAND_ROWS = 2048


def build_model(teacher: str, scorer: str) -> ReverseDistillation:
    torch.manual_seed(0)
    model = ReverseDistillation(build_teacher(teacher, "random")).eval()
    if scorer == "memory":  # the bank alone, as training chooses it on AITEX
        model.set_scoring(
            random_bank(model, DEFAULT_LEVELS), MapFusion(0.0, (0.0, 1.0), (0.0, 1.0))
        )
    return model


def fabric_band(rows: int, width: int, seed: int = 0) -> np.ndarray:
    """A woven-looking grey band: a periodic weave plus noise, uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:width].astype(np.float32)
    weave = 40 * np.sin(yy * 0.9) * np.sin(xx * 0.7)
    return np.clip(128 + weave + rng.normal(0, 12, (rows, width)), 0, 255).astype(np.uint8)


def score_whole_band(detector: Detector, pixels: np.ndarray, rows: int, width: int) -> tuple:
    """One band in the middle of a roll of three: its tiles read from the band plus halo."""
    start, stop, roll_rows = rows, 2 * rows, 3 * rows
    read_start, _ = band_read_window(start, stop, roll_rows)
    origins = band_tiles(start, stop, roll_rows, width)
    margin = (TILE - STRIDE) // 2
    args = (pixels, read_start, origins, start, stop, width, TILE, margin, roll_rows)
    return origins, read_start, lambda: band_scores(detector, *args)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    model = build_model(args.teacher, args.scorer)
    detector = Detector(model, IMAGENET_MEAN, IMAGENET_STD, device=device,
                        precision=args.precision, batch_size=args.batch, compile=args.compile)  # fmt: skip
    rows = args.band_rows
    read_start, _ = band_read_window(rows, 2 * rows, 3 * rows)  # score_whole_band's band
    pixels = fabric_band(3 * rows - read_start, args.width)  # its halo above, the roll's end
    origins, read_start, band = score_whole_band(detector, pixels, rows, args.width)
    tiles = as_batch(cut_tiles(pixels, read_start, origins)).to(device)
    batches = [tiles[i : i + args.batch] for i in range(0, len(tiles), args.batch)]

    def model_alone() -> None:
        for batch in batches:
            detector.score_tensor(batch)
        synchronize(device)

    started = time.perf_counter()
    model_alone()  # warm-up (compiles, when asked: once per process)
    band()
    warm_s = time.perf_counter() - started
    model_s, band_s = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        started = time.perf_counter()
        model_alone()
        model_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        band()
        synchronize(device)
        band_s.append(time.perf_counter() - started)
    model_rate = len(tiles) / float(np.median(model_s))
    band_rate = len(tiles) / float(np.median(band_s))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "teacher": args.teacher, "scorer": args.scorer, "mode": detector.mode,
        "batch": args.batch, "band": [rows, args.width], "tiles": len(tiles),
        "warm_up_s": warm_s, "model_tiles_per_s": model_rate, "band_tiles_per_s": band_rate,
        "band_s": float(np.median(band_s)), "band_vs_model": band_rate / model_rate,
    }  # fmt: skip
    if device.type != "cpu":
        result["against_cpu_fp32"] = against_cpu(model, args)
    return result


def against_cpu(model: ReverseDistillation, args: argparse.Namespace) -> dict:
    """Bands scored in fp32 on the device and on the CPU: 512 rows × 2,048 px, and a roll
    narrower and shorter than a tile (its tiles padded on the host, the device's other path)."""
    differences = {}
    for rows, width in ((512, 2048), (64, 200)):
        pixels = fabric_band(3 * rows, width, seed=1)
        pixels[rows + 100 : rows + 120, 90:150] = 255  # a bright flaw for the threshold to find
        quarters = {}
        for where in (args.device, "cpu"):
            detector = Detector(model, IMAGENET_MEAN, IMAGENET_STD, device=where,
                                precision="fp32", batch_size=args.batch)  # fmt: skip
            quarters[where] = score_whole_band(detector, pixels, rows, width)[2]()[0]
        device_map, cpu_map = quarters[args.device], quarters["cpu"]
        threshold = np.quantile(cpu_map, 0.999)
        differences[f"{rows}x{width}"] = {
            "max_difference_of_range": float(np.abs(device_map - cpu_map).max() / np.ptp(cpu_map)),
            "decisions_differ": float(np.mean((device_map > threshold) != (cpu_map > threshold))),
        }  # fmt: skip
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher", default="resnet34", choices=sorted(TEACHERS))
    parser.add_argument("--scorer", default="student", choices=("student", "memory"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--width", type=int, default=18_000)
    parser.add_argument("--band-rows", type=int, default=BAND_ROWS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    r = measure(args)
    print(f"{r['device']} ({r['machine']}, {r['threads']} threads, torch {r['torch']}): "
          f"{r['teacher']} {r['scorer']}, {r['mode']}, batch {r['batch']}, "
          f"band {r['band'][0]} × {r['band'][1]} px = {r['tiles']} tiles")  # fmt: skip
    print(f"{'model alone':<28}{r['model_tiles_per_s']:>10.1f} tiles/s")
    print(f"{'band (cut, model, stitch)':<28}{r['band_tiles_per_s']:>10.1f} tiles/s"
          f"   {r['band_vs_model']:.2f}× the model alone, {r['band_s']:.2f} s a band")  # fmt: skip
    for size, c in r.get("against_cpu_fp32", {}).items():
        print(f"fp32 on {args.device} vs the CPU, band {size}: max |Δ| "
              f"{c['max_difference_of_range']:.2e} of the range, decisions differ on "
              f"{c['decisions_differ']:.3%} of pixels")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
