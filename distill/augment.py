"""Training augmentation suited to fabric seen by a line-scan camera.

Each option mimics a change a good roll really goes through, so the student learns it is normal:
``flip`` (a roll scanned the other way round or face down: mirrored along or across), ``shift``
(the tile grid falls anywhere on the weave: a random cyclic shift of up to a quarter tile, which
keeps the texture seamless only approximately, so it stays small), ``jitter`` (lighting drift
along a roll and between lamps: brightness ±10 %, contrast ±10 %). Nothing here invents texture,
so no augmentation can teach the student that a defect is normal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

AUGMENTATIONS: tuple[str, ...] = ("flip", "shift", "jitter")
_JITTER = 0.1


def check_augmentations(names: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(names) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(
            f"unknown augmentation {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}"
        )
    return tuple(name for name in AUGMENTATIONS if name in names)


def augment(
    x: torch.Tensor,
    names: Sequence[str],
    generator: torch.Generator,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a (B, H, W, C) float batch in [0, 1], each image independently; seeded.

    `valid` (B, H, W), the fabric pixels of each image, moves with the flips and shifts."""
    if not names:
        return x, valid
    b = x.shape[0]
    out = x.clone()
    keep = None if valid is None else valid.clone()
    if "flip" in names:
        for axis in (1, 2):
            flip = torch.rand(b, generator=generator) < 0.5
            out[flip] = out[flip].flip(axis)
            if keep is not None:
                keep[flip] = keep[flip].flip(axis)
    if "shift" in names:
        limit = min(x.shape[1], x.shape[2]) // 4
        shifts = torch.randint(-limit, limit + 1, (b, 2), generator=generator)
        for i in range(b):
            shift = (int(shifts[i, 0]), int(shifts[i, 1]))
            out[i] = out[i].roll(shift, dims=(0, 1))
            if keep is not None:
                keep[i] = keep[i].roll(shift, dims=(0, 1))
    if "jitter" in names:
        gain = 1 + _JITTER * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
        offset = _JITTER * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * gain + mean + offset).clamp_(0, 1)
    return out, keep
