"""Tiles per second of teacher + student + anomaly map (smoothing included) at 256².

Modes: fp32 / bf16 × NCHW / channels-last, plus "official-style" — the official DBFAD scoring
path (fp32, NCHW, per-level maps summed on the CPU and smoothed with scipy's gaussian_filter) —
measured in the same run. The plain fp32/NCHW row is the reference for the ratios.

    python bench/model_throughput.py --teacher resnet34 --batch 8 [--device cpu] [--json OUT]
    python bench/model_throughput.py --teacher efficientnet_lite0 --memory-bank --no-official

`--memory-bank` adds, at the best precision and layout, the default detector (the student's map
fused with a 4,096-patch memory bank's) against the student's map alone, and the bank's
nearest-neighbour search by itself (teacher features given).

Random teacher weights unless --teacher-weights is given: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from distill.anomaly_map import MapFusion
from distill.inference import Detector, bf16_supported, resolve_device
from distill.memory_bank import DEFAULT_BANK_SIZE, DEFAULT_LEVELS, MemoryBank
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, TEACHERS, build_teacher
from distill.torch_model import ReverseDistillation

OFFICIAL = "official-style (fp32, NCHW, scipy maps)"


def official_style_maps(model: ReverseDistillation, x: torch.Tensor) -> np.ndarray:
    """The official scoring path: fp32 NCHW features, maps summed then smoothed by scipy."""
    with torch.no_grad():
        teacher, student = model.features(x)
        total = 0
        for t, s in zip(teacher, student, strict=True):
            a_map = 0.5 * (F.normalize(t, p=2) - F.normalize(s, p=2)) ** 2
            a_map = a_map.sum(1, keepdim=True) / (t.shape[-2] * t.shape[-1])
            total = total + F.interpolate(
                a_map, size=x.shape[-1], mode="bilinear", align_corners=False
            )
    maps = total.squeeze(1).cpu().numpy()
    for i in range(maps.shape[0]):
        maps[i] = gaussian_filter(maps[i], sigma=4)
    return maps


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks kernels on first call
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    teacher = build_teacher(args.teacher, args.teacher_weights or "random")
    model = ReverseDistillation(teacher).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.tile, args.tile, 3), dtype=np.uint8)
    tiles = args.batch * args.repeats
    rows = {}
    x = torch.randn(args.batch, 3, args.tile, args.tile)
    official_model = ReverseDistillation(teacher).eval()
    official_model.student.load_state_dict(model.student.state_dict())
    if not args.no_official:  # the official path runs on the CPU, whatever --device says
        seconds = timed(lambda: official_style_maps(official_model.to("cpu"), x), args.repeats)
        rows[OFFICIAL] = {"tiles_per_s": tiles / seconds}
    precisions = ["fp32"] + (["bf16"] if bf16_supported(device) else [])
    for precision in precisions:
        for channels_last in (False, True):
            detector = Detector(
                model,
                IMAGENET_MEAN,
                IMAGENET_STD,
                device=device,
                precision=precision,
                channels_last=channels_last,
                batch_size=args.batch,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = timed(lambda d=detector: d.predict(images), args.repeats)
            name = f"{precision}, {'channels-last' if channels_last else 'NCHW'}"
            rows[name] = {"tiles_per_s": tiles / seconds}
    if args.compile:
        for precision in precisions:
            detector = Detector(model, IMAGENET_MEAN, IMAGENET_STD, device=device,
                                precision=precision, batch_size=args.batch, compile=True)  # fmt: skip
            started = time.perf_counter()
            detector.predict(images)  # compiles: once per process and tile size
            compile_s = time.perf_counter() - started
            seconds = timed(lambda d=detector: d.predict(images), args.repeats)
            rows[f"{precision}, channels-last, compiled (inductor, freezing)"] = {
                "tiles_per_s": tiles / seconds, "compile_seconds": compile_s,
            }  # fmt: skip
    if args.memory_bank:
        rows |= memory_bank_rows(model, images, x, args, device, precisions[-1])
    reference = rows["fp32, NCHW"]["tiles_per_s"]
    for row in rows.values():
        row["vs_fp32_nchw"] = row["tiles_per_s"] / reference
        # against the official scoring path measured in this run, never a figure from elsewhere
        if OFFICIAL in rows:
            row["vs_official"] = row["tiles_per_s"] / rows[OFFICIAL]["tiles_per_s"]
    return {
        "teacher": args.teacher,
        "batch": args.batch,
        "tile": args.tile,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "modes": rows,
    }


def memory_bank_rows(
    model: ReverseDistillation, images: np.ndarray, x: torch.Tensor, args, device, precision: str
) -> dict:
    """The student alone against the default fused detector, and the bank's search alone."""
    channels = sum(model.teacher.channels[level] for level in DEFAULT_LEVELS)
    bank = MemoryBank(channels, DEFAULT_BANK_SIZE)
    bank.bank.normal_(generator=torch.Generator().manual_seed(0))  # speed ignores the content
    fused = ReverseDistillation(model.teacher).eval()
    fused.student.load_state_dict(model.student.state_dict())
    fused.set_scoring(bank, MapFusion(0.5, (0.0, 1.0), (0.0, 1.0)))
    rows, tiles = {}, args.batch * args.repeats
    for name, net in (("student map only (the old default)", model),
                      ("student + memory bank, fused (the default)", fused)):  # fmt: skip
        detector = Detector(net, IMAGENET_MEAN, IMAGENET_STD, device=device, precision=precision,
                            channels_last=True, batch_size=args.batch)  # fmt: skip
        seconds = timed(lambda d=detector: d.predict(images), args.repeats)
        rows[f"{precision}, channels-last, {name}"] = {"tiles_per_s": tiles / seconds}
    with torch.no_grad():
        features = [f.float() for f in model.teacher(x.to(device))]
        bank = bank.to(device)
        seconds = timed(lambda: bank(features, x.shape[-2:]), args.repeats)
    rows[f"memory bank search alone ({DEFAULT_BANK_SIZE} patches, fp32)"] = {
        "tiles_per_s": tiles / seconds, "ms_per_tile": 1000 * seconds / tiles,
    }  # fmt: skip
    return rows


def print_table(result: dict) -> None:
    print(
        f"teacher {result['teacher']}, batch {result['batch']}, {result['tile']}², "
        f"{result['device']} ({result['threads']} threads), torch {result['torch']}"
    )
    print(f"{'mode':<42}{'tiles/s':>10}{'× fp32 NCHW':>13}{'× official':>12}")
    for name, row in result["modes"].items():
        print(
            f"{name:<42}{row['tiles_per_s']:>10.1f}{row['vs_fp32_nchw']:>13.2f}"
            + (f"{row['vs_official']:>12.2f}" if "vs_official" in row else f"{'–':>12}")
            + (
                f"   (compiled in {row['compile_seconds']:.0f} s)"
                if "compile_seconds" in row
                else ""
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet34", choices=sorted(TEACHERS))
    parser.add_argument("--teacher-weights", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=6, help="timed batches per mode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-official", action="store_true", help="skip the official-style row")
    parser.add_argument("--memory-bank", action="store_true", help="the fused default's rows too")
    parser.add_argument("--compile", action="store_true", help="torch.compile rows too")
    args = parser.parse_args()
    result = measure(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
