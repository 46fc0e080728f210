"""The synthetic roll the broker tests run, what must come out of it, and how to wait for it
(a pytest plugin).

`celery_roll` is written once per session; `celery_reference` is its defects from the same
pipeline run in this process without Celery, in a database and object store of its own.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from fixtures_celery import BAND, FABRIC, Stack
from sqlalchemy import func, select

from distill.checkpoint import load_model, save_checkpoint
from rollscan_testing.services import Worker
from rollscan_testing.synthetic_roll import PlantedDefect, match_defects, write_synthetic_roll
from scheduler.submit import submit
from storage.database import is_transient_db_error, make_engine, upgrade
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


@pytest.fixture(scope="session")
def celery_roll(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PlantedDefect]]:
    folder = tmp_path_factory.mktemp("celery-roll") / ROLL_ID
    _, planted = write_synthetic_roll(
        folder, ROLL_ID, frames=FRAMES, frame_rows=FRAME_ROWS, width=WIDTH, plan=PLAN,
        px_per_mm=PX_PER_MM, fabric_type=FABRIC,
    )  # fmt: skip
    return folder, planted


@pytest.fixture(scope="session")
def celery_reference(celery_roll, make_database, twill_model: Path, tmp_path_factory) -> list[dict]:
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
        submit(ctx, str(celery_roll[0]))
        enqueuer.drain()
        found = defects_of(ctx, ROLL_ID)
    finally:
        engine.dispose()
    assert_planted_found(found, celery_roll[1])  # else the model, not Celery, is at fault
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


def assert_roll_came_out(stack: Stack, roll, reference: list[dict]) -> None:
    """The roll is done and whole, with the planted defects and the reference's."""
    assert_roll_done(stack, ROLL_ID)
    found = defects_of(stack.ctx, ROLL_ID)
    assert_planted_found(found, roll[1])
    assert_same_defects(found, reference)


def roll_state(stack: Stack, roll_id: str) -> tuple[Roll | None, Run | None]:
    with stack.ctx.session() as session:
        return session.get(Roll, roll_id), session.scalar(select(Run).where(Run.roll_id == roll_id))


def wait_until_done(stack: Stack, roll_id: str, workers: list[Worker]) -> None:
    """Poll PostgreSQL until the roll and its run are done; fail early on a failure or crash.

    A database that does not answer for a while (a fault test restarts it) is waited for."""
    deadline = time.monotonic() + ROLL_TIMEOUT_S
    state: object = "not read yet"
    while True:
        try:
            roll_row, run = roll_state(stack, roll_id)
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            roll_row = run = None
        else:
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


@pytest.fixture(scope="session")
def twill_versions(twill_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The twill model, and two copies with its threshold ×0.75 and ×0.9: other checkpoints, to
    be registered as newer versions of the fabric's model."""
    paths = [twill_model]
    for scale in (0.75, 0.9):
        model, card = load_model(twill_model)
        card.threshold *= scale
        folder = tmp_path_factory.mktemp(f"twill-x{scale}")
        paths.append(save_checkpoint(folder / "model.pt", model, card))
    return paths


@pytest.fixture
def make_inline_ctx(db_engine, local_store, twill_model: Path, tmp_path: Path, request):
    """A factory of in-process pipeline contexts (`InlineEnqueuer`, no broker) on the test's
    database and local store, with the session's twill model active for demo-twill — under the
    first of `versions` when given, the others registered as the `twill_versions` copies."""

    def make(
        band_height: int, versions: Sequence[str] = (), root: Path | None = None
    ) -> WorkerContext:
        """`root`: its data folder and local store under `root` (a small disk), not tmp_path."""
        store = local_store if root is None else LocalStore(root / "objects")
        settings = Settings(band_height=band_height, data_dir=(root or tmp_path) / "data",
                            device="cpu", batch_size=8)  # fmt: skip
        enqueuer = InlineEnqueuer()
        ctx = WorkerContext(settings, db_engine, store, enqueuer, device="cpu", batch_size=8)
        enqueuer.ctx = ctx
        paths = request.getfixturevalue("twill_versions") if versions else [twill_model]
        with ctx.session() as session:
            for i, path in enumerate(paths[: max(1, len(versions))]):
                version = versions[i] if versions else None
                model, _ = register_model(session, store, path, fabric_type=FABRIC,
                                          version=version)  # fmt: skip
                if i == 0:
                    activate_model(session, model.version)
        return ctx

    return make
