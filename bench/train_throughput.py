"""Training speed: tiles per second of a training step (teacher + student forward, loss,
backward, optimiser) in fp32 and in bf16 autocast, NCHW and channels-last, measured in one run.

    python bench/train_throughput.py [--teacher efficientnet_lite0] [--batch 4] [--tile 256]
        [--steps 12] [--device cpu|cuda] [--json OUT]

Random teacher weights and random tiles: speed does not depend on them. The first rows'
ratios are against fp32 NCHW, the recipe before channels-last and bf16 were added. On the CPU
the run also measures the matrix-product ceilings (`model_throughput`'s) and prints each row's
fraction of its precision's ceiling (the step's FLOPs by torch's counter, forward and backward);
the bf16 / fp32 ratio of the ceilings bounds what bf16 can gain on a step of convolutions. Quality
(validation loss, AUROC) is compared by training the same data twice: `rollscan train
--precision fp32|bf16` and `rollscan evaluate`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from model_throughput import MALLOC_HELP, matmul_ceilings  # bench/ is the script's own folder

from distill.inference import bf16_supported, resolve_device
from distill.malloc_tuning import keep_freed_memory
from distill.teacher import TEACHERS
from distill.train import TrainConfig, Trainer


def step_gflop_per_tile(trainer: Trainer, batch: torch.Tensor) -> float:
    """Forward and backward FLOPs of one training step per tile, by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch, None)
    return counter.get_total_flops() / len(batch) / 1e9


def measure_mode(config: TrainConfig, channels_last: bool, steps: int) -> dict:
    trainer = Trainer(config, channels_last=channels_last)
    trainer.model.train()
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (config.batch, config.tile, config.tile, 3), generator=generator,
                          dtype=torch.uint8)  # fmt: skip
    gflop = step_gflop_per_tile(trainer, batch)  # also the warm-up: oneDNN picks kernels
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch, None)
    return {"tiles_per_s": steps * config.batch / (time.perf_counter() - start), "gflop": gflop}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="efficientnet_lite0", choices=sorted(TEACHERS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--glibc-malloc", action="store_true", help=MALLOC_HELP)
    args = p.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()  # as `rollscan train` runs
    device = resolve_device(args.device)
    modes = [("fp32", False), ("fp32", True)]
    if bf16_supported(device):
        modes += [("bf16", False), ("bf16", True)]
    rows = {}
    for precision, channels_last in modes:
        config = TrainConfig(teacher=args.teacher, teacher_weights="random", batch=args.batch,
                             tile=args.tile, precision=precision, device=args.device)  # fmt: skip
        name = f"{precision}, {'channels-last' if channels_last else 'NCHW'}"
        rows[name] = measure_mode(config, channels_last, args.steps)
    ceilings = matmul_ceilings() if device.type == "cpu" else {}
    reference = rows["fp32, NCHW"]["tiles_per_s"]
    print(f"teacher {args.teacher}, batch {args.batch}, {args.tile}², {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")  # fmt: skip
    gflop = rows["fp32, NCHW"]["gflop"]
    print(f"{gflop:.2f} GFLOP per training tile (forward and backward)"
          + "; CPU ceilings (GOP/s): " * bool(ceilings)
          + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()))  # fmt: skip
    print(f"{'mode':<24}{'tiles/s':>9}{'× fp32 NCHW':>13}{'ceiling':>9}")
    for name, row in rows.items():
        row["vs_fp32_nchw"] = row["tiles_per_s"] / reference
        ceiling = ceilings.get(name.split(",")[0])
        if ceiling:  # the fraction of its own precision's matrix-product ceiling
            row["ceiling_fraction"] = row["tiles_per_s"] * row["gflop"] / ceiling
        fraction = f"{row['ceiling_fraction']:>9.0%}" if ceiling else f"{'–':>9}"
        print(f"{name:<24}{row['tiles_per_s']:>9.1f}{row['vs_fp32_nchw']:>13.2f}{fraction}")
    if "bf16" in ceilings:
        bound = ceilings["bf16"] / ceilings["fp32"]
        print(f"bf16 / fp32 ceilings: {bound:.2f}× — what bf16 can gain on a step of products")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "modes": rows, "ceilings_gops": ceilings},
                                        indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
