"""Tiles per second of teacher + student + anomaly map (smoothing included) at 256².

Modes: fp32 / bf16 × NCHW / channels-last, plus "official-style" — the official DBFAD scoring
path (fp32, NCHW, per-level maps summed on the CPU and smoothed with scipy's gaussian_filter) —
measured in the same run, at its start and again at its end: the "× official" ratios are
against the faster of the two (a shared CPU's speed drifts over a run). The plain fp32/NCHW row
is the reference for the other ratios. In bf16 the
detector keeps a student's teacher in float32 (its decisions); the row "teacher bf16 too" is the
path before that, all in bf16, for comparison.

    python bench/model_throughput.py --teacher resnet34 --batch 8 [--device cpu] [--json OUT]
    python bench/model_throughput.py --teacher efficientnet_lite0 --memory-bank --no-official

`--int8` adds the int8 path (features quantized by OpenVINO/NNCF, calibrated on random tiles —
speed does not depend on them —, map in torch float32, compiled). Every run first measures the
CPU's matrix-product ceilings (fp32, bf16, int8 GOP/s, 4096² products) and prints, per row, the
fraction of the ceiling of its own precision that the model's FLOPs reach — for the bf16 rows
whose teacher stays float32, of the mixed ceiling: the teacher's FLOPs at the fp32 ceiling, the
student's at the bf16 one.

Each call of ours scores `--batches` batches (default 4), as a band's scoring does (int8 keeps
two in flight); the official path scores one batch a call, as its own loop does.

`--memory-bank` adds, at the best precision and layout, the default detector (the student's map
fused with a 4,096-patch memory bank's) against the old default — an `efficientnet_lite0`
student's map alone, whatever `--teacher` is (the reference of issues 11 and 15; in bf16 as it
ran then, its teacher in bf16 too, and as it runs today) — and the
bank's nearest-neighbour search by itself (teacher features given). In bf16 the bank-alone rows
come twice: the teacher in float32 (a bank without a bf16 twin) and in bf16 (with one).

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
from distill.fold import folded_copy
from distill.inference import Detector, bf16_supported, resolve_device
from distill.malloc_tuning import keep_freed_memory
from distill.memory_bank import DEFAULT_BANK_SIZE, DEFAULT_LEVELS, LEVEL_CHOICES, MemoryBank
from distill.preprocess import normalise
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, TEACHERS, build_teacher
from distill.torch_model import ReverseDistillation

MALLOC_HELP = "leave glibc's allocator thresholds as they are (rollscan raises them)"

OFFICIAL = "official-style (fp32, NCHW, scipy maps)"
OLD_DEFAULT_TEACHER = "efficientnet_lite0"  # the default before the memory bank (issue 11)


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


class TeacherBf16Path:
    """The eager bf16 path as it was before a student's map kept its teacher in float32: teacher
    and student both under autocast (BatchNorms folded, channels-last), the map in float32 — the
    old default's speed, the reference of issues 11 and 15 (its decisions are not kept: AITEX 06
    moved by 0.0066)."""

    def __init__(self, model: ReverseDistillation, device: torch.device, batch: int) -> None:
        self.net = folded_copy(model.eval().to(device, memory_format=torch.channels_last))
        self.device, self.batch = device, batch

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> list[torch.Tensor]:
        maps = []
        for start in range(0, len(images), self.batch):
            x, _ = normalise(
                torch.from_numpy(images[start : start + self.batch]), IMAGENET_MEAN, IMAGENET_STD,
                self.device,
            )  # fmt: skip
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                teacher = self.net.teacher(x)
                student = self.net.student(teacher)
            maps.append(self.net.maps(teacher, student, tuple(x.shape[-2:])).cpu())
        return maps


def matmul_ceilings(seconds: float = 2.0, n: int = 4096) -> dict[str, float]:
    """GOP/s of n² matrix products in fp32, bf16 and int8 (`torch._int_mm`, VNNI/AMX) on the
    CPU, with this process's threads: the physical limit the model rows are measured against.

    A precision the CPU has no kernel for (bf16 without AVX512-BF16 or AMX, int8 without VNNI)
    runs a reference loop orders of magnitude slower, where one 4096² product takes minutes: a
    512² product first tells, and a precision whose n² product would take over 10 s has no
    ceiling (torch has no kernel for it here; OpenVINO's int8 may still have one)."""
    rng = torch.Generator().manual_seed(0)
    makers = {
        "fp32": lambda m: torch.randn(2, m, m, generator=rng),
        "bf16": lambda m: torch.randn(2, m, m, generator=rng).bfloat16(),
        "int8": lambda m: torch.randint(-128, 128, (2, m, m), dtype=torch.int8, generator=rng),
    }
    multiply = {"fp32": torch.matmul, "bf16": torch.matmul, "int8": torch._int_mm}
    ceilings = {}
    for name, make in makers.items():
        small = make(512)
        multiply[name](small[0], small[1])
        start = time.perf_counter()
        multiply[name](small[0], small[1])
        if (time.perf_counter() - start) * (n / 512) ** 3 > 10.0:  # no kernel: no ceiling
            continue
        pair = make(n)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            multiply[name](pair[0], pair[1])
            count += 1
        ceilings[name] = 2 * n**3 * count / (time.perf_counter() - start) / 1e9
    return ceilings


def gflop_per_tile(model: ReverseDistillation, tile: int) -> tuple[float, float]:
    """(teacher, student) GFLOPs of one tile, by torch's FLOP counter (the map's are negligible)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.student.parameters()).device  # where the detectors moved it
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            teacher = model.teacher(torch.zeros(1, 3, tile, tile, device=device))
        teacher_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.student(teacher)
    return teacher_flops / 1e9, counter.get_total_flops() / 1e9


def ceiling_fraction(
    name: str, tiles_per_s: float, gflop: tuple[float, float], ceilings: dict
) -> float | None:
    """The fraction of the CPU's ceiling a row reaches: against its own precision's, except the
    bf16 rows whose teacher stays float32 (the decisions), against the time the teacher's FLOPs
    take at the fp32 ceiling plus the student's at the bf16 ceiling. None without a ceiling."""
    precision = "fp32" if name == OFFICIAL else name.split(" ")[0].rstrip(",")
    if precision == "bf16" and "teacher bf16" not in name and {"fp32", "bf16"} <= set(ceilings):
        return tiles_per_s * (gflop[0] / ceilings["fp32"] + gflop[1] / ceilings["bf16"])
    if precision in ceilings:
        return tiles_per_s * sum(gflop) / ceilings[precision]
    return None


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks kernels on first call
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    ceilings = matmul_ceilings() if device.type == "cpu" else {}
    torch.manual_seed(0)
    teacher = build_teacher(args.teacher, args.teacher_weights or "random")
    model = ReverseDistillation(teacher).eval()
    rng = np.random.default_rng(0)
    # each of our calls scores several batches, as a band's scoring does; the official path
    # below scores one batch a call, as its own loop does
    images = rng.integers(0, 256, (args.batch * args.batches, args.tile, args.tile, 3), np.uint8)
    tiles = len(images) * args.repeats
    rows = {}
    x = torch.randn(args.batch, 3, args.tile, args.tile)
    official_model = ReverseDistillation(teacher).eval()
    official_model.student.load_state_dict(model.student.state_dict())

    def official_tiles_per_s() -> float:  # the official path runs on the CPU, whatever --device
        seconds = timed(lambda: official_style_maps(official_model.to("cpu"), x), args.repeats)
        return args.batch * args.repeats / seconds

    if not args.no_official:
        rows[OFFICIAL] = {"tiles_per_s": official_tiles_per_s()}
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
    if "bf16" in precisions:
        old_path = TeacherBf16Path(model, device, args.batch)
        seconds = timed(lambda: old_path.predict(images), args.repeats)
        rows["bf16, channels-last, teacher bf16 too (decisions not kept)"] = {
            "tiles_per_s": tiles / seconds
        }
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
    if args.int8:
        started = time.perf_counter()
        detector = Detector(model, IMAGENET_MEAN, IMAGENET_STD, device=device, precision="int8",
                            batch_size=args.batch, compile=True, calibration=images)  # fmt: skip
        detector.predict(images)  # quantizes, then compiles the map and the OpenVINO model
        build_s = time.perf_counter() - started
        seconds = timed(lambda: detector.predict(images), args.repeats)
        rows["int8 (OpenVINO) features, fp32 compiled map"] = {
            "tiles_per_s": tiles / seconds, "compile_seconds": build_s,
        }  # fmt: skip
    if args.memory_bank:
        rows |= memory_bank_rows(model, images, x, args, device, precisions[-1])
    if not args.no_official:
        # measured again after every other row: the CPU's speed drifts over a run (on Zen 4
        # the official path ran 1.2–1.3× faster at the end than at the start), so every ratio
        # is taken against the faster of the two measurements — the conservative reading
        first = rows[OFFICIAL]["tiles_per_s"]
        again = official_tiles_per_s()
        rows[OFFICIAL] = {"tiles_per_s": max(first, again), "measured": [first, again]}
    reference = rows["fp32, NCHW"]["tiles_per_s"]
    gflop = gflop_per_tile(model, args.tile)
    for name, row in rows.items():
        # not for the memory-bank rows, whose models (no student, another teacher) differ
        if "vs_old_default" not in row and "ms_per_tile" not in row:
            fraction = ceiling_fraction(name, row["tiles_per_s"], gflop, ceilings)
            if fraction is not None:
                row["ceiling_fraction"] = fraction
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
        "gflop_per_tile": sum(gflop),
        "teacher_gflop_per_tile": gflop[0],
        "ceilings_gops": ceilings,
        "modes": rows,
    }


def random_bank(
    model: ReverseDistillation, levels: tuple[int, ...], twin_device: str | None = None
) -> MemoryBank:
    """A full-size bank of random patches over the teacher's `levels` (with a bf16 twin: the
    teacher then runs in bf16 under a bf16 detector): speed ignores content."""
    bank = MemoryBank(sum(model.teacher.channels[lv] for lv in levels), DEFAULT_BANK_SIZE, levels)
    bank.bank.normal_(generator=torch.Generator().manual_seed(0))
    if twin_device is not None:
        bank.twin, bank.twin_device = bank.bank.clone(), twin_device
    return bank


def memory_bank_rows(
    model: ReverseDistillation, images: np.ndarray, x: torch.Tensor, args, device, precision: str
) -> dict:
    """The old default (a lite0 student alone) against the memory-bank detectors the selection
    chooses between — the bank alone (no student to run) at each level set training chooses
    among, and a fusion — and the search alone."""

    bank = random_bank(model, DEFAULT_LEVELS)
    twins = (False, True) if precision == "bf16" else (False,)  # a twin changes only bf16
    scorers = {}
    for label, weight, levels, twin in (
        ("fused 0.5", 0.5, DEFAULT_LEVELS, False),
        *((f"memory bank alone{', bf16 twin' * twin}", 0.0, DEFAULT_LEVELS, twin) for twin in twins),
        *((f"memory bank alone, levels {' '.join(map(str, lv))}{', bf16 twin' * twin}", 0.0, lv, twin)
          for lv in LEVEL_CHOICES if lv != DEFAULT_LEVELS for twin in twins),
    ):  # fmt: skip
        scorers[label] = ReverseDistillation(model.teacher).eval()
        scorers[label].student.load_state_dict(model.student.state_dict())
        plain = levels == DEFAULT_LEVELS and not twin
        scored_by = bank if plain else random_bank(model, levels, device.type if twin else None)
        scorers[label].set_scoring(scored_by, MapFusion(weight, (0.0, 1.0), (0.0, 1.0)))
    rows, tiles = {}, len(images) * args.repeats
    old_default = f"{precision}, channels-last, {OLD_DEFAULT_TEACHER} student only (old default)"
    old_model = ReverseDistillation(build_teacher(OLD_DEFAULT_TEACHER, "random")).eval()
    runs = [(old_default, old_model, {"precision": precision})]
    if precision == "bf16":  # the old default ran its teacher in bf16 too: the reference
        old_default += ", teacher bf16"
        runs = [(old_default, TeacherBf16Path(old_model, device, args.batch), None),
                (f"{precision}, channels-last, {OLD_DEFAULT_TEACHER} student only, teacher "
                 "float32 (today)", old_model, {"precision": precision})]  # fmt: skip
    for label, net in scorers.items():
        runs.append((f"{precision}, channels-last, {label}", net, {"precision": precision}))
        if args.compile and "twin" not in label:  # compiled, the teacher stays float32
            runs.append((f"{precision}, compiled, {label}", net,
                         {"precision": precision, "compile": True}))  # fmt: skip
    if args.int8:  # the bank alone has no student to quantize: only the fusion gains
        runs.append(("int8 (OpenVINO), compiled map, fused 0.5", scorers["fused 0.5"],
                     {"precision": "int8", "compile": True, "calibration": images}))  # fmt: skip
    for name, net, options in runs:  # fmt: skip
        detector = net if options is None else Detector(
            net, IMAGENET_MEAN, IMAGENET_STD, device=device, batch_size=args.batch, **options
        )  # fmt: skip
        seconds = timed(lambda d=detector: d.predict(images), args.repeats)
        rows[name] = {"tiles_per_s": tiles / seconds}
        rows[name]["vs_old_default"] = rows[name]["tiles_per_s"] / rows[old_default]["tiles_per_s"]
    with torch.no_grad():
        features = [f.float() for f in model.teacher(x.to(device))]
        bank = bank.to(device)
        seconds = timed(lambda: bank(features, x.shape[-2:]), args.repeats)
    rows[f"memory bank search alone ({DEFAULT_BANK_SIZE} patches, fp32)"] = {
        "tiles_per_s": len(x) * args.repeats / seconds,
        "ms_per_tile": 1000 * seconds / (len(x) * args.repeats),
    }  # fmt: skip
    return rows


def print_table(result: dict) -> None:
    print(
        f"teacher {result['teacher']}, batch {result['batch']}, {result['tile']}², "
        f"{result['device']} ({result['threads']} threads), torch {result['torch']}"
    )
    ceilings = ", ".join(
        f"{k} {result['ceilings_gops'][k]:.0f}" if k in result["ceilings_gops"] else f"{k} –"
        for k in ("fp32", "bf16", "int8")
    )  # –: torch has no kernel for it on this CPU
    print(f"{result['gflop_per_tile']:.2f} GFLOP per tile (teacher "
          f"{result['teacher_gflop_per_tile']:.2f}); CPU ceilings (GOP/s): {ceilings}")  # fmt: skip
    print(f"{'mode':<66}{'tiles/s':>9}{'× fp32 NCHW':>13}{'× official':>12}{'ceiling':>9}")
    for name, row in result["modes"].items():
        fraction = row.get("ceiling_fraction")
        print(
            f"{name:<66}{row['tiles_per_s']:>9.1f}{row['vs_fp32_nchw']:>13.2f}"
            + (f"{row['vs_official']:>12.2f}" if "vs_official" in row else f"{'–':>12}")
            + (f"{fraction:>9.0%}" if fraction is not None else f"{'–':>9}")
            + (
                f"   {row['vs_old_default']:.2f}× the old default"
                if "vs_old_default" in row
                else ""
            )
            + (
                "   (the faster of {:.1f} at the start, {:.1f} at the end)".format(*row["measured"])
                if "measured" in row
                else ""
            )
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
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per mode")
    parser.add_argument("--batches", type=int, default=4, help="batches per call of ours")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-official", action="store_true", help="skip the official-style row")
    parser.add_argument(
        "--memory-bank", action="store_true", help="the memory-bank detectors' rows too"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile rows too")
    parser.add_argument("--int8", action="store_true", help="the int8 (OpenVINO) row too")
    parser.add_argument("--glibc-malloc", action="store_true", help=MALLOC_HELP)
    args = parser.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()  # as `rollscan` and the workers run
    result = measure(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
