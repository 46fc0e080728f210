"""A frame that kills its worker: real worker, real broker, a real SIGKILL (issue 13 item 2).

Tasks are acknowledged late and rejected back to the queue when their worker dies, so such a
frame used to be delivered for ever. Each delivery now counts itself in PostgreSQL before it
works; the test kills the worker's pool process while the frame is being decoded (a large LZW
frame: the pure-Python decoder takes seconds), as an out-of-memory kill or a segfault in a
codec would, and the delivery after `max_deliveries` of those fails the roll instead.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from fixtures_celery import FABRIC
from fixtures_roll import ROLL_ID, ROLL_TIMEOUT_S, assert_roll_came_out, wait_until_done
from sqlalchemy import select
from tiff_writers import handmade_tiff, lzw_encode

from scheduler.submit import submit
from storage.schema import Roll, TaskDelivery

POISON = "R-poison"
MAX_DELIVERIES = 2


def write_poison_roll(folder: Path) -> None:
    """One frame, 2048 × 2048 grey LZW: valid, and seconds to decode without imagecodecs."""
    pixels = np.random.default_rng(5).integers(0, 256, (2048, 2048), dtype=np.uint8)
    pixels //= 16  # few grey levels: LZW compresses them, the encoder here stays quick
    data = handmade_tiff(pixels, compression=5, encode=lzw_encode, rowsperstrip=256)
    (folder / "frames").mkdir(parents=True)
    (folder / "frames" / "000001.tif").write_bytes(data)
    (folder / "manifest.json").write_text(
        f'{{"roll_id": "{POISON}", "fabric_type": "{FABRIC}", "width_mm": 204.8, '
        f'"px_per_mm": 10, "frames": 1, "complete": true}}'
    )


def roll_row(stack) -> Roll:
    with stack.ctx.session() as session:
        return session.get(Roll, POISON)


def unfinished(stack) -> int:
    with stack.ctx.session() as session:
        row = session.get(TaskDelivery, ("ingest", f"{POISON}/1"))
        return row.unfinished if row is not None else 0


def test_a_frame_that_kills_its_worker_fails_its_roll_and_the_queue_goes_on(
    make_stack, redis_broker, celery_roll, celery_reference, tmp_path
):
    if getattr(__import__("tifffile.tifffile").tifffile.imagecodecs, "__name__", "") != (
        "tifffile._imagecodecs"
    ):
        pytest.skip("imagecodecs decodes LZW too fast to kill the worker mid-frame")
    write_poison_roll(tmp_path / POISON)
    stack = make_stack(redis_broker, max_deliveries=str(MAX_DELIVERIES))
    worker = stack.start_worker()
    submit(stack.ctx, str(tmp_path / POISON))
    submit(stack.ctx, str(celery_roll[0]))  # a good roll queued behind the poison frame

    for kills in range(1, MAX_DELIVERIES + 1):
        # the delivery has counted itself, and is decoding: kill its process as the OOM
        # killer would (the pool child; the worker's main process starts a new one)
        deadline = time.monotonic() + ROLL_TIMEOUT_S
        while unfinished(stack) < kills:
            if worker.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"delivery {kills} of the frame never started\n{worker.tail()}")
            time.sleep(0.02)
        (child,) = psutil.Process(worker.proc.pid).children()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)

    wait_until_done(stack, ROLL_ID, [worker])  # the queue went on: the good roll is done
    assert_roll_came_out(stack, celery_roll, celery_reference)
    deadline = time.monotonic() + ROLL_TIMEOUT_S  # the next delivery gives the frame up
    while (poison := roll_row(stack)).status != "failed":
        if worker.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the poison roll is {poison.status}\n{worker.tail(80)}")
        time.sleep(0.2)
    with stack.ctx.session() as session:
        left = session.scalars(select(TaskDelivery)).all()
    assert f"frame 1 (incoming/{POISON}/frames/000001.tif)" in poison.failure_reason
    assert f"its worker died during each of {MAX_DELIVERIES} deliveries" in poison.failure_reason
    assert left == []  # the poison frame's count went with it, the good roll's with success
    log = worker.log()
    assert log.count("Task handler raised error: WorkerLostError") == MAX_DELIVERIES, worker.tail()
    assert "'failed'" in log  # the last delivery returned normally: acknowledged, not requeued
