"""A roll built from AITEX strips: rows and planted positions (fake tree), and the whole
pipeline on one real fabric (opt-in: `pytest -m aitex`, needs ../shared/data/aitex)."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from aitex_strips import FakeFabric, H, write_png
from scipy import ndimage

from distill.data.aitex import AitexImportWarning, import_aitex, load_mask, read_grey
from distill.train import TrainConfig, train
from rollscan_testing.aitex_fabric_roll import (
    REPORT_KEYS,
    build_aitex_roll,
    report,
    run_aitex_roll,
    split_good_strips,
    use_model,
)
from rollscan_testing.aitex_strip_rolls import split_strip_rolls, strip_levels
from rollscan_testing.roll_matching import match_planted, pixel_matches
from rollscan_testing.synthetic_roll import PlantedDefect, match_defects
from storage.schema import Roll
from storage.settings import Settings
from storage.zarr_rolls import open_roll
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer

REAL_AITEX = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aitex"
W = 600
FAKE = FakeFabric(width=W, left=40, right=40, halo=2)
_strip, _mask = FAKE.strip, FAKE.mask


@pytest.fixture()
def fake_aitex(tmp_path: Path) -> Path:
    src = tmp_path / "aitex"
    roll = src / "NoDefect_images" / "roll_a"
    for k in range(1, 19):  # 0001-0015 train; 0016, 0018 go into the roll
        write_png(roll / f"{k:04d}_000_00.png", _strip(3 if k == 17 else k))  # 0017 copies 0003
    write_png(roll / "0018_00_00.png", _strip(99))  # malformed name: not a strip
    write_png(src / "NoDefect_images" / "roll_b" / "0001_000_01.png", _strip(50))  # other fabric
    defects, masks = src / "Defect_images", src / "Mask_images"
    write_png(defects / "0030_002_00.png", _strip(30))
    write_png(masks / "0030_002_00_mask.png", _mask((10, 20, 100, 110), (200, 250, 300, 302)))
    write_png(defects / "0031_019_00.png", _strip(31))
    write_png(masks / "0031_019_00_mask1.png", _mask((100, 120, 400, 420)))
    write_png(masks / "0031_019_00_mask2.png", _mask((110, 130, 410, 430)))  # overlaps: one defect
    write_png(defects / "0032_030_00.png", _strip(32, 500))  # narrower: padded with white
    write_png(masks / "0032_030_00_mask.png", _mask((0, 5, 450, 460), width=500))
    write_png(defects / "0033_030_00.png", _strip(33))  # no mask: left out
    write_png(defects / "0034_027_01.png", _strip(34))
    write_png(masks / "0034_027_01_mask.png", _mask((10, 20, 10, 20)))
    return src


def _box_pixels(r0, r1, c0, c1):
    return {(r, c) for r in range(r0, r1) for c in range(c0, c1)}


def test_build_aitex_roll_rows_and_planted_positions(fake_aitex, tmp_path):
    train_strips, roll_strips = split_good_strips(fake_aitex, "00")
    assert [p.name for p in train_strips] == [f"{k:04d}_000_00.png" for k in range(1, 16)]
    assert [p.name for p in roll_strips] == [f"{k:04d}_000_00.png" for k in (16, 17, 18)]
    with pytest.warns(AitexImportWarning, match="0033_030_00"):
        manifest, planted = build_aitex_roll(
            fake_aitex, "fabric00", tmp_path / "roll", "R-A", strips_per_frame=2, px_per_mm=5
        )
    assert manifest == {
        "roll_id": "R-A", "fabric_type": "aitex-00", "width_mm": W / 5, "px_per_mm": 5,
        "frames": 3, "complete": True,
        "meta": {"source": "AITEX", "fabric": "00", "scale": "nominal"},
    }  # fmt: skip
    # Good strips first and last, defect strips spread between; 0017 (a copy of the
    # training strip 0003) is left out, and so is 0033 (no mask).
    layout = json.loads((tmp_path / "roll" / "strips.json").read_text())
    assert [(s["strip"], s["row"], s["defect"]) for s in layout] == [
        ("0016_000_00.png", 0, None), ("0030_002_00.png", 256, "002"),
        ("0031_019_00.png", 512, "019"), ("0032_030_00.png", 768, "030"),
        ("0018_000_00.png", 1024, None),
    ]  # fmt: skip
    frames = [tifffile.imread(tmp_path / "roll" / "frames" / f"{k:06d}.tif") for k in (1, 2, 3)]
    assert [f.shape for f in frames] == [(512, W), (512, W), (256, W)]
    image = np.concatenate(frames)
    padded = np.pad(_strip(32, 500), ((0, 0), (0, W - 500)), constant_values=255)
    expected = np.concatenate([_strip(16), _strip(30), _strip(31), padded, _strip(18)])
    np.testing.assert_array_equal(image, expected)

    assert [(s.get("flaws"), s.get("components")) for s in layout] == [
        (None, None),
        (2, 2),
        (1, 1),
        (1, 1),
        (None, None),
    ]
    assert [p.components for p in planted] == [1, 1, 1, 1]  # 36-38 mm apart: not merged
    assert [(p.kind, p.bbox_px) for p in planted] == [
        ("broken_end", (256 + 10, 100, 256 + 20, 110)),
        ("broken_end", (256 + 200, 300, 256 + 250, 302)),
        ("fuzzyball", (512 + 100, 400, 512 + 130, 430)),
        ("nep", (768, 450, 768 + 5, 460)),
    ]
    assert set(planted[0].pixels) == _box_pixels(266, 276, 100, 110)
    union = _box_pixels(612, 632, 400, 420) | _box_pixels(622, 642, 410, 430)
    assert set(planted[2].pixels) == union  # _mask1 and _mask2 overlap: one component
    assert planted[3].center_px == (770, 455)
    assert planted[3].center_mm(5) == pytest.approx((91.0, 154.1))
    stored = json.loads((tmp_path / "roll" / "planted.json").read_text())
    assert [tuple(p["bbox_px"]) for p in stored] == [p.bbox_px for p in planted]


def test_split_strip_rolls_gives_each_strip_its_pixels_and_flaws(fake_aitex, tmp_path):
    with pytest.warns(AitexImportWarning):
        manifest, planted = build_aitex_roll(
            fake_aitex, "00", tmp_path / "roll", "R-A", px_per_mm=5
        )
    image = np.concatenate(
        [tifffile.imread(f) for f in sorted((tmp_path / "roll" / "frames").glob("*.tif"))]
    )
    rolls = split_strip_rolls(tmp_path / "roll", planted, tmp_path / "strips")
    assert [d.name for d, _ in rolls] == [f"R-A-s{k:02d}" for k in range(5)]
    assert [len(p) for _, p in rolls] == [0, 2, 1, 1, 0]
    for k, (folder, flaws) in enumerate(rolls):
        own = json.loads((folder / "manifest.json").read_text())
        assert own == manifest | {"roll_id": folder.name, "frames": 1}
        (strip,) = json.loads((folder / "strips.json").read_text())
        assert strip["row"] == 0 and strip["rows"] == 256
        frame = tifffile.imread(folder / "frames" / "000001.tif")
        np.testing.assert_array_equal(frame, image[256 * k : 256 * (k + 1)])
        for flaw in flaws:  # the same mask pixels, on the strip's own rows
            whole = next(
                p for p in planted if p.kind == flaw.kind and p.bbox_px[1] == flaw.bbox_px[1]
            )
            assert flaw.bbox_px == (whole.bbox_px[0] - 256 * k, *whole.bbox_px[1:2],
                                    whole.bbox_px[2] - 256 * k, whole.bbox_px[3])  # fmt: skip
            assert {(y + 256 * k, x) for y, x in flaw.pixels} == set(whole.pixels)
            assert flaw.components == whole.components


@pytest.mark.parametrize(("gap", "components"), [(38.0, [2, 1, 1]), (37.9, [1, 1, 1, 1])])
def test_planted_flaws_are_mask_components_merged_at_the_rolls_scale(
    fake_aitex, tmp_path, gap, components
):
    # strip 0030's two boxes: 190 px across (38 mm at 5 px/mm) and 180 px along (36 mm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AitexImportWarning)
        _, planted = build_aitex_roll(fake_aitex, "00", tmp_path / "roll", "R-M", px_per_mm=5,
                                      merge_gap_mm=gap)  # fmt: skip
    assert [p.components for p in planted] == components
    if gap == 38.0:
        assert planted[0].bbox_px == (256 + 10, 100, 256 + 250, 302)
        assert set(planted[0].pixels) == _box_pixels(266, 276, 100, 110) | _box_pixels(
            456, 506, 300, 302
        )
    stored = json.loads((tmp_path / "roll" / "planted.json").read_text())
    assert [p["components"] for p in stored] == components


def test_match_planted_agrees_with_match_defects(fake_aitex, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AitexImportWarning)
        _, planted = build_aitex_roll(fake_aitex, "00", tmp_path / "roll", "R-B", px_per_mm=10)
    # (x0, y0, x1, y1) mm at 10 px/mm; planted 0 covers rows 266-275, cols 100-109
    boxes = [(10.0, 27.6, 11.0, 28.0), (10.0, 27.5, 11.0, 28.0), (40.0, 61.0, 43.0, 63.5),
             (0.0, 0.0, 60.0, 120.0), (1.0, 1.0, 2.0, 2.0), (45.0, 76.8, 46.0, 77.3)]  # fmt: skip
    found = [dict(zip(("x0_mm", "y0_mm", "x1_mm", "y1_mm"), b, strict=True)) for b in boxes]
    assert match_planted(planted, found, 10) == match_defects(planted, found, 10)
    matched, false = match_planted(planted, found, 10)
    assert matched == {0: 1, 1: 3, 2: 2, 3: 3} and false == [0, 4]


def test_pixel_matches_counts_a_defect_only_where_its_pixels_are():
    def cell(r, c):  # a planted 4×4 mask filling the ¼-res cell (r, c)
        return PlantedDefect("x", (4 * r + 2, 4 * c + 2), (4 * r, 4 * c, 4 * r + 4, 4 * c + 4),
                             sorted(_box_pixels(4 * r, 4 * r + 4, 4 * c, 4 * c + 4)))  # fmt: skip

    scores = np.zeros((10, 10), dtype=np.float16)
    scores[1, 1:10] = scores[1:10, 9] = scores[9, 1:10] = 1.0  # a U whose box covers (5, 5)
    scores[9, 1] = 0.5  # not above the threshold
    scores[5, 2] = 0.9  # a lone hot cell touching no mask
    planted = [cell(1, 1), cell(5, 5), cell(9, 1)]
    found, false = pixel_matches(scores, 0.5, planted)
    assert found == {0} and false == 1


def test_strip_levels_leave_out_masks_seams_and_the_table():
    # two strips of 256 rows (64 ¼-res rows), four 64-wide blocks across; the first block is
    # the table beside the fabric
    scores = np.full((128, 256), 1.0, dtype=np.float32)
    scores[64:] = 3.0
    scores[:, :64] = -np.inf
    scores[56:72, 64:] = 9.0  # the seam: each strip's map reaches into the other's
    scores[100, 140] = 50.0  # a flaw in the second strip's third block
    flaw = PlantedDefect(
        "x", (402, 562), (400, 560, 404, 564), sorted(_box_pixels(400, 404, 560, 564))
    )
    strips = [{"row": 0, "rows": 256}, {"row": 256, "rows": 256}]
    assert strip_levels(scores, strips, [flaw], block=64) == [1.0, 3.0]
    scores[20, 200] = 7.0  # a hot spot in one of the first strip's three blocks
    assert strip_levels(scores, strips, [], block=64) == [1.0, 3.0]  # a median
    assert np.isnan(strip_levels(np.full((64, 64), -np.inf), strips[:1], [], block=64)).all()


def _smallest_fabric(src: Path) -> str:
    counts: dict[str, int] = {}
    for path in [*src.glob("NoDefect_images/*/*.png"), *src.glob("Defect_images/*.png")]:
        if m := re.fullmatch(r"\d{4}_\d{3}_(\d{2})", path.stem):
            counts[m[1]] = counts.get(m[1], 0) + 1
    return min(sorted(counts), key=counts.get)


@pytest.mark.aitex
def test_real_fabric_roll_through_the_pipeline(db_engine, local_store, tmp_path):
    if not (REAL_AITEX / "README.md").is_file():
        pytest.skip(f"real AITEX data not found at {REAL_AITEX} (needs ../shared/data/aitex)")
    code = _smallest_fabric(REAL_AITEX)
    # A model trained for one epoch on every 6th training tile, with its threshold from its
    # own calibration: this test is about plumbing and positions, not accuracy.
    import_aitex(REAL_AITEX, tmp_path / "tiles", fabrics=[code], progress=False)
    category = tmp_path / "tiles" / f"fabric{code}"
    for k, tile in enumerate(sorted((category / "train" / "good").glob("*.png"))):
        if k % 6:
            tile.unlink()
    checkpoint = tmp_path / "model.pt"
    train(category, checkpoint, TrainConfig(epochs=1), progress=False)

    settings = Settings(band_height=1024, data_dir=tmp_path / "data", device="cpu", batch_size=8)
    enqueuer = InlineEnqueuer()
    ctx = WorkerContext(settings, db_engine, local_store, enqueuer, device="cpu", batch_size=8)
    enqueuer.ctx = ctx
    _, fabric_type = use_model(ctx, checkpoint, f"aitex-{code}")
    roll_dir = tmp_path / "roll"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AitexImportWarning)  # e.g. 0106_010_03's empty mask
        manifest, planted = build_aitex_roll(
            REAL_AITEX, code, roll_dir, f"aitex{code}-test", fabric_type=fabric_type
        )
    layout = json.loads((roll_dir / "strips.json").read_text())
    assert planted and any(s["defect"] is None for s in layout)

    result = run_aitex_roll(ctx, roll_dir, planted)

    rows = sum(s["rows"] for s in layout)
    with ctx.session() as session:
        roll = session.get(Roll, manifest["roll_id"])
        assert (roll.status, roll.rows_ingested) == ("done", rows)
    # Every strip lies at its rows in the ingested image, and every planted defect is a
    # component of its strip's mask, moved down by the strip's first row.
    image = open_roll(local_store, manifest["roll_id"]).read_rows(0, rows)
    image = image.reshape(rows, -1)
    by_row = {}
    for s in layout:
        folder = "Defect_images" if s["defect"] else f"NoDefect_images/{_roll_folder(code)}"
        strip = read_grey(REAL_AITEX / folder / s["strip"])
        np.testing.assert_array_equal(image[s["row"] : s["row"] + s["rows"]], strip)
        if s["defect"]:
            mask = load_mask(REAL_AITEX / "Mask_images", REAL_AITEX / folder / s["strip"],
                              strip.shape)  # fmt: skip
            labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
            by_row[s["row"]] = (labels, n)
    # every planted flaw is whole components of its strip's mask (merged by the finalize rule)
    for row, (labels, n) in by_row.items():
        inside = [p for p in planted if row <= p.bbox_px[0] < row + H]
        assert sum(p.components for p in inside) == n
        for p in inside:
            ys, xs = np.asarray(p.pixels).T
            own = np.unique(labels[ys - row, xs])
            assert own.min() > 0 and len(own) == p.components
            assert len(p.pixels) == np.count_nonzero(np.isin(labels, own))
    assert result["planted_components"] == sum(n for _, n in by_row.values())

    assert result["planted"] == len(planted)
    assert 0 <= result["matched"] <= result["planted"]
    assert result["recall"] == pytest.approx(result["matched"] / result["planted"])
    assert result["roll_length_m"] == pytest.approx(rows / 10 / 1000)
    assert result["false_per_m"] == pytest.approx(result["false_defects"] / (rows / 1e4))
    assert result["tiles"] > 0 and result["tiles_per_s"] > 0
    assert isinstance(result["grade"], str)
    assert 0 <= result["matched_px"] <= result["matched"]  # a box holds its own pixels
    assert 0 <= result["false_defects_px"] <= result["found"]
    assert result["threshold"] == result["model_threshold"]  # the default: the model's
    assert len(result["strip_levels"]) == len(layout)
    assert 0 <= result["false_at_seam"] <= result["false_defects"]
    assert 0 <= result["false_at_selvage"] <= result["false_defects"]
    out = json.loads(json.dumps(report(result)))
    assert tuple(out) == REPORT_KEYS


def _roll_folder(code: str) -> str:
    train_strips, _ = split_good_strips(REAL_AITEX, code)
    return train_strips[0].parent.name
