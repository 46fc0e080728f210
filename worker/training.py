"""Training as a task: train on a category folder the worker can read, then register the model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distill.train import TrainConfig, train
from storage.registry import (
    RegistryError,
    activate_model,
    check_request,
    check_version_free,
    register_model,
)
from worker.context import WorkerContext


def train_and_register(
    ctx: WorkerContext,
    data: str,
    fabric_type: str | None,
    version: str | None = None,
    config: dict[str, Any] | None = None,
    activate: bool = False,
) -> str:
    """Train (the model issue's recipe, `config` overriding defaults) and register; return the
    version.

    The request is checked before training (a name no checkpoint could be registered under is
    refused in seconds, not after an hour), and the checkpoint is written under the worker's
    data directory first: if registering it fails all the same, the error names the file, to
    register by hand (`rollscan models register`), and the task is not retried — a retry would
    train again."""
    train_config = TrainConfig(**{"device": ctx.settings.device, **(config or {})})
    check_request(fabric_type, version, train_config.variant)
    if version is not None:
        with ctx.session() as session:
            check_version_free(session, version)
    folder = Path(ctx.settings.data_dir) / "trained"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{fabric_type or 'generic'}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9}"
    checkpoint = folder / f"{stem}.pt"
    problem = None
    try:  # a full disk (at the checkpoint's save) is transient elsewhere: here a retry trains again
        train(data, checkpoint, train_config, progress=False)
    except OSError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:  # raised outside the handler: no transient cause to retry on
        raise RuntimeError(f"training failed, not retried (it would train again): {problem}")
    try:
        with ctx.session() as session:
            model, _ = register_model(
                session, ctx.store, checkpoint, fabric_type=fabric_type, version=version,
                teacher_weights=train_config.teacher_weights,
            )  # fmt: skip
            if activate:
                activate_model(session, model.version)
            registered = model.version
    except Exception as exc:  # a transient one too: retrying the task would train again
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:  # raised outside the handler: no transient cause to retry on
        raise RegistryError(
            f"trained, but not registered ({problem}); the model is kept at {checkpoint}: "
            f"register it with `rollscan models register {checkpoint} …`"
        )
    checkpoint.unlink()  # the store holds it now, content-addressed
    return registered
