"""Peak memory of scoring one band, against roll length, band height and batch size (issue 7).

    python bench/band_memory.py [--bands 4 16 64] [--band-heights 1024 2048] [--batches 4 16]
                                [--width 512] [--frame-rows 1024] [--database-url URL] [--json OUT]

For every band height and roll length a synthetic roll (narrow, `--width` px) goes through the
real ingest (`submit` → `ingest_frame`: TIFF frames → the roll's zarr image in a local object
store) on the configured database (the embedded server by default, or `--database-url`). Then,
for every batch size, a FRESH Python process opens a worker context, loads the model (a
random-weight `efficientnet_lite0` student: memory does not depend on weights) and scores one
band in the middle of the roll with `worker.scoring.score_band`, exactly as a worker would:

- RSS: the process's peak RSS is reset after the model is loaded (`/proc/self/clear_refs` 5,
  so a model-load transient cannot hide the band's own peak; `ru_maxrss` cannot be reset).
  "peak RSS" is the high-water mark while scoring, "band +RSS" that minus the RSS before it. It
  includes torch's first-inference allocations, which depend on the batch size only.
- traced: the band is scored a second time under `tracemalloc` (numpy arrays and Python
  objects, all threads; torch's own tensors are not traced), peak over the call.

Memory should follow band height × width and the batch size, never the roll's length.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tifffile
from sqlalchemy import select, update

from distill.checkpoint import random_checkpoint
from distill.data.synthetic import make_fabric
from rollscan_testing.synthetic_roll import ROLL_ROW_OFFSET
from scheduler.submit import submit
from storage.database import database_url, make_engine, upgrade
from storage.objectstore_local import LocalStore
from storage.registry import activate_model, register_model
from storage.schema import Band, Model, Roll, Run
from storage.settings import get_settings
from worker.context import WorkerContext
from worker.ingest import ingest_frame
from worker.roll_layout import run_tiling
from worker.scoring import score_band
from worker.tiling import band_tiles

MB = 1 << 20
_START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f} s] {message}", file=sys.stderr, flush=True)


@dataclass
class IngestOnly:
    """An enqueuer that runs ingest in-process and only records the bands it announces."""

    ctx: WorkerContext | None = None
    queue: deque[tuple[str, int, str]] = field(default_factory=deque)
    announced: list[tuple[int, int]] = field(default_factory=list)

    def ingest(self, roll_id: str, seq: int, key: str) -> None:
        self.queue.append((roll_id, seq, key))

    def score(self, run_id: int, band_index: int, reprocess: bool = False) -> None:
        self.announced.append((run_id, band_index))

    def finalize(self, run_id: int) -> None:
        pass

    def drain(self, every: int = 0) -> None:
        done = 0
        while self.queue:
            result = ingest_frame(self.ctx, *self.queue.popleft())
            if result != "ingested":
                raise RuntimeError(f"ingest returned {result!r}")
            done += 1
            if every and done % every == 0:
                progress(f"  {done} frames ingested, {len(self.queue)} to go")


def write_frames(
    folder: Path, roll_id: str, fabric: str, rows: int, width: int, frame_rows: int
) -> None:
    """A roll folder (manifest + TIFF frames) of synthetic twill, generated frame by frame."""
    frames = -(-rows // frame_rows)
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    for k in range(frames):
        n = min(frame_rows, rows - k * frame_rows)
        image = make_fabric(n, width, weave="twill", seed=7,
                            row_offset=ROLL_ROW_OFFSET + k * frame_rows)  # fmt: skip
        tifffile.imwrite(folder / "frames" / f"{k + 1:06d}.tif", image, compression="zlib")
    manifest = {"roll_id": roll_id, "fabric_type": fabric, "width_mm": width / 10,
                "px_per_mm": 10, "frames": frames, "complete": True}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))


def build_roll(
    ctx: WorkerContext, tmp: Path, roll_id: str, fabric: str, rows: int, width: int,
    frame_rows: int,
) -> int:  # fmt: skip
    """Ingest a synthetic roll through the pipeline; return its live run's id."""
    folder = tmp / "frames" / roll_id
    write_frames(folder, roll_id, fabric, rows, width, frame_rows)
    submit(ctx, str(folder))
    ctx.enqueue.drain(every=32)
    shutil.rmtree(folder)
    with ctx.session() as session:
        roll = session.get(Roll, roll_id)
        if roll is None or roll.rows_ingested != rows:
            raise RuntimeError(f"roll {roll_id} was not ingested completely")
        return session.scalar(select(Run.id).where(Run.roll_id == roll_id))


# --------------------------------------------------------------------------- child process


def _status_kb(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_band(ctx: WorkerContext, run_id: int, band_index: int) -> None:
    with ctx.session() as session:
        where = (Band.run_id == run_id, Band.band_index == band_index)
        session.execute(update(Band).where(*where).values(status="pending"))
        session.execute(update(Run).where(Run.id == run_id).values(bands_done=0))


def measure_band(url: str, store_root: str, run_id: int, band_index: int, batch: int) -> dict:
    """Score one band in this process; its peak memory (RSS and traced), in bytes."""
    settings = get_settings(database_url=url, device="cpu", batch_size=batch)
    ctx = WorkerContext(settings, make_engine(url), LocalStore(store_root), IngestOnly(),
                        device="cpu", batch_size=batch)  # fmt: skip
    _reset_band(ctx, run_id, band_index)
    with ctx.session() as session:
        run = session.get(Run, run_id)
        model, roll = session.get(Model, run.model_version), session.get(Roll, run.roll_id)
        band = session.get(Band, (run_id, band_index))
        tile, stride = run_tiling(ctx, session, run)
        origins = band_tiles(band.row_start, band.row_stop, roll.rows_ingested, roll.width_px,
                             tile, stride)  # fmt: skip
    ctx.detector(model)  # a worker has its model loaded before its first band
    gc.collect()
    reset = _reset_peak_rss()
    before = _status_kb("VmRSS") * 1024 if reset else _ru_maxrss()
    if score_band(ctx, run_id, band_index) != "scored":
        raise RuntimeError(f"run {run_id} band {band_index} was not scored")
    peak = _status_kb("VmHWM") * 1024 if reset else _ru_maxrss()
    _reset_band(ctx, run_id, band_index)
    gc.collect()
    tracemalloc.start()
    score_band(ctx, run_id, band_index)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "tiles": len(origins),
        "rss_before": before,
        "rss_peak": peak,
        "band_rss": peak - before,
        "traced_peak": traced,
        "ru_maxrss": _ru_maxrss(),
        "peak_reset": reset,  # False: RSS figures from ru_maxrss (may hide the band's peak)
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """`measure_band` in a fresh interpreter (nothing of this process's memory carries over)."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"measurement {spec} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def print_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    head = (f"{'roll bands':>10} {'roll rows':>10} {'roll MB':>8} {'band rows':>9} {'batch':>5} "
            f"{'tiles':>5} {'peak RSS MB':>11} {'band +RSS MB':>12} {'traced MB':>9}")  # fmt: skip
    print(head)
    for r in rows:
        print(f"{r['bands']:>10} {r['roll_rows']:>10} {r['roll_image_bytes'] / MB:>8.0f} "
              f"{r['band_height']:>9} {r['batch']:>5} {r['tiles']:>5} {r['rss_peak'] / MB:>11.0f} "
              f"{r['band_rss'] / MB:>12.1f} {r['traced_peak'] / MB:>9.1f}")  # fmt: skip
    ratios = []
    for key in sorted({(r["band_height"], r["batch"]) for r in rows}):
        same = sorted((r for r in rows if (r["band_height"], r["batch"]) == key),
                      key=lambda r: r["bands"])  # fmt: skip
        if len(same) < 2:
            continue
        short, long = same[0], same[-1]
        ratio = {
            "band_height": key[0], "batch": key[1], "bands": [short["bands"], long["bands"]],
            "band_rss": long["band_rss"] / max(short["band_rss"], 1),
            "traced_peak": long["traced_peak"] / short["traced_peak"],
        }  # fmt: skip
        ratios.append(ratio)
        print(f"band {key[0]} rows, batch {key[1]}: {long['bands']} / {short['bands']} bands → "
              f"band +RSS × {ratio['band_rss']:.2f}, traced × {ratio['traced_peak']:.2f}")  # fmt: skip
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bands", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--band-heights", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--frame-rows", type=int, default=1024)
    parser.add_argument("--database-url", default=None, help="default: configured or embedded")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_band(**json.loads(args.child))))
        return

    tmp = Path(tempfile.mkdtemp(prefix="rollscan-bandmem-"))
    try:
        results = run_all(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "ratios": ratios}, indent=2) + "\n")


def run_all(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    overrides = {"database_url": args.database_url} if args.database_url else {}
    url = database_url(get_settings(device="cpu", **overrides))
    upgrade(url)
    engine, store = make_engine(url), LocalStore(tmp / "objects")
    fabric = f"bench-mem-{int(time.time())}"
    results = []
    for height in args.band_heights:
        settings = get_settings(database_url=url, device="cpu", band_height=height)
        enqueuer = IngestOnly()
        ctx = WorkerContext(settings, engine, store, enqueuer, device="cpu")
        enqueuer.ctx = ctx
        if height == args.band_heights[0]:
            with ctx.session() as session:
                model, _ = register_model(session, store, random_checkpoint(tmp / "m.pt"),
                                          fabric_type=fabric, random_teacher_ok=True)  # fmt: skip
                activate_model(session, model.version)
        for bands in args.bands:
            rows, roll_id = bands * height, f"{fabric}-{height}-{bands}"
            progress(f"roll {roll_id}: {rows} rows × {args.width} px, {bands} bands: ingest")
            run_id = build_roll(ctx, tmp, roll_id, fabric, rows, args.width, args.frame_rows)
            for batch in args.batches:
                progress(f"  band {bands // 2} of {bands}, batch {batch}: scoring in a new process")
                spec = {"url": url, "store_root": str(store.root), "run_id": run_id,
                        "band_index": bands // 2, "batch": batch}  # fmt: skip
                measured = run_child(spec)
                results.append({"bands": bands, "roll_rows": rows, "band_height": height,
                                "width": args.width, "batch": batch,
                                "roll_image_bytes": rows * args.width, **measured})  # fmt: skip
            store.delete_prefix(f"rolls/{roll_id}.zarr")
            store.delete_prefix(f"{settings.incoming_prefix.rstrip('/')}/{roll_id}")
    engine.dispose()
    return results


if __name__ == "__main__":
    main()
