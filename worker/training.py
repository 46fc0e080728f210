"""Training as a task: train on a category folder the worker can read, then register the model."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from distill.train import TrainConfig, train
from storage.registry import activate_model, register_model
from worker.context import WorkerContext


def train_and_register(
    ctx: WorkerContext,
    data: str,
    fabric_type: str | None,
    version: str | None = None,
    config: dict[str, Any] | None = None,
    activate: bool = False,
) -> str:
    """Train (the model issue's recipe, `config` overriding defaults) and register; return the version."""
    options = {"device": ctx.settings.device, **(config or {})}
    with tempfile.TemporaryDirectory(prefix="rollscan-train-") as tmp:
        checkpoint = Path(tmp) / "model.pt"
        train(data, checkpoint, TrainConfig(**options), progress=False)
        with ctx.session() as session:
            model, _ = register_model(
                session, ctx.store, checkpoint, fabric_type=fabric_type, version=version
            )
            if activate:
                activate_model(session, model.version)
            return model.version
