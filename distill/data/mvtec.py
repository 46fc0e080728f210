"""One category in MVTec AD layout: train/good, test/<kind>, ground_truth/<kind>/<stem>_mask.png.

An optional `fabric_regions.json` at the category's root gives, for tiles that are not fabric
from side to side, the fabric's columns [x0, x1) within the tile (keys: the tile's path relative
to the root, e.g. "test/good/0016_000_04_x02.png"); tiles not listed are fabric throughout. A
product scores nothing off the fabric, so its figures leave those pixels out (`valid_masks`).

An optional `tile_groups.json` names, for training tiles cut from overlapping pixels (an
importer's extra tiles across the fabric's edge and the grid tiles they overlap), a group each:
a held-out split keeps a group on one side (`groups_of`), or a held-out tile would share pixels
with a tile the model learned from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class TestSample:
    """One test image of a category: its path, its kind ("good" or the defect type) and, for a
    defect, its ground-truth mask."""

    path: Path
    kind: str  # "good" or the defect type
    mask_path: Path | None

    @property
    def label(self) -> int:
        return int(self.kind != "good")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


REGIONS_FILE = "fabric_regions.json"
GROUPS_FILE = "tile_groups.json"


@dataclass(frozen=True)
class Category:
    """A category read from its folder (`Category.open`): training images, test samples and the
    fabric regions of tiles that are not fabric from side to side."""

    root: Path
    train: list[Path]
    test: list[TestSample]
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)

    def groups_of(self, paths: list[Path]) -> np.ndarray | None:
        """(N,) group labels of `paths` for a split that keeps overlapping tiles together: the
        tiles `tile_groups.json` names share their group's label, every other tile is a group
        of its own. None when the file names none of them."""
        keys = [p.relative_to(self.root).as_posix() for p in paths]
        if not any(k in self.groups for k in keys):
            return None
        return np.array([self.groups.get(k, f"#{i}") for i, k in enumerate(keys)])

    def valid_masks(self, paths: list[Path], tile: int) -> np.ndarray | None:
        """(N, tile, tile) booleans, True on fabric, or None when every tile is all fabric.

        Regions are in the tile's own pixels; a tile resized to `tile` has them scaled."""
        keys = [p.relative_to(self.root).as_posix() for p in paths]
        if not any(k in self.regions for k in keys):
            return None
        valid = np.ones((len(paths), tile, tile), dtype=bool)
        for i, (key, path) in enumerate(zip(keys, paths, strict=True)):
            if key in self.regions:
                with Image.open(path) as img:
                    scale = tile / img.size[0]
                x0, x1 = (round(v * scale) for v in self.regions[key])
                valid[i] = False
                valid[i, :, x0:x1] = True
        return valid

    @classmethod
    def open(cls, root: str | Path) -> Category:
        root = Path(root)
        train_dir = root / "train" / "good"
        if not train_dir.is_dir():
            raise FileNotFoundError(f"{root} is not an MVTec-layout category: no train/good folder")
        test: list[TestSample] = []
        test_dir = root / "test"
        if test_dir.is_dir():
            for kind_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
                for path in _images_in(kind_dir):
                    mask = None
                    if kind_dir.name != "good":
                        mask = root / "ground_truth" / kind_dir.name / f"{path.stem}_mask.png"
                        mask = mask if mask.is_file() else None
                    test.append(TestSample(path, kind_dir.name, mask))
        train = _images_in(train_dir)
        if not train:
            raise FileNotFoundError(f"{train_dir} holds no images")
        return cls(root, train, test, _read_regions(root), _read_groups(root))


def _read_groups(root: Path) -> dict[str, str]:
    path = root / GROUPS_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {str(k): str(v) for k, v in raw.items()}
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a map of tile path to group name: {exc}") from exc


def _read_regions(root: Path) -> dict[str, tuple[int, int]]:
    path = root / REGIONS_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        regions = {str(k): (int(v[0]), int(v[1])) for k, v in raw.items()}
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"{path} is not a map of tile path to [x0, x1]: {exc}") from exc
    for key, (x0, x1) in regions.items():
        if not 0 <= x0 <= x1:
            raise ValueError(f"{path}: region of {key} must satisfy 0 <= x0 <= x1, not {x0, x1}")
    return regions


def load_image(path: Path, tile: int | None = None) -> np.ndarray:
    """uint8 (H, W, C) with C = 1 for grey or 3 for colour; resized to tile×tile if given.

    16-bit grey images are scaled to 8 bits (value / 257, i.e. 65535 → 255). A file that
    cannot be decoded is an OSError naming it (among hundreds of tiles, PIL's "image file is
    truncated" does not say which).
    """
    try:
        return _decoded(path, tile)
    except OSError as exc:
        if str(path) in str(exc):
            raise
        raise OSError(f"{path}: {exc}") from exc


def _decoded(path: Path, tile: int | None) -> np.ndarray:
    with Image.open(path) as img:
        if img.mode.startswith("I"):
            img = Image.fromarray(
                (np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
            )
        elif img.mode in ("1", "L", "LA"):
            img = img.convert("L")
        else:
            img = img.convert("RGB")
        if tile is not None and img.size != (tile, tile):
            img = img.resize((tile, tile), Image.BILINEAR)
        array = np.asarray(img)
    return array[..., None] if array.ndim == 2 else array


def load_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask (> 127 is defect); all False for a good image or a missing mask."""
    if path is None:
        return np.zeros(size, dtype=bool)
    with Image.open(path) as img:
        img = img.convert("L")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.NEAREST)
        return np.asarray(img) > 127


def check_native_size(paths: list[Path], tile: int, evaluating: bool = False) -> None:
    """Refuse images that are not `tile` × `tile` px (their headers only are read): the worker
    cuts the roll into tiles at its native scale, so a model trained on tiles resized to its
    tile would see the fabric at another scale than it is scored at (`evaluating`: a model's
    figures on resized test tiles are those of another scale)."""
    for path in paths:
        with Image.open(path) as img:
            if img.size == (tile, tile):
                continue
            size = f"{path} is {img.size[0]} × {img.size[1]} px, not the model's {tile}-px tile"
            if evaluating:
                raise ValueError(
                    f"{size}: the model scores rolls at that scale, and its figures on tiles "
                    f"resized to it would say nothing of them. Evaluate on {tile}-px tiles; "
                    "only a model trained with --resize (whole images) resizes them"
                )
            raise ValueError(
                f"{size}: the worker scores tiles cut from the roll at their native scale, so "
                "a model trained on resized tiles sees the fabric at another one. Import the "
                f"fabric at {tile} px (or train with --tile {img.size[0]}); whole images of "
                "a benchmark (MVTec AD) are resized with --resize"
            )


def load_stack(paths: list[Path], tile: int) -> np.ndarray:
    """(N, tile, tile, C) uint8; colour wins if any image is colour (grey ones are replicated)."""
    images = [load_image(p, tile) for p in paths]
    if any(im.shape[-1] == 3 for im in images):
        images = [np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in images]
    return np.stack(images)
