"""The fabric-region tracker on synthetic rolls: where the fabric is, whatever lies beside it."""

import numpy as np
import pytest

from distill.data.synthetic import make_fabric
from distill.data.synthetic_defects import plant_defect
from distill.fabric_region import BLOCK_ROWS, band_extents, block_extent, grey_levels, region_mask

WIDTH = 1536
TOLERANCE = 16  # px: a cell of the tracker, refined to the grey-level step where there is one


def _table(rows: int, width: int, level: float, texture: float, seed: int) -> np.ndarray:
    """A conveyor / light table: an even surface with a little grain of its own."""
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, texture, (rows, width)) if texture else 0
    return np.clip(level + grain, 0, 255).astype(np.uint8)


def _roll(
    rows: int, left: np.ndarray, right: np.ndarray, *, table: float, texture: float = 2.0,
    brightness: float = 1.0, seed: int = 0,
) -> np.ndarray:  # fmt: skip
    """A roll whose fabric spans [left[r], right[r]) in row r, on a table of grey `table`."""
    fabric = make_fabric(rows, WIDTH, weave="twill", seed=seed).astype(np.float32) * brightness
    image = _table(rows, WIDTH, table, texture, seed + 1).astype(np.float32)
    cols = np.arange(WIDTH)[None, :]
    on = (cols >= left[:, None]) & (cols < right[:, None])
    image[on] = fabric[on]
    return np.clip(image, 0, 255).astype(np.uint8)


def _check(extents, left, right):
    for e in extents:
        rows = slice(e.row_start, e.row_stop)
        assert abs(e.left - int(np.median(left[rows]))) <= TOLERANCE, e
        assert abs(e.right - int(np.median(right[rows]))) <= TOLERANCE, e


@pytest.mark.parametrize(
    ("table", "brightness"),
    [(25.0, 1.25), (245.0, 0.45)],
    ids=["white fabric on a dark table", "dark fabric on a white table"],
)
def test_fabric_is_found_on_a_table_darker_or_brighter_than_it(table, brightness):
    rows = 2 * BLOCK_ROWS
    left, right = np.full(rows, 300), np.full(rows, 1300)
    image = _roll(rows, left, right, table=table, brightness=brightness)
    extents = band_extents(image)
    assert len(extents) == 2
    _check(extents, left, right)


def test_a_table_as_bright_as_the_fabric_is_told_apart_by_texture():
    rows = BLOCK_ROWS
    fabric = make_fabric(rows, WIDTH, weave="twill", seed=3)
    left, right = np.full(rows, 200), np.full(rows, 1400)
    image = _roll(rows, left, right, table=float(fabric.mean()), texture=0.5, seed=3)
    _check(band_extents(image), left, right)


def test_a_fabric_that_narrows_along_the_roll_is_followed_block_by_block():
    rows = 6 * BLOCK_ROWS
    left = np.linspace(100, 400, rows).astype(int)
    right = np.linspace(1450, 1100, rows).astype(int)
    image = _roll(rows, left, right, table=30.0, brightness=1.2)
    extents = band_extents(image, row_start=4096)
    assert [e.row_start for e in extents] == [4096 + k * BLOCK_ROWS for k in range(6)]
    _check([type(e)(e.row_start - 4096, e.row_stop - 4096, e.left, e.right) for e in extents],
           left, right)  # fmt: skip
    widths = [e.width for e in extents]
    assert widths == sorted(widths, reverse=True) and widths[0] - widths[-1] > 400


def test_a_roll_with_no_margin_is_fabric_from_side_to_side():
    image = make_fabric(BLOCK_ROWS, WIDTH, weave="twill", seed=5)
    assert block_extent(image) == (0, WIDTH)


@pytest.mark.parametrize(
    ("level", "noise"), [(3.0, 0.8), (0.0, 0.0), (255.0, 0.0), (250.0, 1.0)],
    ids=["dark noise", "black", "saturated", "a light table"],
)  # fmt: skip
def test_a_block_without_texture_holds_no_fabric(level, noise):
    """A camera with its lights off or its lens capped, or running before the fabric arrives:
    no fabric, an empty extent — and colour frames alike."""
    image = np.full((BLOCK_ROWS, WIDTH), level, np.uint8)
    if noise:
        image = _table(BLOCK_ROWS, WIDTH, level, noise, seed=3)
    assert block_extent(image) == (0, 0)
    assert block_extent(np.repeat(image[..., None], 3, axis=2)) == (0, 0)
    extents = band_extents(np.concatenate([make_fabric(BLOCK_ROWS, WIDTH, seed=5), image]))
    assert [e.width for e in extents] == [WIDTH, 0]
    assert not region_mask(extents, slice(BLOCK_ROWS, 2 * BLOCK_ROWS), WIDTH).any()


def test_anything_in_a_dark_block_keeps_it_scored():
    """Texture in one cell — a lit hole in a dark, smooth stretch, the fabric's end coming in at
    the block's last rows — and the block is scored as fabric: nothing there is ever dropped."""
    dark = _table(BLOCK_ROWS, WIDTH, 3.0, 0.8, seed=4)
    spot = dark.copy()
    spot[100:130, 700:730] = 200
    assert block_extent(spot) == (0, WIDTH)
    arriving = dark.copy()
    arriving[-20:] = make_fabric(20, WIDTH, seed=5)
    assert block_extent(arriving) == (0, WIDTH)
    # a smooth fabric, little contrast but some, or none but lit: still fabric
    assert block_extent(_table(BLOCK_ROWS, WIDTH, 120.0, 3.0, seed=6)) == (0, WIDTH)
    assert block_extent(_table(BLOCK_ROWS, WIDTH, 150.0, 1.0, seed=6)) == (0, WIDTH)


@pytest.mark.parametrize(
    ("dark", "expected"),
    [
        ((0, 90), [(0, 92, 0, 0), (92, 256, 0, WIDTH)]),  # a leader: rounded towards the fabric
        ((170, 256), [(0, 168, 0, WIDTH), (168, 256, 0, 0)]),  # the fabric's end
        ((0, 10), [(0, 256, 0, WIDTH)]),  # too few rows to tell from an even weft
        ((100, 150), [(0, 100, 0, WIDTH), (100, 152, 0, 0), (152, 256, 0, WIDTH)]),
        ((200, 210), [(0, 256, 0, WIDTH)]),
    ],
    ids=["leader", "tail", "ten rows", "the lights off a while", "a flicker"],
)
def test_where_the_fabric_starts_ends_or_stops_within_a_block_its_dark_rows_hold_none(
    dark, expected
):
    """The dark rows of a block that the fabric enters or leaves were scored as fabric: one
    roll-wide defect at every leader. They get an empty extent of their own."""
    image = make_fabric(BLOCK_ROWS, WIDTH, weave="twill", seed=5)
    image[dark[0] : dark[1]] = _table(dark[1] - dark[0], WIDTH, 3.0, 0.8, seed=7)
    got = band_extents(image, row_start=512)
    assert [(e.row_start - 512, e.row_stop - 512, e.left, e.right) for e in got] == expected


def test_a_fabric_of_even_rows_is_fabric():
    """Weft stripes: every row even across, black or white, each unlike the next: texture along
    the roll."""
    stripes = np.repeat(np.tile(np.array([0, 255], np.uint8), BLOCK_ROWS // 2)[:, None], WIDTH, 1)
    assert band_extents(stripes)[0].width == WIDTH


def test_a_defect_inside_the_fabric_is_not_taken_for_its_edge():
    rows = BLOCK_ROWS
    left, right = np.full(rows, 256), np.full(rows, 1280)
    image = _roll(rows, left, right, table=240.0, brightness=0.6)
    # a dark hole and a stain 100-200 px inside each edge
    plant_defect(image, "hole", rng=np.random.default_rng(0), center=(128, 400), size=60)
    plant_defect(image, "stain", rng=np.random.default_rng(1), center=(100, 1120), size=80)
    _check(band_extents(image), left, right)


def test_colour_rolls_and_the_region_mask():
    rows = BLOCK_ROWS
    fabric = make_fabric(rows, WIDTH, weave="plain", colour=True, seed=2)
    image = np.full((rows, WIDTH, 3), 20, np.uint8)
    image[:, 500:1200] = fabric[:, 500:1200]
    extents = band_extents(image)
    _check(extents, np.full(rows, 500), np.full(rows, 1200))
    mask = region_mask(extents, slice(0, rows), WIDTH)
    assert mask.shape == (rows, WIDTH)
    assert mask[:, extents[0].left : extents[0].right].all()
    assert not mask[:, : extents[0].left].any() and not mask[:, extents[0].right :].any()


def test_grey_levels_are_the_float64_mean_to_the_bit() -> None:
    """The uint8 shortcut (an integer sum divided in float32) gives the bits of numpy's float64
    mean rounded to float32: for every sum three channels can make, and on random blocks of one
    and three channels; other dtypes and channel counts take the mean itself."""
    sums = np.arange(3 * 255 + 1)
    via_float64 = (sums.astype(np.float64) / 3).astype(np.float32)
    assert np.array_equal(np.divide(sums.astype(np.uint16), np.float32(3), dtype=np.float32),
                          via_float64)  # fmt: skip
    rng = np.random.default_rng(0)
    for shape, dtype in (((40, 70, 3), np.uint8), ((40, 70, 1), np.uint8), ((40, 70), np.uint8),
                         ((40, 70, 3), np.uint16), ((40, 70, 4), np.uint8)):  # fmt: skip
        block = rng.integers(0, 256, shape).astype(dtype)
        expected = (block.mean(axis=2) if block.ndim == 3 else block).astype(np.float32)
        grey = grey_levels(block)
        assert grey.dtype == np.float32 and grey.shape == shape[:2]
        assert np.array_equal(grey, expected)
    white = np.full((2, 3, 3), 255, np.uint8)  # the largest sum does not overflow
    assert np.array_equal(grey_levels(white), np.full((2, 3), 255, np.float32))


@pytest.mark.parametrize("share", [0.5, 0.45, 0.4, 0.3])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("table", "brightness"), [(40.0, 1.0), (220.0, 0.6)])
def test_a_fabric_guided_against_one_side_of_a_wide_field_is_found(share, side, table, brightness):
    """A narrow roll guided along one side of a wide line: the middle of the field is the table,
    which the tracker took for the fabric (its region the table's, the fabric's flaws masked off,
    the roll graded on the table's width or not at all)."""
    rows, covered = BLOCK_ROWS, int(WIDTH * share)
    left = np.full(rows, 0 if side == "left" else WIDTH - covered)
    right = left + covered
    image = _roll(rows, left, right, table=table, brightness=brightness)
    _check(band_extents(image), left, right)


def test_a_smooth_fabric_centred_on_a_grainy_table_stays_the_fabric():
    """The one-sided rule reads texture: a centred fabric smoother than its table (a mesh belt,
    a satin) must not lose to a side region of the table, which reaches a side while the
    middle's region has table on both sides."""
    rows, left, right = BLOCK_ROWS, np.full(BLOCK_ROWS, 300), np.full(BLOCK_ROWS, 1300)
    fabric = make_fabric(rows, WIDTH, weave="twill", seed=4).astype(np.float32)
    smooth = fabric.mean() + (fabric - fabric.mean()) * 0.15
    image = _table(rows, WIDTH, 120.0, 8.0, seed=5).astype(np.float32)
    image[:, 300:1300] = smooth[:, 300:1300]
    _check(band_extents(np.clip(image, 0, 255).astype(np.uint8)), left, right)
