"""Synthetic woven/knitted fabric with planted defects and exact masks.

Used by tests and the demo in place of real scans. A roll is endless along its rows, and a
scanner delivers it frame by frame, so every pixel is a pure function of (seed, absolute row,
column): per-yarn properties come from a counter-based hash of the yarn's absolute index,
never from a sequential RNG whose state would depend on how many rows were asked for.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

WEAVES = ("plain", "twill", "satin", "knit")
DEFECT_KINDS = ("hole", "stain", "broken_end", "broken_pick", "knot", "slub", "missing_yarn")

# Interlacing matrices, rows = weft yarns, columns = warp yarns, True = warp on top.
_PATTERNS = {
    "plain": np.array([[1, 0], [0, 1]], dtype=bool),
    # 2/1 twill: each weft shifts the float by one warp, which draws the diagonal.
    "twill": np.array([[(j - i) % 3 < 2 for j in range(3)] for i in range(3)]),
    # 5-harness warp-faced satin, move 2: interlacings scattered so no diagonal shows.
    "satin": np.array([[(j - 2 * i) % 5 != 0 for j in range(5)] for i in range(5)]),
}

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# Hash streams: one per independent random property, so adding one never shifts another.
_S_WARP, _S_WEFT, _S_ROW_LIGHT, _S_COL_LIGHT, _S_NOISE_ROW, _S_NOISE_COL, _S_LOOK = range(7)

_UNDER = 0.55  # a yarn seen through the gaps of the one on top is in its shadow
_GAP = 0.08  # level of the background between yarns
_BLACK = 18.0  # sensor black level, grey levels
_NOISE_SIGMA = 2.5  # grey levels


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, in place on a uint64 array (wrapping arithmetic)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _mix64_int(z: int) -> int:
    return int(_splitmix(np.array([z & _MASK64], dtype=np.uint64))[0])


def _hash_bits(key: int, stream: int, index: np.ndarray) -> np.ndarray:
    """64 random bits (uint64) that depend only on (key, stream, index)."""
    base = np.uint64(_mix64_int(key ^ _mix64_int(stream + 1)))
    z = np.ascontiguousarray(index, dtype=np.int64).view(np.uint64) * np.uint64(_GOLDEN)
    return _splitmix(z + base)


def _uniform(key: int, stream: int, index: np.ndarray) -> np.ndarray:
    return (_hash_bits(key, stream, index) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _seed_key(seed: int | np.random.Generator) -> int:
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63))
    return _mix64_int(int(seed))


def _check(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _yarn_layout(
    key: int, stream: int, coords: np.ndarray, period: float, irregularity: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Yarn index, position across the yarn in [0, 1), thickness and brightness per coordinate.

    Yarn k spans [b(k), b(k + 1)) with b(k) = k * period + jitter(k); the jitter stays below
    half a period, so the yarn holding a coordinate is one of three neighbours of k0 = c // period.
    """
    irr = min(max(irregularity, 0.0), 0.9)
    jitter = 0.45 * irr * period

    def boundary(k: np.ndarray) -> np.ndarray:
        return k * period + jitter * (2.0 * _uniform(key, stream, k) - 1.0)

    centre = coords.astype(np.float64) + 0.5
    k0 = np.floor(centre / period).astype(np.int64)
    index = k0 - 1 + (centre >= boundary(k0)) + (centre >= boundary(k0 + 1))
    start, end = boundary(index), boundary(index + 1)
    position = (centre - start) / (end - start)
    thickness = np.clip(1.0 - 1.5 * irr * _uniform(key, stream + 100, index), 0.35, 1.0)
    brightness = 1.0 + irr * (2.0 * _uniform(key, stream + 200, index) - 1.0)
    return index, position, thickness, brightness


def _cross_profile(position: np.ndarray, thickness: np.ndarray) -> np.ndarray:
    """Brightness across a round yarn lit from above; zero in the gap beside it."""
    d = np.abs(2.0 * position - 1.0) / (0.92 * thickness)
    return np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0))


def _length_shade(position: np.ndarray) -> np.ndarray:
    """A yarn darkens where it dives under a crossing yarn at either end of a cell."""
    return 1.0 - 0.3 * (2.0 * position - 1.0) ** 2


def _drift(key: int, stream: int, coords: np.ndarray) -> np.ndarray:
    """Slow, smooth illumination change in [-1, 1] along one axis."""
    phases = 2 * np.pi * _uniform(key, stream, np.arange(3))
    out = np.zeros(coords.shape, dtype=np.float64)
    waves = zip((1700.0, 530.0, 190.0), (0.5, 0.3, 0.2), phases, strict=True)
    for wavelength, weight, phase in waves:
        out += weight * np.sin(2 * np.pi * coords / wavelength + phase)
    return out


def _sensor_noise(key: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Per-pixel noise (float32, grey levels, black level included), a function of (row, col)."""
    row_bits = (_hash_bits(key, _S_NOISE_ROW, rows) >> np.uint64(32)).astype(np.uint32)
    col_bits = (_hash_bits(key, _S_NOISE_COL, cols) >> np.uint64(32)).astype(np.uint32)
    # uint32 "lowbias32" mixing of a row hash with a column hash: a full 64-bit hash per
    # pixel would cost most of the frame budget.
    h = np.bitwise_xor.outer(row_bits, col_bits)
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    # Sum of two 16-bit uniforms: triangular, close enough to Gaussian, std 0.408 * 65536.
    noise = (h & 0xFFFF).astype(np.float32)
    noise += (h >> 16).astype(np.float32)
    scale = _NOISE_SIGMA / (0.4082 * 65536.0)
    noise *= np.float32(scale)
    noise += np.float32(_BLACK - 65535.0 * scale)
    return noise


def _woven_level(
    rows: np.ndarray, cols: np.ndarray, key: int, period: float, irr: float,
    row_gain: np.ndarray, col_gain: np.ndarray, pattern: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    weft_i, v, weft_thick, weft_bright = _yarn_layout(key, _S_WEFT, rows, period, irr)
    warp_j, u, warp_thick, warp_bright = _yarn_layout(key, _S_WARP, cols, period, irr)
    # Everything 1-D is folded in before the outer products: the 2-D work is the cost.
    warp_across = (_cross_profile(u, warp_thick) * warp_bright * col_gain).astype(np.float32)
    warp_along = (_length_shade(v) * row_gain).astype(np.float32)
    weft_across = (_cross_profile(v, weft_thick) * weft_bright * 0.8 * row_gain).astype(np.float32)
    weft_along = (_length_shade(u) * col_gain).astype(np.float32)
    repeat = pattern.shape[0]
    warp_over = np.take(pattern[weft_i % repeat], warp_j % repeat, axis=1)
    top_warp = np.multiply.outer(warp_along, warp_across)
    top_weft = np.multiply.outer(weft_across, weft_along)
    warp_seen = np.where(warp_over, top_warp, top_warp * np.float32(_UNDER))
    weft_seen = np.where(warp_over, top_weft * np.float32(_UNDER), top_weft)
    return np.maximum(warp_seen, weft_seen), warp_seen >= weft_seen


def _knit_level(
    rows: np.ndarray, cols: np.ndarray, key: int, period: float, irr: float,
    row_gain: np.ndarray, col_gain: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Weft knit face: each stitch a V of two legs converging at its bottom."""
    course, v, _, course_bright = _yarn_layout(key, _S_WEFT, rows, 0.8 * period, irr)
    _, u, wale_thick, wale_bright = _yarn_layout(key, _S_WARP, cols, period, irr)
    leg_centre = (0.18 + 0.32 * v).astype(np.float32)
    dist_left = np.abs(np.subtract.outer(leg_centre, u.astype(np.float32)))
    dist_right = np.abs(np.subtract.outer(leg_centre, (1.0 - u).astype(np.float32)))
    dist = np.minimum(dist_left, dist_right, out=dist_left)
    dist /= (0.24 * wale_thick).astype(np.float32)
    level = np.sqrt(np.clip(1.0 - dist * dist, 0.0, 1.0, out=dist), out=dist)
    # The previous course overlaps the top of each stitch, shading it.
    level *= ((0.7 + 0.3 * v) * course_bright * row_gain).astype(np.float32)[:, None]
    level *= (wale_bright * col_gain).astype(np.float32)
    # Two-feeder knit: courses alternate between the two yarns.
    return level, (course % 2 == 0)[:, None]


def make_fabric(
    height: int,
    width: int,
    *,
    weave: str = "plain",
    colour: bool = False,
    seed: int | np.random.Generator = 0,
    yarn_period: float = 8.0,
    irregularity: float = 0.15,
    lighting_drift: float = 0.1,
    row_offset: int = 0,
) -> np.ndarray:
    """A (height, width) uint8 grey or (height, width, 3) colour patch of a fabric roll.

    Rows are roll rows ``row_offset .. row_offset + height - 1``; for an int seed the result is
    identical whether the roll is generated at once or in pieces. A Generator seed draws one
    key from it, so pieces only match if they are given equal keys.
    """
    _check("weave", weave, WEAVES)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if yarn_period < 2.0:
        raise ValueError(f"yarn_period must be at least 2 pixels, got {yarn_period}")
    key = _seed_key(seed)
    rows = np.arange(row_offset, row_offset + height, dtype=np.int64)
    cols = np.arange(width, dtype=np.int64)
    look = _uniform(key, _S_LOOK, np.arange(6))
    scale = 190.0 * (0.8 + 0.25 * look[0])
    row_gain = scale * (1.0 + lighting_drift * _drift(key, _S_ROW_LIGHT, rows))
    col_gain = 1.0 + lighting_drift * _drift(key, _S_COL_LIGHT, cols)
    layout = (rows, cols, key, yarn_period, irregularity, row_gain, col_gain)
    if weave == "knit":
        level, warp_colour = _knit_level(*layout)
    else:
        level, warp_colour = _woven_level(*layout, _PATTERNS[weave])
    np.maximum(level, np.float32(_GAP * scale), out=level)
    noise = _sensor_noise(key, rows, cols)
    if colour:
        # Hues at least 0.2 of a turn apart, so warp and weft are told apart by colour.
        warp_hue, weft_hue = look[1], (look[1] + 0.2 + 0.6 * look[3]) % 1.0
        warp_rgb = colorsys.hsv_to_rgb(warp_hue, 0.35 + 0.35 * look[2], 1.0)
        weft_rgb = colorsys.hsv_to_rgb(weft_hue, 0.35 + 0.35 * look[4], 0.9)
        rgb = np.where(warp_colour[..., None], np.float32(warp_rgb), np.float32(weft_rgb))
        out = level[..., None] * rgb
        out += noise[..., None]
    else:
        out = level
        out += noise
    np.clip(out, 0.0, 255.0, out=out)
    out += 0.5
    return out.astype(np.uint8)


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
    _check("defect kind", kind, DEFECT_KINDS)
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
        _check("defect kind", kind, DEFECT_KINDS)
    if n_defects < 0:
        raise ValueError(f"n_defects must be >= 0, got {n_defects}")
    if isinstance(seed, np.random.Generator):
        rng = seed
        image = make_fabric(height, width, seed=rng, **fabric_kw)
    else:
        image = make_fabric(height, width, seed=seed, **fabric_kw)
        row_offset = int(fabric_kw.get("row_offset", 0)) & _MASK64
        rng = np.random.default_rng([_seed_key(seed), row_offset, 0xDEFEC7])
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
    _check("weave", weave, WEAVES)
    dst = Path(dst)
    key = _seed_key(seed)
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
