"""The student's training loop: epochs under the plateau schedule, early stop and an optional
time budget, keeping the weights of the best validation loss."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from distill.progress import progress_bar
from distill.teacher_cache import cache_for

if TYPE_CHECKING:
    from distill.train import Trainer


@dataclass
class StudentFit:
    """What training the student left: its best weights and the loss history."""

    best_state: dict | None = None
    best_loss: float = float("inf")
    best_epoch: int = 0
    history: dict[str, list[float]] = field(
        default_factory=lambda: {"train_loss": [], "val_loss": []}
    )


def fit_student(
    trainer: Trainer,
    train_images: torch.Tensor,
    train_valid: torch.Tensor | None,
    val_images: torch.Tensor,
    save_best: Callable[[], object],
    progress: bool,
    val_valid: torch.Tensor | None = None,
) -> StudentFit:
    config = trainer.config
    fit, stale = StudentFit(), 0
    deadline = None if config.max_minutes is None else time.perf_counter() + 60 * config.max_minutes
    total = config.epochs * len(train_images)
    train_cache, val_cache, cached = cache_for(trainer, train_images, val_images, progress)
    with progress_bar(
        total=total, desc="train", unit="tile", disable=not progress, dynamic_ncols=True
    ) as bar:
        bar.write(cached)
        for epoch in range(1, config.epochs + 1):
            began = time.perf_counter()
            fit.history["train_loss"].append(
                trainer.train_epoch(train_images, bar, train_valid, train_cache)
            )
            val_loss = trainer.validate(val_images, val_cache, val_valid)
            fit.history["val_loss"].append(val_loss)
            trainer.scheduler.step(val_loss)
            bar.write(
                f"epoch {epoch}: train loss {fit.history['train_loss'][-1]:.4f}, val loss "
                f"{val_loss:.4f} ({time.perf_counter() - began:.0f} s)"
            )
            if not math.isfinite(val_loss):  # NaN weights: every later epoch is NaN too
                bar.write(f"training diverged at epoch {epoch} (val loss {val_loss})")
                break
            if val_loss < fit.best_loss:
                fit.best_loss, fit.best_epoch, stale = val_loss, epoch, 0
                fit.best_state = copy.deepcopy(trainer.model.student.state_dict())
                save_best()  # the best so far survives a crash
            else:
                stale += 1
                if stale >= config.stop_patience:
                    bar.write(f"early stop: no better validation loss for {stale} epochs")
                    break
            if deadline is not None and time.perf_counter() > deadline:
                bar.write(f"time budget of {config.max_minutes} min reached after epoch {epoch}")
                break
    if fit.best_state is None:
        raise ValueError(
            f"training diverged: no epoch gave a finite validation loss; lower --lr (now "
            f"{config.lr:g})"
        )
    return fit
