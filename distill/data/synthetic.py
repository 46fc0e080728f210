"""Synthetic woven/knitted fabric (defects: `distill.data.synthetic_defects`).

Used by tests and the demo in place of real scans. A roll is endless along its rows, and a
scanner delivers it frame by frame, so every pixel is a pure function of (seed, absolute row,
column): per-yarn properties come from a counter-based hash of the yarn's absolute index,
never from a sequential RNG whose state would depend on how many rows were asked for.
"""

from __future__ import annotations

import colorsys

import numpy as np

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

MASK64 = (1 << 64) - 1  # 64-bit wrap-around of the hash arithmetic (also synthetic_defects)
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
    return int(_splitmix(np.array([z & MASK64], dtype=np.uint64))[0])


def _hash_bits(key: int, stream: int, index: np.ndarray) -> np.ndarray:
    """64 random bits (uint64) that depend only on (key, stream, index)."""
    base = np.uint64(_mix64_int(key ^ _mix64_int(stream + 1)))
    z = np.ascontiguousarray(index, dtype=np.int64).view(np.uint64) * np.uint64(_GOLDEN)
    return _splitmix(z + base)


def _uniform(key: int, stream: int, index: np.ndarray) -> np.ndarray:
    return (_hash_bits(key, stream, index) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def seed_key(seed: int | np.random.Generator) -> int:
    """A 64-bit key from an integer seed (hashed) or a generator (one draw)."""
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63))
    return _mix64_int(int(seed))


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ValueError naming the allowed values when `value` is not one of them."""
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
    check_choice("weave", weave, WEAVES)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if yarn_period < 2.0:
        raise ValueError(f"yarn_period must be at least 2 pixels, got {yarn_period}")
    key = seed_key(seed)
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
