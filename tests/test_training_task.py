"""The train task's plain function: train on a category folder, register, optionally activate."""

import math
from pathlib import Path

import pytest

from distill.data.synthetic_defects import write_category
from storage.objectstore_local import LocalStore
from storage.registry import RegistryError, active_model, list_models, register_model
from storage.settings import Settings
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer
from worker.training import train_and_register
from worker.transient_errors import is_transient_error


def test_train_and_register(db_engine, local_store, tmp_path):
    data = write_category(
        tmp_path / "plain", n_train=8, n_test_good=1, n_test_defect=1, tile=64, seed=3
    )
    ctx = WorkerContext(
        Settings(data_dir=tmp_path / "d", device="cpu"), db_engine, local_store, InlineEnqueuer()
    )
    version = train_and_register(
        ctx,
        str(data),
        "plain-weave",
        version="plain-1",
        config={"epochs": 1, "tile": 64},
        activate=True,
    )
    assert version == "plain-1"
    with ctx.session() as session:
        assert [m.version for m in list_models(session, "plain-weave")] == ["plain-1"]
        model = active_model(session, "plain-weave")
        # a threshold on the fused map's z-scores: any finite number (negative on this tiny set)
        assert model.version == "plain-1" and model.tile == 64 and math.isfinite(model.threshold)


def test_a_model_trained_on_a_local_teacher_file_is_registered_with_its_teacher(
    db_engine, local_store, tmp_path
):
    """The task's config names a weight file on the worker (the paper's ResNet34 has no wheel):
    the model was trained, then refused by the registry. Its teacher goes into the store."""
    import torch

    from distill.teacher import build_teacher
    from storage.registry import teacher_key

    weights = tmp_path / "r18.pth"
    torch.save(build_teacher("resnet18", "random", seed=4).backbone.state_dict(), weights)
    data = write_category(
        tmp_path / "plain", n_train=8, n_test_good=1, n_test_defect=1, tile=64, seed=3
    )
    ctx = WorkerContext(
        Settings(data_dir=tmp_path / "d", device="cpu"), db_engine, local_store, InlineEnqueuer()
    )
    config = {"epochs": 1, "tile": 64, "scorer": "memory", "teacher": "resnet18",
              "teacher_weights": str(weights)}  # fmt: skip
    version = train_and_register(ctx, str(data), "plain-weave", config=config)
    with ctx.session() as session:
        (model,) = list_models(session, "plain-weave")
        assert model.version == version and model.teacher == "resnet18"
        assert local_store.exists(teacher_key(model.teacher_sha256))


def test_a_request_no_model_could_satisfy_is_refused_before_training(
    db_engine, local_store, tmp_path
):
    ctx = WorkerContext(
        Settings(data_dir=tmp_path / "d", device="cpu"), db_engine, local_store, InlineEnqueuer()
    )
    never_read = str(tmp_path / "no-such-category")  # training would fail on it: not reached
    for fabric, version, reason in [
        (None, None, "generic model must be a DG-variant"),
        ("denim 12oz", None, "fabric type 'denim 12oz' is not allowed"),
        ("denim", "../v1", "not allowed"),
    ]:
        with pytest.raises(RegistryError, match=reason):
            train_and_register(ctx, never_read, fabric, version=version, config={"tile": 64})


def test_a_trained_model_that_cannot_be_registered_is_kept(db_engine, tmp_path):
    """The store refuses the upload (here a file stands where its models folder goes): the
    checkpoint is kept and named — it was in a temporary folder, deleted with the error — and
    the error is not one the task retries (a retry would train again)."""
    data = write_category(
        tmp_path / "plain", n_train=8, n_test_good=1, n_test_defect=1, tile=64, seed=3
    )
    broken = LocalStore(tmp_path / "store")  # makes its folder
    (tmp_path / "store" / "models").write_text("not a folder")
    ctx = WorkerContext(
        Settings(data_dir=tmp_path / "d", device="cpu"), db_engine, broken, InlineEnqueuer()
    )
    config = {"epochs": 1, "tile": 64, "scorer": "memory"}
    with pytest.raises(RegistryError, match="trained, but not registered") as caught:
        train_and_register(ctx, str(data), "plain-weave", version="plain-1", config=config)
    kept = Path(str(caught.value).split("kept at ")[1].split(":")[0])
    assert kept.is_file() and kept.parent == tmp_path / "d" / "trained"
    assert not is_transient_error(caught.value)
    (tmp_path / "store" / "models").unlink()  # repaired: registered by hand from the file kept
    with ctx.session() as session:
        model, created = register_model(
            session, broken, kept, fabric_type="plain-weave", version="plain-1"
        )
        assert created and model.version == "plain-1"


def test_a_training_whose_worker_keeps_dying_is_given_up(db_engine, tmp_path, env_context):
    """It was delivered again without end (uncounted), hours of GPU each time, beside scoring."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from storage.schema import TaskDelivery
    from worker.deliveries import GIVEN_UP
    from worker.tasks import train, training_delivery

    request = (str(tmp_path / "never-read"), "plain-weave", "plain-9", {"tile": 64})
    delivery = training_delivery(*request)
    with Session(db_engine) as session, session.begin():  # three deliveries died with workers
        session.add(TaskDelivery(task=delivery.task, key=delivery.key, unfinished=3, retries=0))
    env_context(db_engine, tmp_path / "data")
    assert train.apply(request).get() == GIVEN_UP  # not trained: its folder is never read
    with Session(db_engine) as session:
        assert session.scalar(select(func.count()).select_from(TaskDelivery)) == 0
