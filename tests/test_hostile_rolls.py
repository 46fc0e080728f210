"""Hostile rolls through a real worker, as a scanner sends them (issue 13, "done when").

One real `celery worker` (Redis broker, moto S3 over HTTP, PostgreSQL) takes a clean roll
first, then one roll of each hostile class uploaded under the incoming prefix and found by
S3 discovery, and one given to `rollscan submit`. Each hostile roll is refused at once or
fails alone with a reason that names its problem, the worker's peak memory stays within 500 MB
of the clean roll's, and a second clean roll after them all comes out.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile
from fault_servers import RedisServer
from fixtures_celery import BAND, FABRIC, Stack, celery_producer
from fixtures_pg import empty_tables
from fixtures_roll import ROLL_ID, ROLL_TIMEOUT_S, assert_roll_came_out
from fixtures_s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, REGION, make_s3_store
from sqlalchemy import select
from tiff_writers import handmade_tiff, lzw_encode, patch_tag

from rollscan_testing.synthetic_roll import write_synthetic_roll
from scheduler.discovery import discover_once
from scheduler.submit import submit, upload_folder
from storage.database import make_engine
from storage.manifest import ManifestError
from storage.registry import activate_model, register_model
from storage.schema import Roll
from storage.settings import Settings
from worker.context import WorkerContext
from worker.tasks import CeleryEnqueuer

MAX_FRAME_PIXELS = 2_000_000  # frames of at most 2 MP: 16 MB + 16 MB of headers on disk
MEMORY_BOUND = 500 << 20
WIDTH = 512  # the hostile rolls' manifest width: 51.2 mm at 10 px/mm
AFTER = "R-after"


def frame(pixels: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, **kwargs)
    return buffer.getvalue()


GOOD = np.full((256, WIDTH), 100, dtype=np.uint8)
# class → (its frame's bytes, words its roll's failure reason must hold)
CLASSES: dict[str, tuple] = {
    "deflate-bomb": (
        lambda: handmade_tiff(
            GOOD,
            compression=8,
            rowsperstrip=256,
            encode=lambda raw: zlib.compress(bytes(100 << 20), 9),
        ),
        "decodes past its 131072 raw bytes",
    ),
    "lzma-bomb": (
        lambda: handmade_tiff(
            GOOD,
            compression=34925,
            rowsperstrip=256,
            encode=lambda raw: lzma.compress(bytes(200 << 20)),
        ),
        "compression LZMA is not accepted",
    ),
    "lzw-bomb": (  # LZW packs ~sqrt: 8 MB of zeros in ~10 kB
        lambda: handmade_tiff(
            GOOD, compression=5, rowsperstrip=256, encode=lambda raw: lzw_encode(bytes(8 << 20))
        ),
        "decodes past its 131072 raw bytes",
    ),
    # codecs whose decoders cannot be bounded by the header: refused before any decoding
    "jpeg": (
        lambda: handmade_tiff(GOOD, compression=7, rowsperstrip=256, encode=lambda raw: raw),
        "compression JPEG is not accepted",
    ),
    "zstd": (
        lambda: handmade_tiff(GOOD, compression=50000, rowsperstrip=256, encode=lambda raw: raw),
        "compression ZSTD is not accepted",
    ),
    "packbits-bomb": (
        lambda: handmade_tiff(
            GOOD, compression=32773, rowsperstrip=256, encode=lambda raw: b"\x81\x07" * 131_000
        ),
        "decodes past its 131072 raw bytes",
    ),
    "header-claims-a-huge-image": (
        lambda: patch_tag(
            patch_tag(handmade_tiff(GOOD, rowsperstrip=10**9), 257, 10**9), 256, WIDTH
        ),
        "exceeds the limit of 2000000 pixels",
    ),
    "object-far-larger-than-a-frame": (
        lambda: frame(GOOD) + os.urandom(40 << 20),
        "more than any frame within ROLLSCAN_MAX_FRAME_PIXELS=2000000",
    ),
    "absurd-width": (
        lambda: frame(np.zeros((1, 1_000_000), np.uint8)),
        "frame is 1000000 px wide",
    ),
    "corrupt": (lambda: b"II*\x00" + os.urandom(50_000), "corrupt"),
    "truncated": (lambda: frame(GOOD, rowsperstrip=16)[:40_000], "truncated"),
    "empty": (lambda: b"", "not a TIFF"),
}
# `rollscan submit FOLDER` refuses these from the file itself, before uploading anything
REFUSED_BY_SUBMIT = {"object-far-larger-than-a-frame"}
VIAS = ("", "-submit")  # the roll id's suffix: found by discovery, given to `rollscan submit`
ABSURD_MANIFESTS = {"R-px-tiny": {"px_per_mm": 1e-300}, "R-wide-mm": {"width_mm": 1e308}}


def manifest(roll_id: str, **changes) -> dict:
    return {"roll_id": roll_id, "fabric_type": FABRIC, "width_mm": WIDTH / 10, "px_per_mm": 10,
            "frames": 1, "complete": True, **changes}  # fmt: skip


def upload(stack: Stack, roll_id: str, data: bytes, **changes) -> None:
    """As a scanner: the frame, then the manifest, under the incoming prefix."""
    stack.ctx.store.put(f"incoming/{roll_id}/frames/000001.tif", data)
    body = json.dumps(manifest(roll_id, **changes)).encode()
    stack.ctx.store.put(f"incoming/{roll_id}/manifest.json", body)


def peak_rss(stack: Stack) -> int:
    """The pool process's peak resident memory so far (VmHWM), in bytes."""
    (worker,) = stack.workers
    (child,) = psutil.Process(worker.proc.pid).children()
    status = Path(f"/proc/{child.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) << 10


def wait_for(stack: Stack, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + ROLL_TIMEOUT_S
    while not done():
        if any(w.proc.poll() is not None for w in stack.workers):
            pytest.fail(f"a worker exited while waiting for {what}\n{stack.diagnosis()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {ROLL_TIMEOUT_S}s\n{stack.diagnosis()}")
        time.sleep(0.5)


@dataclass
class Outcome:
    rolls: dict[str, Roll]
    refused_by_submit: dict[str, str]
    discovery_problems: list[str]
    clean_peak: int
    hostile_peak: int
    stack: Stack


@pytest.fixture(scope="module")
def outcome(
    migrated_url, s3_server, twill_model, celery_roll, celery_reference, tmp_path_factory
) -> Iterator[Outcome]:
    """The whole scenario once, on a Redis of its own; each test below checks one part."""
    tmp = tmp_path_factory.mktemp("hostile")
    with ExitStack() as cleanup, pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("ROLLSCAN_")]:
            mp.delenv(name)
        broker = RedisServer(tmp / "redis")
        cleanup.callback(broker.stop)
        store = make_s3_store(s3_server)
        values = {
            "database_url": migrated_url, "broker_url": broker.url,
            "s3_endpoint": s3_server, "s3_bucket": store.bucket, "s3_region": REGION,
            "s3_access_key_id": FAKE_ACCESS_KEY_ID, "s3_secret_access_key": FAKE_SECRET_ACCESS_KEY,
            "device": "cpu", "band_height": str(BAND), "data_dir": str(tmp / "data"),
            "max_frame_pixels": str(MAX_FRAME_PIXELS),
        }  # fmt: skip
        settings = Settings(**values)
        published = cleanup.enter_context(celery_producer(settings))
        engine = make_engine(migrated_url)
        cleanup.callback(engine.dispose)
        cleanup.callback(empty_tables, engine)  # after the workers have stopped
        ctx = WorkerContext(settings, engine, store, CeleryEnqueuer(), device="cpu")
        with ctx.session() as session:
            model, _ = register_model(session, store, twill_model, fabric_type=FABRIC)
            activate_model(session, model.version)
        stack = Stack(values, ctx, published, tmp)
        cleanup.callback(stack.stop_workers)
        stack.start_worker()

        # a clean roll first: the memory it takes is the baseline
        upload_folder(store, celery_roll[0], "incoming")
        discover_once(ctx)
        wait_for(stack, lambda: status(stack, ROLL_ID) == "done", "the clean roll")
        clean_peak = peak_rss(stack)

        refused: dict[str, str] = {}
        for roll_id, changes in ABSURD_MANIFESTS.items():
            folder = tmp / roll_id
            (folder / "frames").mkdir(parents=True)
            (folder / "frames" / "000001.tif").write_bytes(frame(GOOD))
            (folder / "manifest.json").write_text(json.dumps(manifest(roll_id, **changes)))
            with pytest.raises(ManifestError) as caught:  # `rollscan submit`
                submit(ctx, str(folder))
            refused[roll_id] = str(caught.value)
            upload(stack, f"{roll_id}-s3", frame(GOOD), **changes)  # and discovery
        for name, (make, _) in CLASSES.items():
            data = make()
            upload(stack, f"R-{name}", data)  # found by discovery
            folder = tmp / f"R-{name}-submit"  # and given to `rollscan submit`
            (folder / "frames").mkdir(parents=True)
            (folder / "frames" / "000001.tif").write_bytes(data)
            (folder / "manifest.json").write_text(json.dumps(manifest(folder.name)))
            if name in REFUSED_BY_SUBMIT:  # from the file's size, before anything is uploaded
                with pytest.raises(ValueError, match=CLASSES[name][1]):
                    submit(ctx, str(folder))
                continue
            submit(ctx, str(folder))
        # and a good roll behind them all: the queue must go on
        write_synthetic_roll(tmp / "after", AFTER, frames=1, frame_rows=BAND, width=WIDTH,
                             plan=[], fabric_type=FABRIC)  # fmt: skip
        upload_folder(store, tmp / "after", "incoming")
        problems = discover_once(ctx).problems
        hostile = [f"R-{name}{via}" for name in CLASSES for via in VIAS
                   if not (via and name in REFUSED_BY_SUBMIT)]  # fmt: skip
        wait_for(stack, lambda: status(stack, AFTER) == "done" and all(
            status(stack, r) == "failed" for r in hostile), "the hostile rolls and the last")  # fmt: skip
        with ctx.session() as session:
            found = {r.id: r for r in session.scalars(select(Roll))}
        yield Outcome(found, refused, problems, clean_peak, peak_rss(stack), stack)


def status(stack: Stack, roll_id: str) -> str | None:
    with stack.ctx.session() as session:
        return session.scalar(select(Roll.status).where(Roll.id == roll_id))


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_hostile_roll_fails_alone_with_its_reason(outcome: Outcome, name: str, via: str) -> None:
    if via and name in REFUSED_BY_SUBMIT:  # refused by `rollscan submit` itself: never a roll
        assert f"R-{name}{via}" not in outcome.rolls
        return
    roll = outcome.rolls[f"R-{name}{via}"]
    assert roll.status == "failed"
    assert CLASSES[name][1] in roll.failure_reason, roll.failure_reason
    assert roll.rows_ingested == 0 and roll.width_px is None  # nothing was written


@pytest.mark.parametrize("roll_id", sorted(ABSURD_MANIFESTS))
def test_absurd_manifest_numbers_are_refused_at_once(outcome: Outcome, roll_id: str) -> None:
    field = next(iter(ABSURD_MANIFESTS[roll_id]))
    assert f"{field}: " in outcome.refused_by_submit[roll_id]
    assert "outside" in outcome.refused_by_submit[roll_id]
    assert roll_id not in outcome.rolls and f"{roll_id}-s3" not in outcome.rolls
    assert any(f"{roll_id}-s3/manifest.json: refused" in p and field in p
               for p in outcome.discovery_problems), outcome.discovery_problems  # fmt: skip


def test_the_worker_memory_stays_bounded(outcome: Outcome) -> None:
    assert outcome.hostile_peak <= outcome.clean_peak + MEMORY_BOUND, (
        outcome.clean_peak >> 20,
        outcome.hostile_peak >> 20,
    )


def test_the_clean_rolls_came_out_before_and_after_them(
    outcome: Outcome, celery_roll, celery_reference
):
    assert outcome.rolls[AFTER].status == "done"
    assert_roll_came_out(outcome.stack, celery_roll, celery_reference)
