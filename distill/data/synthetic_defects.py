"""Defects planted in synthetic fabric, with exact masks, and MVTec-style categories of them.

Holes, stains, broken ends and picks, knots, slubs and missing yarns of a plausible size and
look for each kind, drawn on `distill.data.synthetic.make_fabric`; `write_category` writes a
train/test split in the MVTec AD layout for training and evaluation without real data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from distill.data.synthetic import DEFECT_KINDS, MASK64, WEAVES, check_choice, make_fabric, seed_key

# Typical size per kind: diameter for blobs, length for lines and slubs (px).
_SIZE_RANGE = {
    "hole": (8.0, 40.0),
    "stain": (16.0, 60.0),
    "broken_end": (40.0, 200.0),
    "broken_pick": (40.0, 200.0),
    "knot": (8.0, 18.0),
    "slub": (16.0, 60.0),
    "missing_yarn": (0.0, 0.0),  # 0 = the full image length
}


def _blob_radius(
    rng: np.random.Generator, angle: np.ndarray, radius: float, fray: float
) -> np.ndarray:
    """Radius as a function of angle: a lumpy outline plus high-frequency fraying."""
    out = np.ones_like(angle)
    for harmonic in range(2, 17):
        amp = 0.08 / harmonic**0.5 if harmonic < 6 else fray
        out += amp * rng.uniform(-1, 1) * np.cos(harmonic * angle + rng.uniform(0, 2 * np.pi))
    return radius * out


def _extra_fibre(ref: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour of a lump of extra fibre: brighter, or darker where it blocks light or where the
    fabric is too bright for a brighter lump to show."""
    lighter = np.minimum(ref * 1.3 + 60, 250)
    return ref * 0.35 if rng.random() < 0.3 or (lighter - ref).mean() < 60 else lighter


def _line_plan(kind: str, size: float, rng: np.random.Generator, h: int, w: int) -> dict:
    vertical = kind == "broken_end" or (kind in ("slub", "missing_yarn") and rng.random() < 0.5)
    along = h if vertical else w
    # Full length (size 0) overshoots the frame so the frayed ends fall outside it.
    length = along + 8.0 if size == 0 else max(min(size, along - 2), 1.0)
    # A slub is thicker than a yarn, a missing yarn leaves a yarn-wide gap, breaks are thin.
    width = rng.uniform(*{"slub": (4.0, 7.0), "missing_yarn": (4.0, 7.0)}.get(kind, (2.5, 4.0)))
    half_along, half_across = int(np.ceil(length / 2)) + 1, int(np.ceil(width / 2)) + 3
    halves = (half_along, half_across) if vertical else (half_across, half_along)
    return {"vertical": vertical, "length": length, "width": width, "halves": halves}


def _render(
    kind: str, plan: dict, dy: np.ndarray, dx: np.ndarray, before: np.ndarray, ref: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """Alpha (how far each pixel moves towards ``target``) and the mask threshold on alpha."""
    bright = float(ref.mean())
    if kind in ("hole", "knot"):
        turn = rng.uniform(0, np.pi)
        a = dx * np.cos(turn) + dy * np.sin(turn)
        b = (dy * np.cos(turn) - dx * np.sin(turn)) / plan["aspect"]
        rho, angle = np.hypot(a, b), np.arctan2(b, a)
        radius = _blob_radius(rng, angle, plan["radius"], 0.05 if kind == "hole" else 0.01)
        alpha = np.clip(radius - rho + 0.5, 0.0, 1.0)
        grain = rng.normal(0.0, 6.0, alpha.shape)[..., None]
        if kind == "hole":  # dark background, or the backlight shining through
            level = 20.0 if rng.random() < 0.6 or bright < 80 else 240.0
            target = np.full_like(before, level) + grain
        else:  # a dense lump of fibre: shaded like a bump, brighter (or darker) than the yarn
            dome = np.sqrt(np.clip(1 - (rho / plan["radius"]) ** 2, 0, 1))[..., None]
            target = _extra_fibre(ref, rng) * (0.75 + 0.25 * dome) + grain
        return alpha, target, 0.5
    if kind == "stain":
        field = np.zeros(dy.shape[0:1] + dx.shape[1:2])
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.normal(0, plan["radius"] / 3, 2)
            sigma = plan["radius"] * rng.uniform(0.35, 0.6)
            field += np.exp(-((dy - cy) ** 2 + (dx - cx) ** 2) / (2 * sigma**2))
        alpha = np.clip(1.6 * field / field.max(), 0.0, 1.0)
        strength = rng.uniform(0.4, 0.6)
        tint = rng.uniform(0.6, 1.0, before.shape[-1])  # colour stains shift hue too
        if bright > 110:
            target = before * (1 - strength) * tint
        else:
            target = before + strength * (255 - before)
        # The stain's extent is where its tone change is noticeable (>= 10 grey levels).
        change = float(np.abs(target - before).max(axis=-1).mean())
        return alpha, target, float(np.clip(10.0 / change, 0.2, 0.6))
    # Line-like defects: coordinates along and across the line.
    along, across = (dy, dx) if plan["vertical"] else (dx, dy)
    length, width = plan["length"], plan["width"]
    wobble = rng.uniform(0, 0.8) * np.sin(along / rng.uniform(6, 20) + rng.uniform(0, 2 * np.pi))
    offset = np.abs(across - wobble)
    if kind == "slub":  # spindle: thickest in the middle
        half = width / 2 * np.sqrt(np.clip(1 - (2 * along / length) ** 2, 0, 1))
        alpha = np.clip(half + 0.5 - offset, 0.0, 1.0) * (half > 0)
        shade = np.clip(1 - (offset / np.maximum(half, 0.5)) ** 2, 0, 1)[..., None]
        target = _extra_fibre(ref, rng) * (0.8 + 0.2 * shade)
        return alpha, target, 0.5
    # Each end breaks a little short and slightly obliquely. The slant stays small so the soft
    # rim (0 < alpha < 0.5) never reaches more than a pixel beyond the mask.
    shortening = np.where(along > 0, *rng.uniform(0, min(3, length / 4), 2))
    end = length / 2 - shortening + rng.uniform(-0.3, 0.3) * across - np.abs(along)
    alpha = np.clip(np.minimum(width / 2 - offset, end) + 0.5, 0, 1)
    if kind == "missing_yarn" or rng.random() < 0.7:
        target = 0.15 * before + 0.05 * ref  # the gap left by the yarn; crossing yarns show faintly
    else:  # a loose yarn lying on top
        target = _extra_fibre(ref, rng) + rng.normal(0, 5, before.shape)
    return alpha, target, 0.5


def _plant(
    image: np.ndarray, kind: str, rng: np.random.Generator, center: tuple[int, int] | None,
    size: float | None,
) -> tuple[np.ndarray, tuple[int, int]]:  # fmt: skip
    check_choice("defect kind", kind, DEFECT_KINDS)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W[, C]) image, not {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if size is None:
        size = float(rng.uniform(*_SIZE_RANGE[kind]))
    if size < 0 or (size == 0 and kind != "missing_yarn"):
        raise ValueError(f"size must be positive, got {size}")
    if kind in ("hole", "stain", "knot"):
        radius = max(size / 2, 2.0)
        extent = int(np.ceil(radius * (1.3 if kind == "stain" else 1.25))) + 2
        plan = {"radius": radius, "aspect": rng.uniform(0.6, 1.0), "halves": (extent, extent)}
    else:
        plan = _line_plan(kind, size, rng, h, w)
    half_y, half_x = plan["halves"]
    if center is None:
        # Keep the bulk of the defect inside the frame.
        margin_y, margin_x = min(half_y - 1, (h - 1) // 2), min(half_x - 1, (w - 1) // 2)
        center = (
            int(rng.integers(margin_y, h - margin_y)),
            int(rng.integers(margin_x, w - margin_x)),
        )
    cy, cx = int(center[0]), int(center[1])
    if not (0 <= cy < h and 0 <= cx < w):
        raise ValueError(f"center {center} lies outside the {h}x{w} image")
    if kind == "missing_yarn" and size == 0:  # full length: centred along its length
        cy, cx = (h // 2, cx) if plan["vertical"] else (cy, w // 2)
    y0, y1 = max(cy - half_y, 0), min(cy + half_y + 1, h)
    x0, x1 = max(cx - half_x, 0), min(cx + half_x + 1, w)
    pixels = image if image.ndim == 3 else image[..., None]
    crop = pixels[y0:y1, x0:x1]
    before = crop.astype(np.float32)
    ref = before.reshape(-1, before.shape[-1]).mean(axis=0)
    dy = np.arange(y0 - cy, y1 - cy, dtype=np.float32)[:, None]
    dx = np.arange(x0 - cx, x1 - cx, dtype=np.float32)[None, :]
    alpha, target, threshold = _render(kind, plan, dy, dx, before, ref, rng)
    after = before + alpha[..., None] * (target - before)
    crop[...] = np.clip(np.rint(after), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = alpha >= threshold
    return mask, (cy, cx)


def plant_defect(
    image: np.ndarray,
    kind: str,
    *,
    rng: np.random.Generator,
    center: tuple[int, int] | None = None,
    size: float | None = None,
) -> np.ndarray:
    """Paint one defect into ``image`` in place; return its boolean (H, W) mask.

    ``size`` is the diameter of blob-like defects (hole, stain, knot) and the length of
    line-like ones; for missing_yarn 0 (the default) means the full image length. The mask is
    the defect's extent: pixels moved at least half-way to the defect's appearance (for stains,
    where the tone change reaches 10 grey levels).
    """
    return _plant(image, kind, rng, center, size)[0]


def make_defective(
    height: int,
    width: int,
    *,
    kinds: tuple[str, ...] | list[str] = DEFECT_KINDS,
    n_defects: int = 1,
    seed: int | np.random.Generator = 0,
    **fabric_kw,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A fabric image with ``n_defects`` defects of kinds drawn from ``kinds``.

    Returns the image, the union mask (uint8, 0/255) and per defect
    ``{"kind", "bbox": (y0, x0, y1, x1) with exclusive ends, "center": (y, x)}``.
    """
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError("kinds must name at least one defect kind")
    for kind in kinds:
        check_choice("defect kind", kind, DEFECT_KINDS)
    if n_defects < 0:
        raise ValueError(f"n_defects must be >= 0, got {n_defects}")
    if isinstance(seed, np.random.Generator):
        rng = seed
        image = make_fabric(height, width, seed=rng, **fabric_kw)
    else:
        image = make_fabric(height, width, seed=seed, **fabric_kw)
        row_offset = int(fabric_kw.get("row_offset", 0)) & MASK64
        rng = np.random.default_rng([seed_key(seed), row_offset, 0xDEFEC7])
    union = np.zeros((height, width), dtype=bool)
    defects = []
    for _ in range(n_defects):
        kind = str(rng.choice(kinds))
        mask, center = _plant(image, kind, rng, None, None)
        ys, xs = np.nonzero(mask)
        bbox = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        defects.append({"kind": kind, "bbox": bbox, "center": center})
        union |= mask
    return image, union.astype(np.uint8) * 255, defects


def write_category(
    dst: str | Path,
    *,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defect: int = 20,
    tile: int = 256,
    weave: str = "plain",
    colour: bool = False,
    seed: int = 0,
) -> Path:
    """Write one MVTec-AD-style category cut from a single synthetic roll.

    Tile k (train first, then test/good, then the defective ones) is roll rows
    ``k * tile .. (k + 1) * tile - 1``, so no two tiles share a row. Defective tiles cycle
    through DEFECT_KINDS, one defect each, numbered per kind.
    """
    check_choice("weave", weave, WEAVES)
    dst = Path(dst)
    key = seed_key(seed)
    tile_index = iter(range(n_train + n_test_good + n_test_defect))

    def next_tile() -> np.ndarray:
        offset = next(tile_index) * tile
        return make_fabric(tile, tile, weave=weave, colour=colour, seed=seed, row_offset=offset)

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for split, count in (("train", n_train), ("test", n_test_good)):
        for i in range(count):
            save(next_tile(), dst / split / "good" / f"{i:03d}.png")
    per_kind = dict.fromkeys(DEFECT_KINDS, 0)
    for i in range(n_test_defect):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        image = next_tile()
        mask = plant_defect(image, kind, rng=np.random.default_rng([key, i]))
        stem = f"{per_kind[kind]:03d}"
        per_kind[kind] += 1
        save(image, dst / "test" / kind / f"{stem}.png")
        save(mask.astype(np.uint8) * 255, dst / "ground_truth" / kind / f"{stem}_mask.png")
    return dst


def paste_defects(
    tiles: np.ndarray,
    *,
    seed: int = 0,
    copies: int = 2,
    strength: tuple[float, float] = (0.3, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Defective copies of real good tiles: each tile ``copies`` times, one defect per copy.

    Kinds cycle through DEFECT_KINDS; each defect is faded towards the tile by a random
    ``strength`` in the given range (1 = as drawn, 0.3 = a faint one, as real low-contrast
    flaws are), while its mask keeps the full extent. These are what a model's scorer and fusion
    weight are chosen by — never by real test tiles. Returns (N·copies, H, W, C) uint8 images
    and (N·copies, H, W) boolean masks.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.dtype != np.uint8 or len(tiles) == 0:
        raise ValueError(
            f"expected a non-empty uint8 (N, H, W, C) stack, not {tiles.dtype} {tiles.shape}"
        )
    low, high = strength
    if not 0 < low <= high <= 1:
        raise ValueError(f"strength must satisfy 0 < low <= high <= 1, not {strength}")
    rng = np.random.default_rng([seed_key(seed), 0x5A57E])
    images, masks = [], []
    for k in range(copies):
        for i, tile in enumerate(tiles):
            kind = DEFECT_KINDS[(k * len(tiles) + i) % len(DEFECT_KINDS)]
            drawn = tile.copy()
            mask = plant_defect(drawn, kind, rng=rng)
            fade = rng.uniform(low, high)
            blend = tile.astype(np.float32) + fade * (drawn.astype(np.float32) - tile)
            images.append(np.clip(np.rint(blend), 0, 255).astype(np.uint8))
            masks.append(mask)
    return np.stack(images), np.stack(masks)
