"""Synthetic fabric: shapes, determinism, roll continuity, defect masks, MVTec layout, and the
defects pasted on real tiles that a model's selection is made by."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from distill.data.synthetic import DEFECT_KINDS, WEAVES, make_fabric
from distill.data.synthetic_defects import (
    make_defective,
    paste_defects,
    plant_defect,
    write_category,
)


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel absolute difference, the largest over channels."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return d if d.ndim == 2 else d.max(axis=-1)


@pytest.mark.parametrize("colour", [False, True])
@pytest.mark.parametrize("weave", WEAVES)
def test_fabric_shape_dtype_and_texture(weave: str, colour: bool) -> None:
    image = make_fabric(48, 80, weave=weave, colour=colour, seed=3)
    assert image.dtype == np.uint8
    assert image.shape == ((48, 80, 3) if colour else (48, 80))
    # A texture, not a flat field, and not clipped to black or white.
    assert image.std() > 10
    assert 40 < image.mean() < 215


@pytest.mark.parametrize("weave", WEAVES)
def test_colour_fabric_has_two_yarn_hues(weave: str) -> None:
    image = make_fabric(64, 64, weave=weave, colour=True, seed=5).reshape(-1, 3).astype(float)
    bright = image[image.sum(axis=1) > np.percentile(image.sum(axis=1), 60)]
    chroma = bright - bright.mean(axis=1, keepdims=True)
    chroma /= np.linalg.norm(chroma, axis=1, keepdims=True)
    # One yarn colour would keep every bright pixel's chroma pointing the same way.
    assert (chroma @ chroma.T).min() < 0.5


def test_weaves_differ() -> None:
    images = [make_fabric(64, 64, weave=weave, seed=1) for weave in WEAVES]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert _diff(images[i], images[j]).mean() > 5, (WEAVES[i], WEAVES[j])


@pytest.mark.parametrize("colour", [False, True])
def test_fabric_is_deterministic_per_seed(colour: bool) -> None:
    a = make_fabric(64, 96, weave="twill", colour=colour, seed=11)
    b = make_fabric(64, 96, weave="twill", colour=colour, seed=11)
    c = make_fabric(64, 96, weave="twill", colour=colour, seed=12)
    np.testing.assert_array_equal(a, b)
    assert _diff(a, c).mean() > 5


@pytest.mark.parametrize("colour", [False, True])
@pytest.mark.parametrize("weave", WEAVES)
def test_roll_generated_in_pieces_matches_roll_generated_at_once(weave: str, colour: bool) -> None:
    kw = {"weave": weave, "colour": colour, "seed": 7, "yarn_period": 7.3, "irregularity": 0.3}
    whole = make_fabric(160, 72, row_offset=1000, **kw)
    # Cuts that do not fall on yarn boundaries, including a one-row piece.
    cuts = [0, 37, 38, 101, 160]
    pieces = [
        make_fabric(end - start, 72, row_offset=1000 + start, **kw)
        for start, end in itertools.pairwise(cuts)
    ]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=0), whole)


def test_row_offset_matches_the_documented_example() -> None:
    full = make_fabric(100, 64, seed=4)
    np.testing.assert_array_equal(full[50:], make_fabric(50, 64, seed=4, row_offset=50))
    # A different offset is a different part of the roll.
    assert _diff(full[:50], full[50:]).mean() > 5


@pytest.mark.parametrize("colour", [False, True])
@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_mask_is_exact_and_visible(kind: str, colour: bool) -> None:
    for seed in range(4):
        weave = WEAVES[seed % len(WEAVES)]
        fabric = make_fabric(160, 160, weave=weave, colour=colour, seed=seed)
        image = fabric.copy()
        mask = plant_defect(image, kind, rng=np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (160, 160)
        assert mask.any(), (kind, seed)
        diff = _diff(image, fabric)
        inside, outside = diff[mask].mean(), diff[~mask].mean()
        assert inside > 20 and inside > 10 * outside, (kind, seed, inside, outside)
        # Every strongly changed pixel belongs to the defect, up to its anti-aliased rim.
        near_mask = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
        assert not (diff[~near_mask] >= 40).any(), (kind, seed)
        # Clearly visible but not huge: a blob or a thin line, not a region.
        ys, xs = np.nonzero(mask)
        short_side = min(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert 2 <= short_side <= 80, (kind, seed, short_side)


def test_defect_at_given_center_and_size() -> None:
    image = make_fabric(128, 128, seed=2)
    mask = plant_defect(image, "hole", rng=np.random.default_rng(0), center=(30, 90), size=20)
    ys, xs = np.nonzero(mask)
    assert abs(ys.mean() - 30) < 4 and abs(xs.mean() - 90) < 4
    assert 8 < ys.max() - ys.min() + 1 < 32


def test_defect_in_a_corner_stays_inside_the_image() -> None:
    image = make_fabric(64, 64, colour=True, seed=2)
    mask = plant_defect(image, "stain", rng=np.random.default_rng(1), center=(0, 63), size=40)
    assert mask.shape == (64, 64) and mask[0, 63]


def test_full_length_missing_yarn_spans_the_image() -> None:
    image = make_fabric(96, 128, seed=6)
    mask = plant_defect(image, "missing_yarn", rng=np.random.default_rng(3), size=0)
    ys, xs = np.nonzero(mask)
    span_y, span_x = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert span_y == 96 or span_x == 128
    assert min(span_y, span_x) <= 10


def test_make_defective_returns_union_mask_and_boxes() -> None:
    image, mask, defects = make_defective(128, 160, n_defects=3, seed=9, weave="satin")
    assert image.shape == (128, 160) and image.dtype == np.uint8
    assert mask.shape == (128, 160) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    assert len(defects) == 3
    covered = np.zeros(mask.shape, bool)
    for defect in defects:
        assert defect["kind"] in DEFECT_KINDS
        y0, x0, y1, x1 = defect["bbox"]
        assert 0 <= y0 < y1 <= 128 and 0 <= x0 < x1 <= 160
        cy, cx = defect["center"]
        assert 0 <= cy < 128 and 0 <= cx < 160
        assert mask[y0:y1, x0:x1].any()
        covered[y0:y1, x0:x1] = True
    assert not mask[~covered].any()
    again = make_defective(128, 160, n_defects=3, seed=9, weave="satin")
    np.testing.assert_array_equal(again[0], image)
    np.testing.assert_array_equal(again[1], mask)
    assert again[2] == defects


def test_make_defective_respects_kinds_and_colour() -> None:
    image, mask, defects = make_defective(96, 96, kinds=["knot"], n_defects=2, colour=True)
    assert image.shape == (96, 96, 3)
    assert [d["kind"] for d in defects] == ["knot", "knot"]
    assert mask.any()


def _pngs(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_write_category_layout(tmp_path) -> None:
    tile, n_defect = 48, 9
    dst = write_category(
        tmp_path / "cat", n_train=3, n_test_good=2, n_test_defect=n_defect, tile=tile, seed=4
    )
    assert dst == tmp_path / "cat"
    assert _pngs(dst / "train" / "good") == ["000.png", "001.png", "002.png"]
    assert _pngs(dst / "test" / "good") == ["000.png", "001.png"]
    kinds_written = sorted(p.name for p in (dst / "test").iterdir() if p.name != "good")
    assert kinds_written == sorted(DEFECT_KINDS)
    assert sorted(p.name for p in (dst / "ground_truth").iterdir()) == sorted(DEFECT_KINDS)
    n_images = 0
    for kind in DEFECT_KINDS:
        images = _pngs(dst / "test" / kind)
        masks = _pngs(dst / "ground_truth" / kind)
        assert masks == [name.replace(".png", "_mask.png") for name in images]
        n_images += len(images)
        for name in images:
            image = np.asarray(Image.open(dst / "test" / kind / name))
            mask = np.asarray(Image.open(dst / "ground_truth" / kind / name.replace(".", "_mask.")))
            assert image.shape == (tile, tile) and mask.shape == (tile, tile)
            assert set(np.unique(mask)) == {0, 255}
    assert n_images == n_defect

    # Good tiles are consecutive, non-overlapping windows of one roll, train first.
    good = [dst / "train" / "good" / n for n in _pngs(dst / "train" / "good")]
    good += [dst / "test" / "good" / n for n in _pngs(dst / "test" / "good")]
    stacked = np.concatenate([np.asarray(Image.open(p)) for p in good], axis=0)
    np.testing.assert_array_equal(stacked, make_fabric(5 * tile, tile, seed=4))


def test_write_category_is_deterministic(tmp_path) -> None:
    kw = {"n_train": 2, "n_test_good": 1, "n_test_defect": 3, "tile": 32, "weave": "knit"}
    a = write_category(tmp_path / "a", colour=True, seed=1, **kw)
    b = write_category(tmp_path / "b", colour=True, seed=1, **kw)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len(files_a) == 2 + 1 + 3 + 3
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_invalid_weave_and_kind_are_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown weave 'denim'.*plain, twill, satin, knit"):
        make_fabric(8, 8, weave="denim")
    with pytest.raises(ValueError, match=r"unknown defect kind 'tear'.*hole"):
        plant_defect(make_fabric(32, 32), "tear", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"unknown defect kind 'tear'"):
        make_defective(32, 32, kinds=["hole", "tear"])
    with pytest.raises(ValueError, match=r"unknown weave 'denim'"):
        write_category(tmp_path / "x", weave="denim")
    assert not (tmp_path / "x").exists()


def test_invalid_center_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        plant_defect(make_fabric(32, 32), "knot", rng=np.random.default_rng(0), center=(40, 5))


def _good_tiles(n: int = 4, size: int = 96) -> np.ndarray:
    """(n, size, size, 3) uint8 good tiles, as the selection's held-out tiles come."""
    rows = [make_fabric(size, size, weave=WEAVES[i % len(WEAVES)], seed=i) for i in range(n)]
    return np.stack([np.repeat(row[..., None], 3, axis=-1) for row in rows])


def test_pasted_defects_cycle_kinds_on_copies_of_the_tiles() -> None:
    tiles = _good_tiles()
    images, masks = paste_defects(tiles, seed=3, copies=2)
    assert images.shape == (8, *tiles.shape[1:]) and images.dtype == np.uint8
    assert masks.shape == (8, 96, 96) and masks.dtype == bool
    for k, (image, mask) in enumerate(zip(images, masks, strict=True)):
        tile = tiles[k % len(tiles)]
        assert mask.any(), k
        diff = _diff(image, tile)
        # each copy is its own tile with one defect in it, nothing changed away from the defect
        near = ndimage.binary_dilation(mask, structure=np.ones((5, 5), bool))
        assert diff[mask].mean() > 5 and not (diff[~near] >= 20).any(), k
    # the two copies of a tile hold different defects
    assert not np.array_equal(masks[0], masks[4])
    again, again_masks = paste_defects(tiles, seed=3, copies=2)
    assert np.array_equal(again, images) and np.array_equal(again_masks, masks)
    other, _ = paste_defects(tiles, seed=4, copies=2)
    assert not np.array_equal(other, images)


def test_pasted_defects_fade_by_the_strength_and_keep_their_full_mask() -> None:
    tiles = _good_tiles(2)
    full, full_masks = paste_defects(tiles, seed=1, copies=3, strength=(1.0, 1.0))
    faint, faint_masks = paste_defects(tiles, seed=1, copies=3, strength=(0.3, 0.3))
    # the same defects (the fade is drawn after each defect), only fainter; the mask keeps the
    # defect's drawn extent, so a faint flaw still counts in full
    assert np.array_equal(faint_masks, full_masks)
    base = np.concatenate([tiles] * 3).astype(np.float32)
    expected = np.clip(np.rint(base + 0.3 * (full.astype(np.float32) - base)), 0, 255)
    assert np.abs(faint.astype(np.float32) - expected).max() <= 1
    assert _diff(faint, base.astype(np.uint8))[faint_masks].mean() < (
        0.4 * _diff(full, base.astype(np.uint8))[full_masks].mean()
    )


@pytest.mark.parametrize(
    ("tiles", "strength", "message"),
    [
        (np.zeros((0, 8, 8, 3), np.uint8), (0.3, 1.0), "non-empty uint8"),
        (np.zeros((2, 8, 8), np.uint8), (0.3, 1.0), "non-empty uint8"),
        (np.zeros((2, 8, 8, 3), np.float32), (0.3, 1.0), "non-empty uint8"),
        (np.zeros((2, 8, 8, 3), np.uint8), (0.0, 1.0), "strength"),
        (np.zeros((2, 8, 8, 3), np.uint8), (0.8, 0.5), "strength"),
        (np.zeros((2, 8, 8, 3), np.uint8), (0.5, 1.5), "strength"),
    ],
)
def test_pasting_refuses_bad_tiles_and_strengths(tiles, strength, message) -> None:
    with pytest.raises(ValueError, match=message):
        paste_defects(tiles, strength=strength)
