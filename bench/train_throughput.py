"""Training speed: tiles per second of a training step (teacher + student forward, loss,
backward, optimiser) in fp32 and in bf16 autocast, NCHW and channels-last, measured in one run.

    python bench/train_throughput.py [--teacher efficientnet_lite0] [--batch 4] [--tile 256]
        [--steps 12] [--rounds 3] [--device cpu|cuda] [--json OUT]

Random teacher weights and random tiles: speed does not depend on them. The first rows'
ratios are against fp32 NCHW, the recipe before channels-last and bf16 were added. On the CPU
the run also measures the matrix-product ceilings (`model_throughput`'s) and prints each row's
fraction of its precision's ceiling (the step's FLOPs by torch's counter, forward and backward);
the bf16 / fp32 ratio of the ceilings bounds what bf16 can gain on a step of convolutions. Quality
(validation loss, AUROC) is compared by training the same data twice: `rollscan train
--precision fp32|bf16` and `rollscan evaluate`. The last row is bf16 training as `rollscan train`
runs its epochs after the first: the frozen teacher's features read from a cache filled once
(`distill.teacher_cache`), so its FLOPs and ceiling fraction count the student's step alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from model_throughput import MALLOC_HELP, matmul_ceilings  # bench/ is the script's own folder
from tqdm.auto import tqdm

from distill.held_out import split_held_out
from distill.inference import bf16_supported, resolve_device
from distill.malloc_tuning import keep_freed_memory
from distill.teacher import TEACHERS
from distill.teacher_cache import TeacherCache, cache_for
from distill.train import TrainConfig, Trainer


def step_gflop_per_tile(trainer: Trainer, step: Callable[[], None]) -> float:
    """Forward and backward FLOPs of one training step per tile, by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / trainer.config.batch / 1e9


def prepare_mode(config: TrainConfig, channels_last: bool, cached: bool) -> tuple[Callable, float]:
    """One mode's training step on batches drawn from a pool of random tiles (as an epoch draws
    them), warmed up, and its GFLOP per tile. `cached`: the step reads the teacher's features
    from a `TeacherCache`, as bf16 training's epochs after the first do (its one-off fill is not
    timed)."""
    trainer = Trainer(config, channels_last=channels_last)
    trainer.model.train()
    generator = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (4 * config.batch, config.tile, config.tile, 3),
                         generator=generator, dtype=torch.uint8)  # fmt: skip
    cache = TeacherCache.build(trainer, pool, config.batch) if cached else None

    def step() -> None:
        idx = torch.randperm(len(pool), generator=generator)[: config.batch]
        trainer.train_step(pool[idx], None, None if cache is None else cache.take(idx))

    gflop = step_gflop_per_tile(trainer, step)  # also the warm-up: oneDNN picks kernels
    step()
    return step, gflop


def measure_modes(steps: dict[str, Callable], n: int, rounds: int, batch: int) -> dict:
    """Tiles/s of each mode, the median of `rounds` rounds of `n` steps; the modes take turns
    within a round, so that a drift of the machine's speed reaches each alike."""
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(n):
                step()
            rates[name].append(n * batch / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def measure_epochs(args: argparse.Namespace, bf16: bool) -> dict:
    """Whole epochs as `rollscan train` runs them (the student's steps over `--epoch-tiles`
    random tiles, 30 % of them held out and validated): the fp32 recipe, and bf16 channels-last
    with the teacher's features recomputed and cached (the cache's fill timed apart, once).
    Tiles/s count the training tiles per second of an epoch, as the training bar does."""
    modes = {"fp32, NCHW (the recipe)": ("fp32", 0)}
    if bf16:
        modes |= {"bf16, channels-last, recomputed": ("bf16", 0),
                  "bf16, channels-last, teacher cached": ("bf16", TrainConfig.teacher_cache_mb)}  # fmt: skip
    tiles = torch.randint(0, 256, (args.epoch_tiles, args.tile, args.tile, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    train_idx, val_idx = split_held_out(len(tiles), TrainConfig.val_ratio, TrainConfig.seed)
    train, val = tiles[train_idx], tiles[val_idx]
    epochs, rows = {}, {}
    for name, (precision, cache_mb) in modes.items():
        config = TrainConfig(teacher=args.teacher, teacher_weights="random", batch=args.batch,
                             tile=args.tile, precision=precision, device=args.device,
                             teacher_cache_mb=cache_mb)  # fmt: skip
        trainer = Trainer(config)
        start = time.perf_counter()
        train_cache, val_cache, _ = cache_for(trainer, train, val)
        rows[name] = {"cache_fill_s": time.perf_counter() - start,
                      "tiles": len(train), "held_out": len(val)}  # fmt: skip

        def epoch(trainer=trainer, train_cache=train_cache, val_cache=val_cache) -> None:
            trainer.train_epoch(train, tqdm(disable=True), None, train_cache)
            trainer.validate(val, val_cache)

        epoch()  # warm-up
        epochs[name] = epoch
    for name, rate in measure_modes(epochs, 1, args.rounds, len(train)).items():
        rows[name]["tiles_per_s"] = rate
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="efficientnet_lite0", choices=sorted(TEACHERS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--steps", type=int, default=12, help="steps per mode and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds (median), the modes taking turns")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epoch-tiles", type=int, default=40, help="tiles of the epochs' rows; 0: none")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--glibc-malloc", action="store_true", help=MALLOC_HELP)
    args = p.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()  # as `rollscan train` runs
    device = resolve_device(args.device)
    modes = [("fp32", False, False), ("fp32", True, False)]
    if bf16_supported(device):  # bf16 training caches the teacher's features (`rollscan train`)
        modes += [("bf16", False, False), ("bf16", True, False), ("bf16", True, True)]
    rows, steps = {}, {}
    for precision, channels_last, cached in modes:
        config = TrainConfig(teacher=args.teacher, teacher_weights="random", batch=args.batch,
                             tile=args.tile, precision=precision, device=args.device)  # fmt: skip
        name = f"{precision}, {'channels-last' if channels_last else 'NCHW'}"
        name += ", teacher cached" * cached
        steps[name], gflop = prepare_mode(config, channels_last, cached)
        rows[name] = {"gflop": gflop}
    rates = measure_modes(steps, args.steps, args.rounds, args.batch)
    for name, rate in rates.items():
        rows[name]["tiles_per_s"] = rate
    ceilings = matmul_ceilings() if device.type == "cpu" else {}
    reference = rows["fp32, NCHW"]["tiles_per_s"]
    print(f"teacher {args.teacher}, batch {args.batch}, {args.tile}², {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")  # fmt: skip
    gflop = rows["fp32, NCHW"]["gflop"]
    print(f"{gflop:.2f} GFLOP per training tile (forward and backward)"
          + "; CPU ceilings (GOP/s): " * bool(ceilings)
          + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()))  # fmt: skip
    print(f"{'mode':<38}{'tiles/s':>9}{'× fp32 NCHW':>13}{'ceiling':>9}")
    for name, row in rows.items():
        row["vs_fp32_nchw"] = row["tiles_per_s"] / reference
        ceiling = ceilings.get(name.split(",")[0])
        if ceiling:  # the fraction of its own precision's matrix-product ceiling
            row["ceiling_fraction"] = row["tiles_per_s"] * row["gflop"] / ceiling
        fraction = f"{row['ceiling_fraction']:>9.0%}" if ceiling else f"{'–':>9}"
        print(f"{name:<38}{row['tiles_per_s']:>9.1f}{row['vs_fp32_nchw']:>13.2f}{fraction}")
    if "bf16" in ceilings:
        bound = ceilings["bf16"] / ceilings["fp32"]
        print(f"bf16 / fp32 ceilings: {bound:.2f}× — what bf16 can gain on a step of products")
    epochs = measure_epochs(args, bf16_supported(device)) if args.epoch_tiles else {}
    if epochs:
        first = next(iter(epochs.values()))
        print(f"whole epochs of {first['tiles']} training and {first['held_out']} held-out tiles "
              f"(median of {args.rounds}); fill: the cache's, once per run")  # fmt: skip
        print(f"{'epoch':<38}{'tiles/s':>9}{'× fp32 NCHW':>13}{'fill s':>9}")
    for name, row in epochs.items():
        row["vs_fp32_nchw"] = row["tiles_per_s"] / epochs["fp32, NCHW (the recipe)"]["tiles_per_s"]
        print(f"{name:<38}{row['tiles_per_s']:>9.1f}{row['vs_fp32_nchw']:>13.2f}"
              f"{row['cache_fill_s']:>9.1f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "modes": rows, "epochs": epochs,
                                         "ceilings_gops": ceilings}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
