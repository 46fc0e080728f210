"""The roll pipeline through a real broker and real `celery worker` processes.

Each test starts `celery -A worker.app worker` as a subprocess (its own process group, stopped
in teardown whatever happens) configured by `ROLLSCAN_*` variables: the session's migrated
PostgreSQL database, a fresh bucket on the moto S3 server (HTTP on loopback) and a broker —
a Redis database claimed for this test session (11–15, emptied before each test) or a RabbitMQ
vhost of its own. The test process enqueues through the same broker: `worker.app.app`, which
the tasks are bound to, is pointed at it for the test (`celery_producer`) and restored after;
`scheduler.submit.submit` runs with a `WorkerContext` whose enqueuer is `CeleryEnqueuer`.

Expected defects come from the planted positions and from the same roll run in this process
without Celery (`reference`), in a database and object store of its own.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fixtures_celery import BAND, FABRIC, VISIBILITY_S, Stack, Worker
from sqlalchemy import func, select

from scheduler.submit import submit
from scheduler.synthetic_roll import PlantedDefect, match_defects, write_synthetic_roll
from storage.database import make_engine, upgrade
from storage.objectstore import LocalStore
from storage.registry import activate_model, register_model
from storage.schema import Band, Defect, Frame, Roll, Run
from storage.settings import Settings
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer

PX_PER_MM = 10.0
FRAME_ROWS, FRAMES, WIDTH = 512, 4, 512  # 2048 rows: two bands of BAND = 1024
PLAN = [("hole", (1024, 180)), ("knot", (1560, 360))]  # the hole straddles the band boundary
ROLL_ID = "R-celery"
ROLL_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def roll(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PlantedDefect]]:
    folder = tmp_path_factory.mktemp("celery-roll") / ROLL_ID
    _, planted = write_synthetic_roll(
        folder, ROLL_ID, frames=FRAMES, frame_rows=FRAME_ROWS, width=WIDTH, plan=PLAN,
        px_per_mm=PX_PER_MM, fabric_type=FABRIC,
    )  # fmt: skip
    return folder, planted


@pytest.fixture(scope="module")
def reference(roll, make_database, twill_model: Path, tmp_path_factory) -> list[dict]:
    """The roll's defects from the pipeline run in this process without Celery."""
    url = make_database()
    upgrade(url, "head")
    engine = make_engine(url)
    try:
        store_dir = tmp_path_factory.mktemp("reference")
        store = LocalStore(store_dir / "objects")
        settings = Settings(band_height=BAND, device="cpu", data_dir=store_dir / "data")
        enqueuer = InlineEnqueuer()
        ctx = WorkerContext(settings, engine, store, enqueuer, device="cpu")
        enqueuer.ctx = ctx
        with ctx.session() as session:
            model, _ = register_model(session, store, twill_model, fabric_type=FABRIC)
            activate_model(session, model.version)
        submit(ctx, str(roll[0]))
        enqueuer.drain()
        found = defects_of(ctx, ROLL_ID)
    finally:
        engine.dispose()
    assert_planted_found(found, roll[1])  # else the model, not Celery, is at fault
    return found


def defects_of(ctx: WorkerContext, roll_id: str) -> list[dict]:
    with ctx.session() as session:
        rows = session.scalars(
            select(Defect)
            .join(Run, Run.id == Defect.run_id)
            .where(Run.roll_id == roll_id, Run.is_current)
            .order_by(Defect.defect_no)
        )
        return [
            {c: getattr(d, c) for c in ("defect_no", "x_mm", "y_mm", "x0_mm", "y0_mm", "x1_mm",
                                         "y1_mm", "length_mm", "width_mm", "area_mm2", "max_score",
                                         "mean_score")}
            for d in rows
        ]  # fmt: skip


def assert_planted_found(found: list[dict], planted: list[PlantedDefect]) -> None:
    matched, false = match_defects(planted, found, PX_PER_MM)
    assert sorted(matched) == list(range(len(planted))), found
    for i, j in matched.items():
        x, y = planted[i].center_mm(PX_PER_MM)
        assert abs(found[j]["x_mm"] - x) <= 5 and abs(found[j]["y_mm"] - y) <= 5, (
            planted[i],
            found,
        )
    assert len(false) <= 1, [found[j] for j in false]
    across = [d for d in found if d["y0_mm"] < BAND / PX_PER_MM < d["y1_mm"]]
    assert len(across) == 1, found  # the hole across the band boundary is one defect, not two


def assert_same_defects(found: list[dict], expected: list[dict]) -> None:
    """Equal up to float noise between processes (thread count, batch size of the model)."""
    assert len(found) == len(expected), (found, expected)
    for a, b in zip(found, expected, strict=True):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-3), (a, b)


def wait_until_done(stack: Stack, roll_id: str, workers: list[Worker]) -> None:
    """Poll PostgreSQL until the roll and its run are done; fail early on a failure or crash."""
    deadline = time.monotonic() + ROLL_TIMEOUT_S
    while True:
        with stack.ctx.session() as session:
            roll_row = session.get(Roll, roll_id)
            run = session.scalar(select(Run).where(Run.roll_id == roll_id))
            state = (roll_row and (roll_row.status, roll_row.failure_reason),
                     run and (run.status, run.bands_done, run.bands_total))  # fmt: skip
        if roll_row is not None and roll_row.status == "done" and run.status == "done":
            return
        problem = None
        if roll_row is not None and roll_row.status == "failed":
            problem = "the roll failed"
        elif any(w.proc.poll() is not None for w in workers):
            problem = "a worker exited"
        elif time.monotonic() > deadline:
            problem = f"the roll is not done after {ROLL_TIMEOUT_S}s"
        if problem:
            pytest.fail(f"{problem}: roll, run = {state}\n{stack.diagnosis()}")
        time.sleep(0.5)


def wait_for_tasks(stack: Stack, task_ids: list[str], timeout: float = 120) -> dict[str, str]:
    """Task id → the return value the worker logged for it, once every one has succeeded."""
    deadline = time.monotonic() + timeout
    while True:
        logs = "\n".join(w.log() for w in stack.workers)
        results = {
            task_id: m[1]
            for task_id in task_ids
            if (m := re.search(rf"\[{task_id}\] succeeded in \S+s: (.*)", logs))
        }
        if len(results) == len(task_ids):
            return results
        if time.monotonic() > deadline:
            missing = sorted(set(task_ids) - set(results))
            pytest.fail(f"tasks {missing} did not succeed in {timeout}s\n{stack.diagnosis()}")
        time.sleep(0.5)


def assert_roll_done(stack: Stack, roll_id: str) -> None:
    with stack.ctx.session() as session:
        roll_row = session.get(Roll, roll_id)
        assert roll_row.rows_ingested == FRAMES * FRAME_ROWS
        run = session.scalar(select(Run).where(Run.roll_id == roll_id))
        assert (run.status, run.bands_total, run.bands_done, run.is_current) == ("done", 2, 2, True)
        bands = session.scalars(select(Band.status).where(Band.run_id == run.id)).all()
        assert sorted(bands) == ["done", "done"]
        frames = session.scalar(
            select(func.count()).select_from(Frame).where(Frame.roll_id == roll_id)
        )
        assert frames == FRAMES
    for started in stack.workers:
        assert "raised unexpected" not in started.log(), started.tail()


# --- tests -----------------------------------------------------------------------------------


def run_roll_and_check(stack: Stack, roll, reference: list[dict]) -> None:
    """One worker, the roll submitted, then the planted and the reference defects found."""
    stack.start_worker()
    submit(stack.ctx, str(roll[0]))
    wait_until_done(stack, ROLL_ID, stack.workers)
    assert_roll_done(stack, ROLL_ID)
    found = defects_of(stack.ctx, ROLL_ID)
    assert_planted_found(found, roll[1])
    assert_same_defects(found, reference)


def test_a_roll_through_redis_comes_out_at_the_planted_positions(
    make_stack, redis_broker, roll, reference
):
    run_roll_and_check(make_stack(redis_broker), roll, reference)


def test_duplicate_frames_and_finalizes_through_the_broker_change_nothing(
    make_stack, redis_broker, roll, reference
):
    stack = make_stack(redis_broker)
    stack.start_worker()
    submission = submit(stack.ctx, str(roll[0]))
    seq, key = submission.frames[1]
    mark = len(stack.published)
    stack.ctx.enqueue.ingest(ROLL_ID, seq, key)  # frame 2 again, queued behind the roll's own
    in_flight = [task_id for _, task_id in stack.published[mark:]]
    wait_until_done(stack, ROLL_ID, stack.workers)
    assert_roll_done(stack, ROLL_ID)
    before = defects_of(stack.ctx, ROLL_ID)
    assert_same_defects(before, reference)
    with stack.ctx.session() as session:
        run_id = session.scalar(select(Run.id).where(Run.roll_id == ROLL_ID))
    mark = len(stack.published)
    for _ in range(2):
        stack.ctx.enqueue.ingest(ROLL_ID, seq, key)
        stack.ctx.enqueue.finalize(run_id)
    after = stack.published[mark:]
    assert [name for name, _ in after] == ["rollscan.ingest", "rollscan.finalize"] * 2
    results = wait_for_tasks(stack, in_flight + [task_id for _, task_id in after])
    assert [results[task_id] for task_id in in_flight] == ["'unchanged'"]
    assert [results[task_id] for _, task_id in after] == ["'unchanged'", str(len(before))] * 2
    assert defects_of(stack.ctx, ROLL_ID) == before
    assert_roll_done(stack, ROLL_ID)


def test_a_roll_through_rabbitmq(make_stack, rabbitmq_broker, roll, reference):
    run_roll_and_check(make_stack(rabbitmq_broker), roll, reference)


def test_a_band_of_a_killed_worker_is_redelivered_to_the_next(
    make_stack, redis_broker, roll, reference
):
    stack = make_stack(redis_broker, broker_visibility_timeout=str(VISIBILITY_S))
    # one tile per model call: its band takes seconds, so the kill lands while it is scored
    first = stack.start_worker(batch_size="1")
    submit(stack.ctx, str(roll[0]))
    deadline = time.monotonic() + ROLL_TIMEOUT_S
    while not (m := re.search(r"Task rollscan\.score\[([0-9a-f-]+)\] received", first.log())):
        if time.monotonic() > deadline or first.proc.poll() is not None:
            pytest.fail(f"no band reached the worker\n{stack.diagnosis()}")
        time.sleep(0.05)
    received_at, task_id = time.monotonic(), m[1]
    time.sleep(0.3)  # into the task: the model loads, then the band's tiles are scored
    first.kill()
    with stack.ctx.session() as session:
        run = session.scalar(select(Run).where(Run.roll_id == ROLL_ID))
        assert run.bands_done == 0, "the band was done before the kill: make scoring slower"
    # Redis gives an unacknowledged task back once it is older than the visibility timeout;
    # a starting worker looks for such tasks at once (and then only every 100 s)
    time.sleep(max(0.0, received_at + VISIBILITY_S + 1 - time.monotonic()))
    second = stack.start_worker()
    wait_until_done(stack, ROLL_ID, [second])
    assert f"Task rollscan.score[{task_id}] received" in second.log(), second.tail()
    assert_roll_done(stack, ROLL_ID)
    found = defects_of(stack.ctx, ROLL_ID)
    assert_planted_found(found, roll[1])
    assert_same_defects(found, reference)
