"""Training: the official recipe (Adam 0.005, batch 4, plateau schedule, early stop, 30 % held out).

The held-out good tiles serve twice: validation loss for the schedule and early stop, then the
calibration of the decision threshold to a target false-alarm rate.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2.functional import gaussian_blur
from tqdm.auto import tqdm

from distill.calibration import calibrate_threshold
from distill.checkpoint import ModelCard, save_checkpoint
from distill.data.mvtec import Category, load_stack
from distill.inference import Detector, resolve_device
from distill.loss import DistillationLoss
from distill.preprocess import normalise
from distill.teacher import DEFAULT_TEACHER, IMAGENET_MEAN, IMAGENET_STD, build_teacher
from distill.torch_model import ReverseDistillation

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    teacher: str = DEFAULT_TEACHER
    teacher_weights: str | None = None
    variant: str = "residual"
    epochs: int = 100
    batch: int = 4
    lr: float = 0.005
    betas: tuple[float, float] = (0.9, 0.999)
    val_ratio: float = 0.3
    lr_patience: int = 5
    stop_patience: int = 10
    tile: int = 256
    seed: int = 0
    device: str = "cpu"
    fpr: float = 0.001
    level_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    sigma: float = 4.0
    max_minutes: float | None = None  # a time budget (the demo's); None trains to the end
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch < 1:
            raise ValueError("epochs and batch must be at least 1")
        if not 0 < self.val_ratio < 1:
            raise ValueError(f"val_ratio must be in (0, 1), not {self.val_ratio}")
        if not 0 <= self.fpr < 1:
            raise ValueError(f"fpr must be in [0, 1), not {self.fpr}")


def _blur(x: torch.Tensor) -> torch.Tensor:
    # the official recipe blurs train and validation inputs (3×3, σ = 0.8, torchvision's default)
    return gaussian_blur(x, kernel_size=[3, 3], sigma=[0.8, 0.8])


def split_held_out(n: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into (train, held-out) indices; at least one image on each side."""
    if n < 2:
        raise ValueError(f"need at least 2 good training images, found {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, int(n * ratio)), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        teacher = build_teacher(config.teacher, config.teacher_weights, seed=config.seed)
        self.model = ReverseDistillation(teacher, config.variant, sigma=config.sigma).to(
            self.device
        )
        self.loss = DistillationLoss(config.level_weights).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.model.student.parameters(), lr=config.lr, betas=config.betas
        )
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=0.1, patience=config.lr_patience
        )

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        x, _ = normalise(images, IMAGENET_MEAN, IMAGENET_STD, self.device)
        return _blur(x)

    def train_epoch(self, images: torch.Tensor, bar: tqdm) -> float:
        self.model.train()
        order = torch.randperm(images.shape[0])
        total, count = 0.0, 0
        for start in range(0, len(order), self.config.batch):
            batch = images[order[start : start + self.config.batch]]
            if batch.shape[0] < 2 and len(order) > 1:
                continue  # BatchNorm cannot train on a batch of one
            teacher, student = self.model(self._inputs(batch))
            loss = self.loss(teacher, student)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item() * batch.shape[0]
            count += batch.shape[0]
            bar.update(batch.shape[0])
            bar.set_postfix(
                loss=f"{total / count:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.0e}"
            )
        return total / max(count, 1)

    @torch.no_grad()
    def validate(self, images: torch.Tensor) -> float:
        self.model.eval()
        total = 0.0
        for start in range(0, images.shape[0], 8):
            batch = images[start : start + 8]
            teacher, student = self.model.features(self._inputs(batch))
            total += self.loss(teacher, student).item() * batch.shape[0]
        return total / images.shape[0]


def train(
    data: str | Path, out: str | Path, config: TrainConfig, progress: bool = True
) -> ModelCard:
    """Train on DIR/train/good, keep the best checkpoint (validation loss), calibrate, save."""
    started = time.perf_counter()
    category = Category.open(data)
    images = torch.from_numpy(load_stack(category.train, config.tile))
    train_idx, val_idx = split_held_out(images.shape[0], config.val_ratio, config.seed)
    train_images, val_images = images[train_idx], images[val_idx]
    trainer = Trainer(config)
    card = ModelCard(
        teacher=config.teacher,
        teacher_weights=trainer.model.teacher.weights_source,
        teacher_sha256=trainer.model.teacher.weights_sha256(),
        variant=config.variant,
        tile=config.tile,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        sigma=config.sigma,
        level_weights=tuple(config.level_weights),
        target_fpr=config.fpr,
        train_config={k: v for k, v in asdict(config).items() if k != "extra"},
    )
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    best_loss, best_epoch, best_state, stale = float("inf"), 0, None, 0
    deadline = None if config.max_minutes is None else started + 60 * config.max_minutes
    total = config.epochs * len(train_idx)
    with tqdm(
        total=total, desc="train", unit="tile", disable=not progress, dynamic_ncols=True
    ) as bar:
        for epoch in range(1, config.epochs + 1):
            history["train_loss"].append(trainer.train_epoch(train_images, bar))
            val_loss = trainer.validate(val_images)
            history["val_loss"].append(val_loss)
            trainer.scheduler.step(val_loss)
            bar.write(
                f"epoch {epoch}: train loss {history['train_loss'][-1]:.4f}, val loss {val_loss:.4f}"
            )
            if val_loss < best_loss:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = copy.deepcopy(trainer.model.student.state_dict())
                save_checkpoint(out, trainer.model, card)  # the best so far survives a crash
            else:
                stale += 1
                if stale >= config.stop_patience:
                    bar.write(f"early stop: no better validation loss for {stale} epochs")
                    break
            if deadline is not None and time.perf_counter() > deadline:
                bar.write(f"time budget of {config.max_minutes} min reached after epoch {epoch}")
                break
    trainer.model.student.load_state_dict(best_state)
    detector = Detector(trainer.model, card.mean, card.std, device=trainer.device, precision="fp32")
    val_scores = detector.predict(val_images.numpy()).scores
    calibration = calibrate_threshold(val_scores, config.fpr)
    card.threshold = calibration.threshold
    card.metrics = {
        "epochs": len(history["val_loss"]),
        "best_epoch": best_epoch,
        "best_val_loss": best_loss,
        "n_train": len(train_idx),
        "n_held_out": len(val_idx),
        "held_out_score_max": float(val_scores.max()),
        "held_out_score_mean": float(val_scores.mean()),
        "threshold_method": calibration.method,
        "seconds": round(time.perf_counter() - started, 1),
        **history,
    }
    save_checkpoint(out, trainer.model, card)
    return card
