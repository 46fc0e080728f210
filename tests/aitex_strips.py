"""Fake AITEX files for the tests (test_aitex_import.py, test_aitex_fabric_roll.py): grey
fabric strips with white ends and defect masks, stored as PNG as the real data set stores them.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

H = 256  # rows of an AITEX strip


@dataclass(frozen=True)
class FakeFabric:
    """Strips of one fake fabric: `width` columns, white (255) for `left` and `right` columns at
    their ends as the real strips have, and masks whose boxes have a grey halo `halo` px wide."""

    width: int
    left: int
    right: int
    halo: int

    def strip(self, seed: int, width: int | None = None, left: int | None = None,
              right: int | None = None) -> np.ndarray:  # fmt: skip
        """Random grey fabric; `width`, `left` and `right` default to the fabric's."""
        width = self.width if width is None else width
        left = self.left if left is None else left
        right = self.right if right is None else right
        a = np.random.default_rng(seed).integers(60, 180, (H, width), dtype=np.uint8)
        a[:, :left] = 255
        a[:, width - right :] = 255
        return a

    def mask(self, *boxes: tuple[int, int, int, int], width: int | None = None) -> np.ndarray:
        """White boxes (r0, r1, c0, c1), each in a soft grey halo that binarises to 0."""
        m = np.zeros((H, self.width if width is None else width), dtype=np.uint8)
        for r0, r1, c0, c1 in boxes:
            m[r0 - self.halo : r1 + self.halo, c0 - self.halo : c1 + self.halo] = 100
        for r0, r1, c0, c1 in boxes:
            m[r0:r1, c0:c1] = 255
        return m


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    """The array as a PNG (converted to `mode`, e.g. "LA", when given), folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)
