"""Fake AITEX files for the tests (test_aitex_import.py, test_aitex_fabric_roll.py): grey
fabric strips with white ends and defect masks, stored as PNG as the real data set stores them.
"""

from pathlib import Path

import numpy as np
from PIL import Image

H = 256  # rows of an AITEX strip


def fake_strip(seed: int, width: int, left: int, right: int) -> np.ndarray:
    """Random grey fabric `width` columns wide, white (255) for `left` and `right` columns at
    its ends, as the real strips have."""
    a = np.random.default_rng(seed).integers(60, 180, (H, width), dtype=np.uint8)
    a[:, :left] = 255
    a[:, width - right :] = 255
    return a


def fake_mask(boxes: tuple[tuple[int, int, int, int], ...], width: int, halo: int) -> np.ndarray:
    """White boxes (r0, r1, c0, c1) with a soft grey halo `halo` px wide that binarises to 0."""
    m = np.zeros((H, width), dtype=np.uint8)
    for r0, r1, c0, c1 in boxes:
        m[r0 - halo : r1 + halo, c0 - halo : c1 + halo] = 100
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = 255
    return m


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    """The array as a PNG (converted to `mode`, e.g. "LA", when given), folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)
