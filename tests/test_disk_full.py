"""A full disk (ENOSPC) under the data directory: the roll waits, nothing half-written reads as
valid, and once space is freed `rollscan resume` finishes it with the defects a roll that never
met the fault has. A real small file system (tmpfs), so this needs root; skipped otherwise."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_celery import FABRIC
from fixtures_model import RECIPE, TRAIN_TILE
from fixtures_roll import assert_same_defects, defects_of
from sqlalchemy import select

from distill.train import TrainConfig, train
from results.roll_report import write_roll_report
from rollscan_testing.synthetic_roll import write_synthetic_roll
from scheduler.resume import resume_roll
from scheduler.submit import submit
from storage.schema import Band, Roll, Run
from worker.context import WorkerContext
from worker.training import train_and_register
from worker.transient_errors import is_transient_error

PX_PER_MM, BAND = 4.0, 512
FRAME_ROWS, FRAMES, WIDTH = 256, 4, 384  # two bands
PLAN = [("hole", (512, 190)), ("knot", (800, 200))]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system (tmpfs) needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path) -> None:
    """Leave no byte free: a filler file takes what the file system has left."""
    stat = os.statvfs(mount)
    with open(mount / "filler", "wb") as filler:
        os.posix_fallocate(filler.fileno(), 0, stat.f_bavail * stat.f_frsize)


def _run_until(ctx: WorkerContext, name: str, nth: int) -> None:
    """Run the queued work up to the `nth` call of the function `name`, left queued."""
    calls = 0
    while (calls := calls + (ctx.enqueue.queue[0][0].__name__ == name)) < nth or (
        ctx.enqueue.queue[0][0].__name__ != name
    ):
        function, args = ctx.enqueue.queue.popleft()
        function(ctx, *args)


@pytest.mark.parametrize(("step", "nth"), [("ingest_frame", 2), ("score_band", 1)])
def test_a_roll_met_by_a_full_disk_waits_and_resumes_to_the_same_defects(
    step, nth, make_inline_ctx, small_disk, tmp_path
):
    ctx = make_inline_ctx(BAND, root=small_disk)
    for roll_id in ("R-reference", "R-full"):
        write_synthetic_roll(tmp_path / roll_id, roll_id, frames=FRAMES, frame_rows=FRAME_ROWS,
                             width=WIDTH, plan=PLAN, px_per_mm=PX_PER_MM)  # fmt: skip
    submit(ctx, str(tmp_path / "R-reference"))
    ctx.enqueue.drain()
    reference = defects_of(ctx, "R-reference")
    assert len(reference) == len(PLAN)

    submit(ctx, str(tmp_path / "R-full"))  # its frames are in the store
    _run_until(ctx, step, nth)
    _fill(small_disk)
    with pytest.raises(OSError) as failed:
        ctx.enqueue.drain()
    assert failed.value.errno == errno.ENOSPC
    assert is_transient_error(failed.value)  # a Celery task backs off and tries again
    ctx.enqueue.queue.clear()  # the broker's copies, lost with the worker's patience
    with ctx.session() as session:
        assert session.get(Roll, "R-full").status not in ("failed", "done")  # it waits
        run_ids = select(Run.id).where(Run.roll_id == "R-full").scalar_subquery()
        done = select(Band.band_index).where(Band.run_id.in_(run_ids), Band.status == "done")
        assert not session.scalars(done).all()  # no band counted whose scores were not written

    (small_disk / "filler").unlink()
    resume_roll(ctx, "R-full")
    ctx.enqueue.drain()
    with ctx.session() as session:
        assert session.get(Roll, "R-full").status == "done"
    assert_same_defects(defects_of(ctx, "R-full"), reference)


def test_a_command_says_the_disk_is_full_and_where(
    small_disk, db_engine, migrated_url, twill_model
):
    """`[Errno 28] No space left on device` alone named neither the disk nor the file."""
    _fill(small_disk)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLSCAN_")}
    env |= {"ROLLSCAN_DATABASE_URL": migrated_url, "ROLLSCAN_DATA_DIR": str(small_disk / "data")}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "models", "register", str(twill_model), "--fabric", FABRIC],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    assert "the disk is full" in done.stderr and str(small_disk) in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    objects = small_disk / "data" / "objects"
    assert not [p for p in objects.rglob("*") if p.is_file()]  # nothing half-written


def test_a_training_on_a_full_disk_keeps_going_and_names_the_file_it_cannot_write(
    small_disk, twill_model, caplog
):
    """torch.save into a full disk said "[enforce fail at inline_container.cc] unexpected pos",
    and the snapshot of the first better epoch ended the whole training with it."""
    out = small_disk / "model.pt"
    _fill(small_disk)
    config = TrainConfig(epochs=2, tile=TRAIN_TILE, fpr=0.0, **RECIPE)
    with (
        caplog.at_level(logging.WARNING, logger="distill.train"),
        pytest.raises(OSError) as failed,
    ):
        train(twill_model.parent / "data", out, config, progress=False)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(out)
    assert (
        caplog.text.count("could not be kept on disk") == 2
    )  # each better epoch: training went on
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no half-file left


def test_a_report_written_again_on_a_full_disk_keeps_the_page_it_had(
    make_inline_ctx, small_disk, tmp_path
):
    """The page was written in place: a full disk left a 0-byte index.html."""
    ctx = make_inline_ctx(BAND, root=small_disk)
    write_synthetic_roll(tmp_path / "R-page", "R-page", frames=FRAMES, frame_rows=FRAME_ROWS,
                         width=WIDTH, plan=PLAN, px_per_mm=PX_PER_MM)  # fmt: skip
    submit(ctx, str(tmp_path / "R-page"))
    ctx.enqueue.drain()
    out = small_disk / "report"
    with ctx.session() as session:
        page = write_roll_report(session, ctx.store, "R-page", out)
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert page in written and len(written) > 2  # the page, its map and crops
    _fill(small_disk)
    with ctx.session() as session, pytest.raises(OSError) as failed:
        write_roll_report(session, ctx.store, "R-page", out)
    assert failed.value.errno == errno.ENOSPC
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written


def test_a_training_task_on_a_full_disk_fails_for_good_not_trains_again(
    make_inline_ctx, small_disk, twill_model
):
    """A full disk is transient for the pipeline's tasks; a training task retried on it trained
    again from the start, up to 12 times."""
    ctx = make_inline_ctx(BAND, root=small_disk)
    _fill(small_disk)
    config = {"epochs": 1, "tile": TRAIN_TILE, "fpr": 0.0, **RECIPE}
    with pytest.raises(RuntimeError, match="training failed, not retried") as e:
        train_and_register(ctx, str(twill_model.parent / "data"), FABRIC, config=config)
    assert "No space left on device" in str(e.value) and not is_transient_error(e.value)
