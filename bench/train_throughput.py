"""Training speed: tiles per second of a training step (teacher + student forward, loss,
backward, optimiser) in fp32 and in bf16 autocast, NCHW and channels-last, measured in one run.

    python bench/train_throughput.py [--teacher efficientnet_lite0] [--batch 4] [--tile 256]
        [--steps 12] [--device cpu|cuda] [--json OUT]

Random teacher weights and random tiles: speed does not depend on them. The first rows'
ratios are against fp32 NCHW, the recipe before channels-last and bf16 were added. Quality
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

from distill.inference import bf16_supported, resolve_device
from distill.teacher import TEACHERS
from distill.train import TrainConfig, Trainer


def steps_per_second(config: TrainConfig, channels_last: bool, steps: int) -> float:
    trainer = Trainer(config, channels_last=channels_last)
    trainer.model.train()
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (config.batch, config.tile, config.tile, 3), generator=generator,
                          dtype=torch.uint8)  # fmt: skip
    trainer.train_step(batch, None)  # warm-up: oneDNN picks kernels
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch, None)
    return steps * config.batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="efficientnet_lite0", choices=sorted(TEACHERS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    modes = [("fp32", False), ("fp32", True)]
    if bf16_supported(resolve_device(args.device)):
        modes += [("bf16", False), ("bf16", True)]
    rows = {}
    for precision, channels_last in modes:
        config = TrainConfig(teacher=args.teacher, teacher_weights="random", batch=args.batch,
                             tile=args.tile, precision=precision, device=args.device)  # fmt: skip
        name = f"{precision}, {'channels-last' if channels_last else 'NCHW'}"
        rows[name] = {"tiles_per_s": steps_per_second(config, channels_last, args.steps)}
    reference = rows["fp32, NCHW"]["tiles_per_s"]
    print(f"teacher {args.teacher}, batch {args.batch}, {args.tile}², {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"{'mode':<24}{'tiles/s':>9}{'× fp32 NCHW':>13}")
    for name, row in rows.items():
        row["vs_fp32_nchw"] = row["tiles_per_s"] / reference
        print(f"{name:<24}{row['tiles_per_s']:>9.1f}{row['vs_fp32_nchw']:>13.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "modes": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
