"""int8 features on the CPU: teacher and student quantized by OpenVINO + NNCF, calibrated on
good tiles; the anomaly map stays in torch, in float32.

Why OpenVINO and not torch's own int8: on the 2-core AVX-512 (VNNI) machines here, the paper's
configuration (ResNet34, batch 8, 256²) through torch's PT2E flow with the x86 inductor
quantizer (torchao 0.18, compiled with freezing) ran at 7 tiles/s, slower than fp32 (9–10),
while the same features quantized by NNCF ran at 33–41 tiles/s in OpenVINO (docs/benchmarks.md).

Only the convolutions are quantized (weights per channel, activations per tensor, ranges from
the calibration tiles, biases corrected for the quantization's shift); layers NNCF leaves alone
run in bf16 where the CPU has it. When the map uses the memory bank, the teacher is left out of
the quantization and the whole model runs in float32: the bank holds float32 teacher features,
and quantized queries against it moved a bank-only model's tile AUROC by 0.014 on AITEX 03
(docs/benchmarks.md); a lite teacher is a small share of the work, the student the rest. Each batch
is split across one OpenVINO stream per thread — one single-threaded request per stream, run
concurrently — which measured faster than one request over all threads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from distill.torch_model import ReverseDistillation

CALIBRATION_TILES = 64  # good tiles a checkpoint keeps for quantizing at load time


def int8_available() -> bool:
    """True where OpenVINO and NNCF are installed (the `int8` extra)."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


_NOT_OPERATIONS = ("Parameter", "Constant", "Result")


def _teacher_operations(converted, n_teacher: int) -> list[str]:
    """Names of the operations the first `n_teacher` outputs (the teacher's levels) depend on:
    the teacher's own, since nothing of the student feeds them."""
    stack = [result for result in converted.get_results()[:n_teacher]]
    seen: dict[str, object] = {}
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in seen:
            continue
        seen[name] = node
        stack.extend(i.get_source_output().get_node() for i in node.inputs())
    return [name for name, node in seen.items() if node.get_type_name() not in _NOT_OPERATIONS]


def pick_calibration_tiles(images: torch.Tensor, count: int = CALIBRATION_TILES) -> torch.Tensor:
    """Up to `count` tiles spread evenly over `images` (N, H, W, C): what a checkpoint keeps."""
    index = np.unique(np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int))
    return images[torch.from_numpy(index)].clone()


class _Features(torch.nn.Module):
    """Teacher (and student, when the map uses it) → one flat tuple: what OpenVINO converts."""

    def __init__(self, model: ReverseDistillation) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        teacher = self.model.teacher(x)
        if not self.model.fusion.uses_student:
            return tuple(teacher)
        return (*teacher, *self.model.student(teacher))


class Int8Features:
    """The model's feature extractor as an int8 OpenVINO model; call it like the torch one.

    Built once per process (conversion and calibration take tens of seconds, docs say how
    long); every input shape gets its own compiled model, so callers pad batches to one shape.
    """

    def __init__(
        self,
        model: ReverseDistillation,
        calibration: torch.Tensor,
        *,
        threads: int | None = None,
        bf16: bool = False,
        quantize_teacher: bool | None = None,
    ) -> None:
        """`calibration`: normalised good tiles (N, 3, H, W) float32 — the activations' ranges
        come from these, so they must look like what will be scored. `quantize_teacher`: None
        quantizes it unless the map uses the memory bank (then the teacher stays float32, and
        so does every layer NNCF leaves alone, whatever `bf16` says)."""
        import nncf
        import openvino as ov

        # its INFO lines would fill a worker's log (its progress bars print regardless: NNCF
        # has no switch for them)
        nncf.set_log_level(logging.ERROR)

        if calibration.ndim != 4 or len(calibration) == 0:
            raise ValueError("int8 needs normalised calibration tiles shaped (N, 3, H, W)")
        self.n_teacher = len(model.teacher.channels)
        model = model.eval()
        with torch.no_grad():
            converted = ov.convert_model(_Features(model), example_input=calibration[:1])
        if quantize_teacher is None:
            quantize_teacher = not model.fusion.uses_memory
        self.quantize_teacher = quantize_teacher
        ignored = nncf.IgnoredScope(
            names=[] if quantize_teacher else _teacher_operations(converted, self.n_teacher),
            validate=False,  # NNCF's graph names only the operations it could quantize
        )
        chunks = [t.numpy()[None] for t in calibration.float().cpu()]
        self.model = nncf.quantize(
            converted, nncf.Dataset(chunks), subset_size=len(chunks), ignored_scope=ignored,
            preset=nncf.QuantizationPreset.MIXED,  # asymmetric activations: ReLU outputs
            # the full bias correction: on AITEX 03 it kept the pixel AUROC within 0.001 of
            # fp32 where the fast one lost 0.005 (docs/benchmarks.md), for ~1 min more
            fast_bias_correction=False,
        )  # fmt: skip
        self.threads = threads or torch.get_num_threads()
        self.config = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": self.threads,
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 and quantize_teacher else "f32",
        }
        self._core = ov.Core()
        self._requests: dict[tuple[int, ...], list] = {}

    def _requests_for(self, shape: Sequence[int]) -> list:
        key = tuple(shape)
        if key not in self._requests:
            reshaped = self.model.clone()
            reshaped.reshape({0: list(key)})
            compiled = self._core.compile_model(reshaped, "CPU", self.config)
            self._requests[key] = [compiled.create_infer_request() for _ in range(self.threads)]
        return self._requests[key]

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(N, 3, H, W) float32 → (teacher features, student features or []), float32."""
        x = x.float().contiguous(memory_format=torch.contiguous_format).cpu()
        n, streams = len(x), min(self.threads, len(x))
        if n % streams:  # padded to equal parts, one per stream (a batch that did not split
            # evenly had run on one stream, beside a compiled shape it never used)
            x = torch.cat([x, x[-1:].expand(streams - n % streams, *x.shape[1:])])
        parts = torch.tensor_split(x, streams)
        requests = self._requests_for(parts[0].shape)
        for request, part in zip(requests, parts, strict=False):
            request.start_async({0: part.numpy()})
        outputs = []
        for request in requests[: len(parts)]:
            request.wait()
            # torch.cat below copies out of the request's buffers, which the next call reuses
            outputs.append([torch.from_numpy(t.data) for t in request.output_tensors])
        levels = [torch.cat(level)[:n] for level in zip(*outputs, strict=True)]
        return levels[: self.n_teacher], levels[self.n_teacher :]
