"""N small synthetic rolls submitted at once through a real broker to real `celery worker`s.

    python bench/load.py [--rolls 20] [--workers 2] [--broker redis://127.0.0.1:6379/9]
        [--pg-admin-url postgresql://postgres@127.0.0.1:5432/postgres] [--model CKPT]
        [--worker-threads N] [--json OUT] [--keep]

Each roll has 2–4 frames of 512×512 px (bands of 1024 rows) and 1–2 planted defects at
positions of its own; every other roll has one straddling a band boundary. The workers are
`celery -A worker.app worker -c 1 -P prefork -Q ingest,score,finalize` subprocesses (own
process groups, always stopped) sharing a fresh PostgreSQL database (dropped at the end) and a
local object store. A Redis broker database is emptied (FLUSHDB) first; an AMQP broker's three
queues are purged. Prints throughput, per-roll latency (submit → roll completed_at), checks
that every roll is done with every planted defect found once within 5 mm, and compares with
the model alone scoring the same number of tiles in this process. Exit 1 when a check fails.
The database and the workers are `rollscan_testing.services`', the same as the tests'.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import func, make_url, select

import worker.app
from distill.checkpoint import load_detector
from rollscan_testing.services import (
    PIPELINE_QUEUES,
    ServiceError,
    Worker,
    create_database,
    drop_database,
    purge_queues,
    settings_env,
)
from rollscan_testing.synthetic_roll import PlantedDefect, match_defects, write_synthetic_roll
from scheduler.submit import submit
from storage.database import mask_url, upgrade
from storage.registry import activate_model, register_model
from storage.schema import Band, Defect, Frame, Roll, Run
from storage.settings import Settings
from worker.broker_options import use_as_producer
from worker.context import WorkerContext
from worker.tasks import CeleryEnqueuer
from worker.tiling import band_tiles

FABRIC, PX_PER_MM, FRAME_ROWS, WIDTH, BAND = "load-twill", 10.0, 512, 512, 1024
KINDS = ("hole", "knot")
TOLERANCE_MM = 5.0


class BenchError(RuntimeError):
    """A service that does not answer, a failed roll, a stall: printed, exit 1."""


def plan_roll(i: int) -> tuple[int, list[tuple[str, tuple[int, int]]]]:
    """Frames and planted defects of roll i: 2–4 frames, 1–2 defects apart from each other."""
    rng = np.random.default_rng(1000 + i)
    frames = 2 + i % 3
    rows = frames * FRAME_ROWS
    centers = [(BAND, int(rng.integers(100, WIDTH - 100)))] if i % 2 and rows > BAND else []
    while len(centers) < 1 + i % 2:
        row, col = int(rng.integers(160, rows - 160)), int(rng.integers(100, WIDTH - 100))
        if all(abs(row - r) > 300 for r, _ in centers):
            centers.append((row, col))
    return frames, [(KINDS[(i + k) % len(KINDS)], c) for k, c in enumerate(centers)]


def train_small_model(out: Path) -> Path:
    """The tests' twill model: 6 epochs on 128² synthetic tiles (≈ 20 s on 2 cores)."""
    from distill.data.synthetic_defects import write_category
    from distill.train import TrainConfig, train

    data = write_category(out.parent / "train-data", n_train=40, n_test_good=4, n_test_defect=4,
                          tile=128, weave="twill", seed=7)  # fmt: skip
    train(data, out, TrainConfig(epochs=6, tile=128, fpr=0.0), progress=False)
    return out


# --- services --------------------------------------------------------------------------------


def prepare_broker(url: str) -> None:
    """Fail clearly when the broker does not answer; start from empty queues."""
    from kombu import Connection

    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise BenchError(f"the broker {mask_url(url)} does not answer: {exc}") from None
        print(f"emptying Redis database {mask_url(url)} (FLUSHDB)")
        client.flushdb()
        return
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        raise BenchError(f"the broker {mask_url(url)} does not answer: {exc!r}") from None
    print(f"purging queues {', '.join(PIPELINE_QUEUES)} on {mask_url(url)}")
    purge_queues(url)


# --- the run ---------------------------------------------------------------------------------


def wait_for_rolls(ctx: WorkerContext, n: int, workers: list[Worker], stall_s: float,
                   started: float) -> None:  # fmt: skip
    """Poll PostgreSQL until n rolls and their runs are done; a progress line every 5 s."""
    last_done, last_change, last_print = -1, time.monotonic(), 0.0
    while True:
        with ctx.session() as session:
            states = session.execute(
                select(Roll.id, Roll.status, Roll.failure_reason, Run.status)
                .outerjoin(Run, Run.roll_id == Roll.id)
            ).all()  # fmt: skip
        failed = [(r, why) for r, status, why, _ in states if status == "failed"]
        if failed:
            raise BenchError(f"{len(failed)} roll(s) failed: {failed[:3]}")
        done = sum(1 for _, status, _, run in states if status == run == "done")
        now = time.monotonic()
        if done != last_done:
            last_done, last_change = done, now
        if done == n:
            return
        if now - last_print >= 5:
            elapsed = now - started
            rate = done / elapsed if elapsed else 0.0
            eta = f"{(n - done) / rate:.0f} s" if rate else "?"
            print(f"  {done}/{n} rolls done, {rate:.2f} rolls/s, ETA {eta}", flush=True)
            last_print = now
        if any(w.proc.poll() is not None for w in workers):
            raise BenchError(f"a worker exited; {done}/{n} rolls done")
        if now - last_change > stall_s:
            raise BenchError(f"no roll finished for {stall_s:.0f} s; {done}/{n} rolls done")
        time.sleep(0.5)


def check_rolls(ctx: WorkerContext, planned: dict[str, tuple[int, list[PlantedDefect]]]) -> dict:
    """Per-roll checks: complete, every planted defect found once within 5 mm, no duplicates."""
    out = {"incomplete": [], "missed": [], "split": [], "duplicated": [], "false": 0,
           "found": 0, "planted": 0, "tiles": 0, "completed_at": {}}  # fmt: skip
    with ctx.session() as session:
        for roll_id, (frames, planted) in planned.items():
            roll = session.get(Roll, roll_id)
            run = session.scalar(select(Run).where(Run.roll_id == roll_id, Run.is_current))
            n_frames = session.scalar(select(func.count()).where(Frame.roll_id == roll_id))
            rows = frames * FRAME_ROWS
            complete = (
                run is not None and run.status == "done" and run.bands_done == run.bands_total
            )
            if roll.completed_at is not None:
                out["completed_at"][roll_id] = roll.completed_at
            if not complete or (roll.rows_ingested, n_frames) != (rows, frames):
                out["incomplete"].append(roll_id)
                continue
            bands = session.scalars(select(Band).where(Band.run_id == run.id)).all()
            out["tiles"] += sum(len(band_tiles(b.row_start, b.row_stop, rows, WIDTH, 256, 224))
                                for b in bands)  # fmt: skip
            found = [
                {c: getattr(d, c) for c in ("x_mm", "y_mm", "x0_mm", "y0_mm", "x1_mm", "y1_mm")}
                for d in session.scalars(select(Defect).where(Defect.run_id == run.id))
            ]
            out["found"] += len(found)
            out["planted"] += len(planted)
            out["false"] += len(match_defects(planted, found, PX_PER_MM)[1])
            for p in planted:
                x, y = p.center_mm(PX_PER_MM)
                hits = [d for d in found if match_defects([p], [d], PX_PER_MM)[0]]
                if not any(
                    max(abs(d["x_mm"] - x), abs(d["y_mm"] - y)) <= TOLERANCE_MM for d in hits
                ):
                    out["missed"].append(f"{roll_id} {p.kind} at ({x:.1f}, {y:.1f}) mm")
                if len(hits) > 1:
                    out["split"].append(f"{roll_id} {p.kind}: {len(hits)} defects")
            for j, a in enumerate(found):  # the same defect written twice
                for b in found[j + 1 :]:
                    if abs(a["x_mm"] - b["x_mm"]) < 0.5 and abs(a["y_mm"] - b["y_mm"]) < 0.5:
                        out["duplicated"].append(f"{roll_id} at ({a['x_mm']:.1f}, {a['y_mm']:.1f})")
    return out


def task_counts(workers: list[Worker]) -> dict[str, int]:
    """Tasks received and retried per name, from the workers' logs (redeliveries show here)."""
    logs = "\n".join(w.log() for w in workers)
    counts: dict[str, int] = {}
    for name in ("ingest", "score", "finalize"):
        counts[f"{name} received"] = len(re.findall(rf"rollscan\.{name}\[\S+\] received", logs))
        counts[f"{name} retried"] = len(re.findall(rf"rollscan\.{name}\[\S+\] retry:", logs))
    counts["errors"] = len(re.findall(r"raised unexpected|\bERROR/", logs))
    return counts


def model_alone(checkpoint: Path, tiles: int) -> float:
    """Tiles/s of the detector scoring `tiles` 256² tiles directly, in this process."""
    detector, _ = load_detector(checkpoint, device="cpu", batch_size=16)
    images = np.random.default_rng(0).integers(0, 256, (tiles, 256, 256, 1), dtype=np.uint8)
    detector.predict(images[:16])  # warm-up
    started = time.perf_counter()
    detector.predict(images)
    return tiles / (time.perf_counter() - started)


def run(args: argparse.Namespace, work: Path) -> dict:
    for name in [k for k in os.environ if k.startswith("ROLLSCAN_")]:
        del os.environ[name]  # the bench's settings only, here and in the workers
    prepare_broker(args.broker)
    admin = make_url(args.pg_admin_url).set(drivername="postgresql+psycopg2")
    db_url = create_database(admin, "rollscan_load")
    print(f"created database {mask_url(db_url)} (dropped at the end)")
    workers: list[Worker] = []
    ctx = None
    try:
        upgrade(db_url, "head")
        values = {"database_url": db_url, "broker_url": args.broker, "device": "cpu",
                  "band_height": str(BAND), "data_dir": str(work / "data")}  # fmt: skip
        settings = Settings(**values)
        app = worker.app.app  # the producer publishes through the same broker, as a command
        app.conf.update(broker_url=args.broker, task_always_eager=False)
        use_as_producer(app, settings)
        ctx = WorkerContext.from_settings(CeleryEnqueuer(), settings, device="cpu")
        checkpoint = args.model
        if checkpoint is None:
            print("training a small twill model (≈ 20 s; --model PATH reuses a checkpoint) …")
            t0 = time.perf_counter()
            checkpoint = train_small_model(work / "model.pt")
            print(f"trained {checkpoint} in {time.perf_counter() - t0:.0f} s")
        with ctx.session() as session:
            model, _ = register_model(session, ctx.store, checkpoint, fabric_type=FABRIC)
            activate_model(session, model.version)
        planned: dict[str, tuple[int, list[PlantedDefect]]] = {}
        for i in range(args.rolls):
            frames, plan = plan_roll(i)
            roll_id = f"L-{i + 1:04d}"
            _, planted = write_synthetic_roll(
                work / "rolls" / roll_id, roll_id, frames=frames, frame_rows=FRAME_ROWS,
                width=WIDTH, px_per_mm=PX_PER_MM, fabric_type=FABRIC, plan=plan,
            )  # fmt: skip
            planned[roll_id] = (frames, planted)
        env = settings_env(values | {"torch_threads": str(args.worker_threads)})
        print(f"starting {args.workers} workers (logs in {work}) …")
        for k in range(args.workers):
            name = f"load{k}-{secrets.token_hex(3)}"
            workers.append(Worker(name, env, work / f"worker-{name}.log"))
        for w in workers:
            w.wait_ready(timeout=120)
        print(f"submitting {args.rolls} rolls at once …")
        started = time.monotonic()
        submitted: dict[str, datetime] = {}
        for roll_id in planned:
            submitted[roll_id] = datetime.now(UTC)
            submit(ctx, str(work / "rolls" / roll_id))
        submit_s = time.monotonic() - started
        try:
            wait_for_rolls(ctx, args.rolls, workers, args.stall_timeout, started)
        except BenchError as exc:
            raise BenchError(f"{exc}\n" + "\n".join(w.tail() for w in workers)) from None
        checks = check_rolls(ctx, planned)
        counts = task_counts(workers)
    finally:
        for w in workers:
            w.stop()
        if ctx is not None:
            ctx.engine.dispose()
        drop_database(admin, make_url(db_url).database)
    first = min(submitted.values())
    latency = [(at - submitted[r]).total_seconds() for r, at in checks["completed_at"].items()]
    wall = (max(checks["completed_at"].values()) - first).total_seconds()
    pixels = sum(frames * FRAME_ROWS * WIDTH for frames, _ in planned.values())
    print(f"scoring the same {checks['tiles']} tiles with the model alone …")
    alone = model_alone(checkpoint, checks["tiles"])
    p50, p90, p99 = np.percentile(latency, [50, 90, 99])
    result = {
        "rolls": args.rolls, "workers": args.workers, "broker": mask_url(args.broker),
        "worker_threads": args.worker_threads, "submit_s": submit_s, "wall_s": wall,
        "rolls_per_s": args.rolls / wall, "tiles": checks["tiles"],
        "tiles_per_s": checks["tiles"] / wall, "mpx_per_s": pixels / wall / 1e6,
        "latency_s": {"p50": p50, "p90": p90, "p99": p99, "max": max(latency)},
        "model_alone_tiles_per_s": alone, "model_alone_threads": torch.get_num_threads(),
        "ratio": checks["tiles"] / wall / alone,
        "planted": checks["planted"], "found": checks["found"], "false_defects": checks["false"],
        "missed": checks["missed"], "split": checks["split"], "duplicated": checks["duplicated"],
        "incomplete": checks["incomplete"], "tasks": counts,
    }  # fmt: skip
    return result


def report(r: dict) -> bool:
    """Print the table and the checks; True when every check passed."""
    lat = r["latency_s"]
    head = ("rolls", "workers", "wall s", "rolls/s", "tiles/s", "Mpx/s", "p50 s", "p90 s",
            "p99 s", "max s")  # fmt: skip
    cells = (r["rolls"], r["workers"], f"{r['wall_s']:.1f}", f"{r['rolls_per_s']:.3f}",
             f"{r['tiles_per_s']:.1f}", f"{r['mpx_per_s']:.2f}", *(f"{lat[k]:.1f}" for k in
             ("p50", "p90", "p99", "max")))  # fmt: skip
    print("\n" + "".join(f"{h:>9}" for h in head))
    print("".join(f"{c:>9}" for c in cells))
    print(f"submitting took {r['submit_s']:.1f} s; latency = submit → roll completed_at")
    print(f"model alone, same {r['tiles']} tiles, {r['model_alone_threads']} torch threads: "
          f"{r['model_alone_tiles_per_s']:.1f} tiles/s; "
          f"pipeline through broker / model alone: {r['ratio']:.2f}")  # fmt: skip
    t = r["tasks"]
    print("tasks (worker logs): " + ", ".join(f"{k} {v}" for k, v in t.items()))
    rows = [
        ("every roll done, complete", not r["incomplete"], f"{r['rolls'] - len(r['incomplete'])}"
         f"/{r['rolls']}", r["incomplete"]),
        (f"planted defects found ≤ {TOLERANCE_MM:g} mm", not r["missed"],
         f"{r['planted'] - len(r['missed'])}/{r['planted']}", r["missed"]),
        ("planted defect split in several", not r["split"], len(r["split"]), r["split"]),
        ("duplicated defects", not r["duplicated"], len(r["duplicated"]), r["duplicated"]),
        ("task errors in worker logs", not t["errors"], t["errors"], []),
    ]  # fmt: skip
    print("\nchecks")
    for label, ok, value, details in rows:
        print(f"  {label:<36}{value!s:>8}   {'ok' if ok else 'FAILED'}")
        for line in details[:10]:
            print(f"      {line}")
    print(f"  {'false defects (counted)':<36}{r['false_defects']:>8}   "
          f"({r['found']} found in all)")  # fmt: skip
    return all(ok for _, ok, _, _ in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rolls", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/9",
                        help="emptied first (Redis: FLUSHDB of that database)")  # fmt: skip
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a superuser URL: the bench creates and drops a database there")  # fmt: skip
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint to reuse")
    parser.add_argument("--worker-threads", type=int, default=None,
                        help="ROLLSCAN_TORCH_THREADS of each worker (default: cores / workers)")  # fmt: skip
    parser.add_argument("--stall-timeout", type=float, default=300,
                        help="fail when no roll finishes for this many seconds")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, rolls)")
    args = parser.parse_args()
    if args.worker_threads is None:
        args.worker_threads = max(1, (os.cpu_count() or 1) // args.workers)
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show at once in a pipe
    work = Path(tempfile.mkdtemp(prefix="rollscan-load-"))
    ok = False
    try:
        result = run(args, work)
        ok = report(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    except (BenchError, ServiceError) as exc:
        print(f"\nload bench failed: {exc}", file=sys.stderr, flush=True)
    finally:  # a failed run keeps its worker logs
        if args.keep or (not ok and any(work.glob("worker-*.log"))):
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
