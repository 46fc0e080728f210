"""Fast scoring: inference mode, channels-last, bf16 autocast where the device has it, batches.

The student runs in the fast precision, the teacher too where only a memory bank with a bf16
twin reads its features (otherwise float32, see `mixed_precision_features`); the anomaly map
(cosine, nearest-neighbour distances, upsampling, smoothing) always runs in float32, so bf16 moves
scores by rounding only and not by accumulated error in the map.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from distill.anomaly_map import tile_scores
from distill.fold import folded_copy
from distill.int8_features import Int8Features, int8_available
from distill.preprocess import as_batch, edge_tiles, normalise
from distill.torch_model import ReverseDistillation

Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")  # training's, and scoring's but int8
SCORING_PRECISIONS: tuple[str, ...] = (*PRECISIONS, "int8")


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 runs natively: CUDA GPUs that report it, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether `precision` means bf16 on `device` ("auto": where it runs natively); ValueError
    for an unknown precision or bf16 asked of a device without it."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not bf16_supported(device):
        raise ValueError(f"bf16 requested but {device} has no native bf16 support")
    return precision == "bf16" or (precision == "auto" and bf16_supported(device))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return device


def check_scoring_setup(device: str, precision: str) -> None:
    """ValueError, saying why, where a scorer set up with `device` and `precision` cannot run on
    this machine (a worker checks it before it takes work: the error at its first band failed
    that band's roll, and the next, for as long as it ran).

    Safe before a fork: CUDA is asked through NVML (`device_count`), never initialised — a
    prefork worker's children could not use a GPU their parent had initialised — so a GPU's bf16
    is left to the first band (the GPUs rollscan targets all have it)."""
    count = torch.cuda.device_count()
    target = torch.device(("cuda" if count else "cpu") if device == "auto" else device)
    if target.type == "cuda":
        if count == 0:
            raise ValueError(f"device {device!r} requested but no CUDA GPU is available")
        if target.index is not None and target.index >= count:
            raise ValueError(f"device {device!r} requested but this machine has {count} GPU(s)")
        if precision == "int8":
            raise ValueError(f"int8 runs on the CPU, not {target} (set the device to cpu)")
    elif target.type == "cpu":
        if precision == "int8" and not int8_available():
            raise ValueError("int8 needs OpenVINO and NNCF: pip install 'rollscan[int8]'")
        if precision == "bf16" and not bf16_supported(target):
            raise ValueError("bf16 requested but this CPU has no native bf16 (AVX512-BF16, AMX)")


@dataclass(frozen=True)
class Prediction:
    """What `Detector.predict` returns for a batch: the anomaly maps, their maxima (the tile
    scores) and the seconds it took."""

    maps: np.ndarray  # (N, H, W) float32
    scores: np.ndarray  # (N,) float32, the maps' maxima
    seconds: float


class Detector:
    """A trained model ready to score images; the one object the pipeline and evaluation use."""

    def __init__(
        self,
        model: ReverseDistillation,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        threshold: float | None = None,
        device: str | torch.device | None = "cpu",
        precision: Precision = "auto",
        channels_last: bool = True,
        batch_size: int = 16,
        compile: bool = False,
        calibration: np.ndarray | torch.Tensor | None = None,
        tile_layout: str = "grid",
        trained_input: dict | None = None,
    ) -> None:
        """`tile_layout`: how a roll's tiles are laid for this model (`TrainConfig.tile_layout`,
        `distill.train_config`); `trained_input`: what its training tiles were
        (`distill.input_fit.training_input`; empty: unknown).

        `compile`: teacher, student and map as one graph through torch.compile (inductor,
        asked to freeze; on torch 2.14 the weights stay inputs of the graph, which two models
        of one architecture share). The first batch of each tile size compiles it (tens of
        seconds, once per process; `load_detector` does it when loading, and falls back to
        eager where it cannot); every batch is padded to `batch_size` so that no other shape
        compiles again.

        `precision="int8"` (CPU only): the features run quantized in OpenVINO
        (`distill.int8_features`), calibrated on `calibration` — good tiles (N, H, W[, C]), the
        ones a checkpoint keeps — and the map in torch float32, compiled when `compile`."""
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        self.device = resolve_device(device)
        self.int8 = None
        if precision == "int8":
            self.int8 = self._int8_features(model, mean, std, calibration)
        self.bf16 = False if self.int8 is not None else use_bf16(precision, self.device)
        self.channels_last = channels_last
        self.batch_size = batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.threshold = threshold
        self.tile_layout = tile_layout
        self.trained_input = dict(trained_input or {})
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=memory_format)
        # the eager path scores with a copy whose BatchNorms are folded into their convolutions
        # (inductor's freezing and OpenVINO fold their own); `model` stays as it is
        self._eager = self.model if compile or self.int8 is not None else folded_copy(self.model)
        memory = model.memory
        if (
            self.bf16 and not compile and memory is not None and memory.twin is not None
            and memory.twin_device == self.device.type and not model.fusion.uses_student
        ):  # fmt: skip
            # the teacher in bf16 too, its features compared with the bank's bf16 twin (made by
            # this same folded eager teacher on this kind of device); compiled, inductor's fused
            # kernels round otherwise (AITEX 03: +0.0071 tile AUROC against the twin), another
            # device's bf16 kernels are unmeasured, and a student's map needs the float32
            # teacher (`mixed_precision_features`): there the teacher stays float32
            self._eager.memory.use_twin()
        self.teacher_bf16_twin = self._eager.memory is not None and self._eager.memory.reads_bf16
        self.compiled = None
        if compile and self.int8 is not None:
            self.compiled = torch.compile(self.model.maps)
        elif compile:
            whole = _WholeMap(self.model, self.bf16)
            self.compiled = torch.compile(whole, options={"freezing": True})

    def _int8_features(self, model, mean, std, calibration) -> Int8Features:
        if self.device.type != "cpu":
            raise ValueError(f"int8 runs on the CPU, not {self.device}")
        if calibration is None or len(calibration) == 0:
            raise ValueError(
                "int8 needs good tiles to calibrate on: this checkpoint keeps none (retrain it)"
            )
        if not int8_available():
            raise ValueError("int8 needs OpenVINO and NNCF: pip install 'rollscan[int8]'")
        tiles, _ = normalise(as_batch(calibration), mean, std, self.device)
        return Int8Features(model, tiles, bf16=bf16_supported(self.device))

    @property
    def mode(self) -> str:
        precision = "int8" if self.int8 is not None else "bf16" if self.bf16 else "fp32"
        return (
            f"{precision}{' channels-last' if self.channels_last else ''}"
            f"{' compiled' if self.compiled is not None else ''}"
            f"{', teacher bf16 against the bank twin' if self.teacher_bf16_twin else ''}"
            f"{', teacher float32' if self.bf16 and not self.teacher_bf16_twin else ''}"
        )

    @torch.inference_mode()
    def score_tensor(
        self, batch: torch.Tensor, fabric: np.ndarray | torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, H, W, C) uint8/uint16/float tensor → (N, H, W) float32 maps on the device.

        `fabric`: (N, H, W) booleans, True on fabric (None: all fabric); a tile with pixels off
        the fabric gets its map over the fabric from the fabric alone (`AnomalyMap`)."""
        x, (h, w) = normalise(batch, self.mean, self.std, self.device)
        edges = edge_tiles(fabric, x)
        n = x.shape[0]
        size = tuple(x.shape[-2:])
        fixed_shape = self.compiled is not None or self.int8 is not None
        if fixed_shape and n < self.batch_size:  # one shape, one compilation
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        if self.int8 is not None:
            teacher, student = self.int8(x)
            maps = (self.compiled or self.model.maps)(teacher, student or None, size)[:n]
            if edges is not None:  # the compiled map takes no fabric: the edge tiles' again
                picked = (
                    [t[edges.index] for t in teacher],
                    [s[edges.index] for s in student] or None,
                )
                again = self.model.maps(*picked, size, edges.alone())
                maps = maps.index_copy(0, edges.index, again)
            return maps[:, :h, :w]
        if self.channels_last:  # after padding: the strides are part of the compiled shape
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None:
            maps = self.compiled(x)[:n]
            if edges is not None:  # the compiled graph takes no fabric: the edge tiles eagerly
                features = mixed_precision_features(self._eager, x[edges.index], self.bf16)
                again = self._eager.maps(*features, size, edges.alone())
                maps = maps.index_copy(0, edges.index, again)
            return maps[:, :h, :w]
        teacher, student = mixed_precision_features(self._eager, x, self.bf16)
        maps = self._eager.maps(teacher, student, size, edges)
        return maps[:, :h, :w]

    def iter_batches(
        self, images: np.ndarray | torch.Tensor, fabric: np.ndarray | torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
        batch = as_batch(images)
        if fabric is not None and len(fabric) != batch.shape[0]:
            raise ValueError(f"{len(fabric)} fabric masks for {batch.shape[0]} images")
        for start in range(0, batch.shape[0], self.batch_size):
            stop = start + self.batch_size
            yield self.score_tensor(
                batch[start:stop], None if fabric is None else fabric[start:stop]
            )

    def predict(
        self, images: np.ndarray | torch.Tensor, fabric: np.ndarray | torch.Tensor | None = None
    ) -> Prediction:
        """Score (H, W[, C]) or (N, H, W, C) images; maps come back cropped to the input size.
        `fabric`: where the fabric lies in them, see `score_tensor`."""
        start = time.perf_counter()
        maps = torch.cat([m.float().cpu() for m in self.iter_batches(images, fabric)])
        seconds = time.perf_counter() - start
        return Prediction(maps.numpy(), tile_scores(maps).numpy(), seconds)

    def is_defective(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise ValueError("this model has no calibrated threshold")
        return np.asarray(scores) > self.threshold


class _WholeMap(torch.nn.Module):
    """Teacher → student → map as one module, the unit torch.compile sees."""

    def __init__(self, model: ReverseDistillation, bf16: bool) -> None:
        super().__init__()
        self.model, self.bf16 = model, bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        teacher, student = mixed_precision_features(self.model, x, self.bf16)
        return self.model.maps(teacher, student, tuple(x.shape[-2:]))


def mixed_precision_features(
    model: ReverseDistillation, x: torch.Tensor, bf16: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Teacher and student features (the student's None when the map does not use it), the
    student in bf16 where `bf16` says, the teacher in bf16 only where a memory bank scoring with
    its bf16 twin (`MemoryBank.use_twin`, its vectors rounded as the queries are) is the only map
    that reads it. Elsewhere the teacher stays float32 (docs/benchmarks.md, AITEX): bf16 queries
    against a float32 bank moved a bank-only model's tile AUROC by 0.007–0.009 (03); a student's
    map compares the teacher's features themselves, and a bf16 teacher moved student-only tile
    AUROC by up to 0.0066 (06) where the student in bf16 under a float32 teacher moved none by
    more than 0.0003."""
    memory = model.memory if model.fusion.uses_memory else None
    teacher_bf16 = (
        bf16 and not model.fusion.uses_student and memory is not None and memory.reads_bf16
    )
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=teacher_bf16):
        teacher = model.teacher(x)
    if not model.fusion.uses_student:
        return teacher, None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return teacher, model.student(teacher)
