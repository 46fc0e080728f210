"""Input checks and conversion: any H×W ≥ 64, 1 or 3 channels, uint8 / uint16 / float in [0, 1].

Conversion to float, normalisation and padding run in torch on the target device, so a GPU
worker ships uint8 tiles across the bus, not float32 ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from distill.anomaly_map import EdgeTiles

MIN_SIDE = 64
PAD_MULTIPLE = 32  # the embedding reaches stride 32
_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}


def as_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Check images and return them as an (N, H, W, C) tensor (dtype kept, C ∈ {1, 3}).

    Accepts (H, W), (H, W, C), (N, H, W) grey and (N, H, W, C). Raises ValueError with a plain message for
    anything else: wrong rank, empty, too small, a channel count other than 1 or 3, NaN or
    infinity, an unsupported dtype.
    """
    array = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3:
        # (H, W, C) when the last axis is channel-sized (no valid image is 4 px wide: the
        # channel check below then names the problem), else a grey batch (N, H, W)
        array = array[None] if array.shape[-1] <= 4 else array[..., None]
    elif array.ndim != 4:
        raise ValueError(
            f"expected an image (H, W), (H, W, C) or a batch (N, H, W, C); got {array.ndim} "
            f"dimensions with shape {tuple(array.shape)}"
        )
    _, h, w, c = array.shape
    if array.numel() == 0:
        raise ValueError(f"empty image batch of shape {tuple(array.shape)}")
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ValueError(f"image {h}×{w} is too small: both sides must be at least {MIN_SIDE} px")
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, not {c} (shape {tuple(array.shape)})")
    if array.dtype.is_floating_point:
        if not torch.isfinite(array).all():
            raise ValueError("image contains NaN or infinite values")
    elif array.dtype not in _SCALE:
        raise ValueError(f"unsupported image dtype {array.dtype}: use uint8, uint16 or float")
    return array


@lru_cache(maxsize=16)
def _channel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors on `device`, made once: a GPU copy per batch would
    wait for the device to finish the previous batch, leaving it idle while the next is queued.
    Made as normal tensors even under inference mode, since training normalises with them too."""
    with torch.inference_mode(False):
        return (
            torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1),
        )


def normalise(
    batch: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N, H, W, C) → normalised (N, 3, H', W') float32 on `device`, padded to a multiple of 32.

    Returns the tensor and the original (H, W) to crop maps back to. Padding reflects the
    fabric, so the border does not look like a defect.
    """
    scale = 1.0 if batch.dtype.is_floating_point else _SCALE[batch.dtype]
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(scale)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean_t, std_t = _channel_stats(tuple(map(float, mean)), tuple(map(float, std)), x.device)
    x = (x - mean_t) / std_t
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    return x, (h, w)


def edge_tiles(fabric: np.ndarray | torch.Tensor | None, x: torch.Tensor) -> EdgeTiles | None:
    """The tiles of a batch `x` (as `normalise` made it) that hold pixels off the fabric, from
    (N, H, W) host booleans, True on fabric: their indices and masks on `x`'s device, padded as
    the images were (by reflection). None when every tile is fabric throughout (or no `fabric`).
    Found on the host, so that a GPU's queue never waits for the answer."""
    if fabric is None:
        return None
    fabric = np.asarray(fabric, dtype=bool)
    if fabric.ndim != 3 or fabric.shape[0] != x.shape[0]:
        raise ValueError(f"fabric must be ({x.shape[0]}, H, W) booleans, not {fabric.shape}")
    pad_h, pad_w = x.shape[-2] - fabric.shape[1], x.shape[-1] - fabric.shape[2]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"fabric of {fabric.shape[1:]} for images of {tuple(x.shape[-2:])}")
    index = np.flatnonzero(~fabric.reshape(len(fabric), -1).all(axis=1))
    if len(index) == 0:
        return None
    on = torch.from_numpy(fabric[index])
    if pad_h or pad_w:
        on = F.pad(on[:, None].float(), (0, pad_w, 0, pad_h), mode="reflect")[:, 0] > 0.5
    index = torch.from_numpy(index)
    if x.device.type == "cuda":  # a copy from pinned memory is queued, not waited for
        index, on = index.pin_memory(), on.pin_memory()
    return EdgeTiles(index.to(x.device, non_blocking=True), on.to(x.device, non_blocking=True))
