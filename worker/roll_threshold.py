"""The threshold a run applies, and the roll's own estimate of it, recorded with the run.

A model's threshold is calibrated on held-out tiles of the strips it trained on. Fabric scanned
later (another lot, other lighting) can score higher all over; then that threshold turns
ordinary weave into defects and the model needs retraining. Finalize therefore estimates every
roll's own threshold at the model's target false-alarm rate, from the peaks of its tile-sized
blocks of fabric (`distill.calibration.roll_threshold`), and records it beside the threshold
it applied (`runs.roll_threshold`, `runs.threshold`, both in the `current_runs` view): a roll
whose own threshold is far above the model's scores unlike the fabric the model knows.

Which one is applied (`ROLLSCAN_ROLL_THRESHOLD`): `model` (the default) applies the calibrated
threshold; `max` the higher of the two, so that a roll scoring higher all over raises its own
threshold. `max` assumes what a mill's rolls are — mostly good fabric, defects in far fewer
than a quarter of the blocks — and is not the default because the only real rolls measured
here, AITEX strips stacked into rolls, are not: half their strips are defect strips, scanned
apart from the good ones and scoring higher all over, and `max` raised the threshold 2–14×
there and found fewer flaws (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np

from distill.calibration import roll_threshold

ROLL_THRESHOLD_MODES = ("model", "max")
DEFAULT_TARGET_FPR = 1e-3  # a model registered before its target was recorded: train's default


class BlockPeaks:
    """Streams a roll's ¼-res score map (off-fabric pixels −inf) band by band and keeps the
    maximum of each `block`² block of a grid anchored at the roll's first row and column —
    the tile score of the tile that block would be — for blocks wholly on fabric: a block that
    holds a piece of the table beside the fabric also holds the fabric's edge, where the table's
    scores bleed into the map (docs/benchmarks.md), and would stand for no fabric's law."""

    def __init__(self, block: int) -> None:
        if block < 1:
            raise ValueError(f"block must be ≥ 1, got {block}")
        self.block = block
        self._next_row = 0
        self._rows = 0  # rows gathered in the current row of blocks
        self._max: np.ndarray | None = None  # per column, over the current row of blocks
        self._fabric: np.ndarray | None = None  # per column, on-fabric pixels
        self._peaks: list[np.ndarray] = []

    def add_band(self, scores: np.ndarray, row0: int) -> None:
        if row0 != self._next_row:
            raise ValueError(f"bands must come in order: expected row {self._next_row}, got {row0}")
        start = 0
        while start < scores.shape[0]:
            stop = min(scores.shape[0], start + self.block - self._rows)
            part = np.asarray(scores[start:stop], dtype=np.float32)
            if self._max is None:
                self._max = np.full(part.shape[1], -np.inf, dtype=np.float32)
                self._fabric = np.zeros(part.shape[1], dtype=np.int64)
            np.maximum(self._max, part.max(axis=0, initial=-np.inf), out=self._max)
            self._fabric += np.isfinite(part).sum(axis=0)
            self._rows += stop - start
            if self._rows == self.block:
                self._emit()
            start = stop
        self._next_row += scores.shape[0]

    def _emit(self) -> None:
        width, b = len(self._max), self.block
        pad = -width % b
        peaks = np.pad(self._max, (0, pad), constant_values=-np.inf).reshape(-1, b).max(axis=1)
        fabric = np.pad(self._fabric, (0, pad)).reshape(-1, b).sum(axis=1)
        area = self._rows * np.minimum(b, width - np.arange(len(peaks)) * b)
        self._peaks.append(peaks[fabric == area])
        self._rows, self._max, self._fabric = 0, None, None

    def peaks(self) -> np.ndarray:
        """Every block's peak so far, the last partial row of blocks included."""
        if self._rows:
            self._emit()
        return np.concatenate(self._peaks) if self._peaks else np.zeros(0, dtype=np.float32)


def run_threshold(
    mode: str, model_threshold: float, peaks: np.ndarray, fpr: float | None
) -> tuple[float, float | None]:
    """(the threshold to apply, the roll's own estimate or None when it has too few blocks)."""
    if mode not in ROLL_THRESHOLD_MODES:
        raise ValueError(f"roll threshold mode must be one of {ROLL_THRESHOLD_MODES}, not {mode!r}")
    own = roll_threshold(peaks, DEFAULT_TARGET_FPR if fpr is None else fpr)
    if mode == "max" and own is not None:
        return max(model_threshold, own), own
    return model_threshold, own
