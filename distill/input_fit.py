"""Whether a roll's pixels are what a model was trained on: colour and resolution.

A model sees only what its training tiles showed. A grey model scoring a colour roll, a colour
model scoring a grey one, or either at twice or half its training resolution maps the whole roll
as anomalous: one roll-wide defect, graded reject without a word. Training records what its tiles
were (`training_input`, kept in the card's `train_config`); a worker checks each band against it
(`input_misfit`) and fails the roll — or a reprocess run alone — saying why.
"""

from __future__ import annotations

import numpy as np

# mean |R−G| + |G−B| (grey levels of 255) under which pixels are grey in three channels
_GREY_SPREAD = 1.0
# the most a roll's resolution may differ from the training tiles' (a fabric's texture is
# recognised within a few per cent of its scale; at 2× or ½ nothing is)
SCALE_TOLERANCE = 0.15


def colour_channels(pixels: np.ndarray, sample: int = 65536) -> int:
    """1 when (…, H, W[, C]) uint8 pixels are grey (one channel, or three alike), else 3;
    judged on an even sample of at most `sample` pixels."""
    if pixels.ndim < 3 or pixels.shape[-1] == 1:
        return 1
    flat = pixels.reshape(-1, pixels.shape[-1])
    flat = flat[:: max(1, len(flat) // sample)].astype(np.int16)
    spread = np.abs(np.diff(flat, axis=1)).sum(axis=1).mean() if len(flat) else 0.0
    return 3 if spread > _GREY_SPREAD else 1


def training_input(tiles: np.ndarray, px_per_mm: float | None) -> dict:
    """What a card records of its training tiles (N, H, W, C) uint8: their colour and scale."""
    return {"channels": colour_channels(tiles), "px_per_mm": px_per_mm}


def input_misfit(
    trained: dict, roll_channels: int | None, px_per_mm: tuple[float, float], pixels: np.ndarray
) -> str | None:
    """Why a model trained on `trained` (`training_input`, from its card's `train_config`;
    keys absent in older checkpoints: not checked) cannot score these pixels of a roll with
    `roll_channels` samples a pixel at `px_per_mm` (across, along); None when it can.

    A colour model refuses a grey roll; a grey model refuses a colour roll whose pixels are in
    colour (three equal channels are grey: some cameras send them)."""
    channels, scale = trained.get("channels"), trained.get("px_per_mm")
    if channels == 3 and roll_channels == 1:
        return "the model was trained on colour tiles and the roll is grey"
    if channels == 1 and roll_channels == 3 and colour_channels(pixels) == 3:
        return "the model was trained on grey tiles and the roll is in colour"
    if scale:
        off = [m for m in px_per_mm if abs(m / scale - 1) > SCALE_TOLERANCE]
        if off:
            return (
                f"the model was trained at {scale:g} px/mm and the roll is scanned at "
                f"{px_per_mm[0]:g} × {px_per_mm[1]:g} px/mm (beyond {SCALE_TOLERANCE:.0%})"
            )
    return None
