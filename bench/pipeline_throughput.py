"""Whole-pipeline throughput against the model alone, in the same run.

    python bench/pipeline_throughput.py [--frames 8] [--frame-rows 1024] [--width 2048]
        [--compile] [--json OUT]
    python bench/pipeline_throughput.py --frames 2 --width 18000 --compile   # a production band
    python bench/pipeline_throughput.py --frames 2 --width 18000 --table 600  # with the table

A synthetic roll goes through ingest → score → finalize in this process (no broker) on the
configured database (the embedded server by default) and a local object store in a temporary
folder. The model is a random-weight `efficientnet_lite0` student (speed does not depend on
weights) with a threshold no score reaches, so finalize writes no defects. The reference is
the same detector scoring the same number of 256² tiles directly. Two ratios: the bands'
scoring tasks alone (`score_band`: read, tile, model, stitch, fabric edges, write — the issue's
measure; goal ≥ 0.9×) and the whole of ingest → score → finalize in one process.
`--compile`: both sides compiled (`ROLLSCAN_COMPILE_MODEL`), compiled before the timing.
`--table PX`: a white table of PX columns beside the fabric on each side, as a camera sees it:
the tiles across the fabric's edges are mapped from their fabric alone (`distill.anomaly_map`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill.checkpoint import load_detector, random_checkpoint
from distill.inference import SCORING_PRECISIONS
from distill.malloc_tuning import keep_freed_memory
from rollscan_testing.synthetic_roll import write_synthetic_roll
from scheduler.submit import submit
from storage.database import database_url, make_engine, upgrade
from storage.objectstore_local import LocalStore
from storage.registry import activate_model, register_model
from storage.schema import Band, Run
from storage.settings import get_settings
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer
from worker.task_metrics import tiles_scored_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--frame-rows", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--precision", default="auto", choices=SCORING_PRECISIONS)
    parser.add_argument("--table", type=int, default=0, help="table columns on each side")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    keep_freed_memory()  # as the workers run
    options = {"device": "cpu", "batch_size": args.batch, "compile_model": args.compile,
               "precision": args.precision}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="rollscan-bench-"))
    settings = get_settings(data_dir=tmp / "data", **options)
    if settings.database_url is None:  # the embedded server lives in the usual data dir
        settings = get_settings(**options)
    upgrade(database_url(settings))
    engine = make_engine(settings)
    store = LocalStore(tmp / "objects")
    enqueuer = InlineEnqueuer()
    ctx = WorkerContext(settings, engine, store, enqueuer, device="cpu", batch_size=args.batch)
    enqueuer.ctx = ctx
    fabric = f"bench-{int(time.time())}"
    # int8 calibrates on the checkpoint's tiles: random ones (speed does not depend on them)
    calibration = torch.randint(0, 256, (8, 256, 256, 1), dtype=torch.uint8)
    with ctx.session() as session:
        model, _ = register_model(
            session,
            store,
            random_checkpoint(tmp / "m.pt", calibration_tiles=calibration),
            fabric_type=fabric,
            random_teacher_ok=True,  # speed does not depend on the weights
        )
        activate_model(session, model.version)
    roll_id = f"{fabric}-roll"
    write_synthetic_roll(tmp / "roll", roll_id, frames=args.frames, frame_rows=args.frame_rows,
                         width=args.width, fabric_type=fabric, plan=[],
                         table=(args.table, args.table, 245) if args.table else None)  # fmt: skip
    # load (and compile) once, outside the timing, as a warm worker would have it
    ctx.detector(model).predict(np.zeros((args.batch, 256, 256, 1), dtype=np.uint8))
    started, tiles_before = time.perf_counter(), tiles_scored_total()
    submit(ctx, str(tmp / "roll"))
    enqueuer.drain()
    pipeline_s = time.perf_counter() - started
    rows = args.frames * args.frame_rows
    with ctx.session() as session:
        run = session.query(Run).filter(Run.roll_id == roll_id).one()
        bands = session.query(Band).filter(Band.run_id == run.id).count()
        tiles = tiles_scored_total() - tiles_before  # as the bands laid them on the fabric
        status = run.status
    detector, _ = load_detector(tmp / "m.pt", device="cpu", batch_size=args.batch,
                                compile=args.compile, precision=args.precision)  # fmt: skip
    images = np.random.default_rng(0).integers(0, 256, (tiles, 256, 256, 1), dtype=np.uint8)
    detector.predict(images[: args.batch])
    started = time.perf_counter()
    detector.predict(images)
    model_s = time.perf_counter() - started
    result = {
        "roll": f"{rows}×{args.width} px, {args.frames} frames, {bands} bands"
        + (f", a table of {args.table} px each side" if args.table else ""),
        "run_status": status,
        "tiles": tiles,
        "pipeline_tiles_per_s": tiles / pipeline_s,
        "model_tiles_per_s": tiles / model_s,
        "ratio": model_s / pipeline_s,
        "score_band_tiles_per_s": tiles / enqueuer.seconds["score_band"],
        "score_band_ratio": model_s / enqueuer.seconds["score_band"],
        "seconds_by_task": enqueuer.seconds,
        "detector_mode": detector.mode,
        "threads": torch.get_num_threads(),
    }
    print(f"{'':<34}{'tiles/s':>10}")
    print(f"{'model alone (same tiles)':<34}{result['model_tiles_per_s']:>10.1f}")
    print(f"{'score_band (the bands alone)':<34}{result['score_band_tiles_per_s']:>10.1f}")
    print(f"{'pipeline: ingest → score → finalize':<34}{result['pipeline_tiles_per_s']:>10.1f}")
    print(
        f"ratio score_band / model: {result['score_band_ratio']:.2f}, whole pipeline / model: "
        f"{result['ratio']:.2f} ({tiles} tiles, {result['roll']}, {detector.mode})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
