"""The train task's plain function: train on a category folder, register, optionally activate."""

import math

from distill.data.synthetic_defects import write_category
from storage.registry import active_model, list_models
from storage.settings import Settings
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer
from worker.training import train_and_register


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
