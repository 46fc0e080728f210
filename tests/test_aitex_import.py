"""`distill.data.aitex.import_aitex`: AITEX strips and masks cut into MVTec-layout tiles (margin
tiles dropped, duplicates and bad files warned about) on a fake tree (tests/aitex_strips.py),
and one real fabric when ../shared/data/aitex is there.
"""

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from aitex_strips import FakeFabric, H, write_png
from PIL import Image

from distill.data.aitex import (
    AitexImportWarning,
    defect_name,
    import_aitex,
    is_margin_tile,
)
from distill.data.mvtec import GROUPS_FILE, REGIONS_FILE, Category
from distill.held_out import split_held_out

REAL_AITEX = Path(__file__).parents[1] / "../shared/data/aitex"
# Fake strips are 1024 wide: tile x00 is blank, x01 is 17 % blank (44 of 256 columns,
# kept), x02 is fabric, x03 is 78 % blank (200 of 256 columns, dropped).
LEFT_MARGIN, RIGHT_MARGIN, WIDTH = 300, 200, 1024
FAKE = FakeFabric(width=WIDTH, left=LEFT_MARGIN, right=RIGHT_MARGIN, halo=3)
_strip, _mask = FAKE.strip, FAKE.mask


@pytest.fixture()
def fake_aitex(tmp_path: Path) -> Path:
    src = tmp_path / "aitex"
    roll_a = src / "NoDefect_images" / "roll_a"
    for k in range(1, 6):
        # Strip 0002 is grey + alpha, as fabric 04 is stored.
        write_png(roll_a / f"000{k}_000_00.png", _strip(k), mode="LA" if k == 2 else None)
    write_png(roll_a / "0018_00_00.png", _strip(1))  # malformed name (as in the real copy)
    (roll_a / "notes.txt").write_text("not an image")

    roll_b = src / "NoDefect_images" / "roll_b"  # 900 wide, no margins: 3 tiles each
    write_png(roll_b / "0001_000_01.png", _strip(11, 900, 0, 0))
    write_png(roll_b / "0002_000_01.png", _strip(11, 900, 0, 0))  # pixel copy of 0001
    write_png(roll_b / "0003_000_01.png", _strip(13, 900, 0, 0))
    (roll_b / "0004_000_01.png").write_bytes((roll_a / "0001_000_00.png").read_bytes()[:300])

    defects, masks = src / "Defect_images", src / "Mask_images"
    strip = _strip(10)
    strip[100:140, 600:640] = 10  # the planted mark, in tile x02
    write_png(defects / "0010_002_00.png", strip)
    write_png(masks / "0010_002_00_mask.png", _mask((100, 140, 600, 640)))

    write_png(defects / "0011_019_00.png", _strip(20))
    write_png(masks / "0011_019_00_mask1.png", _mask((10, 30, 400, 420)))  # tile x01
    write_png(masks / "0011_019_00_mask2.png", _mask((200, 220, 850, 870)))  # x03, 78 % blank

    write_png(defects / "0012_099_00.png", _strip(30))
    write_png(masks / "0012_099_00_mask.png", _mask((50, 60, 520, 530)))  # x02

    (defects / "0013_002_00.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    write_png(defects / "0014_030_00.png", _strip(40))
    (masks / "0014_030_00_mask.png").write_bytes(b"garbage")
    write_png(defects / "0015_030_00.png", _strip(50))  # no mask at all
    write_png(defects / "0016_030_00.png", _strip(60))
    write_png(masks / "0016_030_00_mask.png", np.full((H, WIDTH), 100, np.uint8))  # all <= 127
    return src


def _import(src: Path, dst: Path, n_train_strips: int = 3, **kwargs) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = import_aitex(src, dst, n_train_strips=n_train_strips, progress=False, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, AitexImportWarning)]
    return counts, messages


def _pngs(root: Path, folder: str) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / folder).rglob("*.png"))


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_counts_split_and_margins(fake_aitex, tmp_path):
    dst = tmp_path / "mvtec"
    counts, _ = _import(fake_aitex, dst, defect_strip_good=True, edge_tiles=False)
    assert counts == {
        "fabric00": {"train_good": 6, "test_good": 7, "test_defect": 4, "skipped": 5},
        "fabric01": {"train_good": 6, "test_good": 0, "test_defect": 0, "skipped": 2},
    }
    cat = dst / "fabric00"
    # First three strips of the roll train, the rest test; x00 and x03 are margin.
    assert _names(cat / "train" / "good") == [
        f"000{k}_000_00_x{c:02d}.png" for k in (1, 2, 3) for c in (1, 2)
    ]
    assert _names(cat / "test" / "good") == [
        "0004_000_00_x01.png", "0004_000_00_x02.png",
        "0005_000_00_x01.png", "0005_000_00_x02.png",
        "0010_002_00_x01.png", "0011_019_00_x02.png", "0012_099_00_x01.png",
    ]  # fmt: skip
    # Position in the roll decides the split, so corrupt 0004 does not promote anything,
    # and the duplicate 0002 is dropped instead of sitting in train twice.
    assert _names(dst / "fabric01" / "train" / "good") == [
        f"000{k}_000_01_x{c:02d}.png" for k in (1, 3) for c in (0, 1, 2)
    ]
    assert not (dst / "fabric01" / "test").exists()


def test_defect_strips_give_only_defect_tiles_by_default(fake_aitex, tmp_path):
    counts, _ = _import(fake_aitex, tmp_path / "mvtec")
    # 6 grid tiles and 6 edge tiles train (see the next test)
    assert counts["fabric00"] == {"train_good": 12, "test_good": 4, "test_defect": 4, "skipped": 5}
    assert all(
        n.startswith(("0004_", "0005_")) for n in _names(tmp_path / "mvtec/fabric00/test/good")
    )


def test_training_strips_also_give_the_tiles_across_and_from_the_edge(fake_aitex, tmp_path):
    on, off, start = tmp_path / "on", tmp_path / "off", tmp_path / "start"
    counts_on, _ = _import(fake_aitex, on)
    counts_off, _ = _import(fake_aitex, off, edge_tiles=False)
    counts_start, _ = _import(fake_aitex, start, edge_start_tiles=True)
    # fabric 300-824: the tiles at x = 128 and 640 hold 84 and 184 columns of it; x = 384 is
    # fabric throughout (the grid has that); the tiles from its edges (asked for) start at
    # x = 300 and 568; fabric 01 has no margin, so no edge
    names = {d: set(_names(d / "fabric00/train/good")) for d in (on, off, start)}
    across = {f"000{k}_000_00_h{c:02d}.png" for k in (1, 2, 3) for c in (0, 2)}
    starting = {f"000{k}_000_00_{tag}.png" for k in (1, 2, 3) for tag in ("l01", "r02")}
    assert names[on] - names[off] == across
    assert names[start] - names[on] == starting
    assert counts_on["fabric00"]["train_good"] == counts_off["fabric00"]["train_good"] + 6
    assert counts_start["fabric00"]["train_good"] == counts_on["fabric00"]["train_good"] + 6
    assert counts_on["fabric01"] == counts_off["fabric01"] == counts_start["fabric01"]
    only_start = tmp_path / "only-start"  # the two kinds are asked for apart
    _import(fake_aitex, only_start, edge_tiles=False, edge_start_tiles=True)
    assert set(_names(only_start / "fabric00/train/good")) - names[off] == starting
    for folder in ("test", "ground_truth"):  # the test set is the same
        assert _pngs(on / "fabric00", folder) == _pngs(off / "fabric00", folder)
    regions = json.loads((start / "fabric00" / REGIONS_FILE).read_text())
    for k in (1, 2, 3):
        assert regions[f"train/good/000{k}_000_00_h00.png"] == [172, 256]
        assert regions[f"train/good/000{k}_000_00_h02.png"] == [0, 184]
    with Image.open(on / "fabric00/train/good/0002_000_00_h02.png") as im:
        assert np.array_equal(np.asarray(im), _strip(2)[:, 640:896])
    for tag, x in (("l01", 300), ("r02", 568)):  # wholly on fabric: no region
        assert f"train/good/0002_000_00_{tag}.png" not in regions
        with Image.open(start / f"fabric00/train/good/0002_000_00_{tag}.png") as im:
            assert np.array_equal(np.asarray(im), _strip(2)[:, x : x + 256])


def test_tiles_sharing_pixels_are_grouped_and_a_split_keeps_them_together(fake_aitex, tmp_path):
    on, off, start = tmp_path / "on", tmp_path / "off", tmp_path / "start"
    _import(fake_aitex, on)
    _import(fake_aitex, off, edge_tiles=False)
    _import(fake_aitex, start, edge_start_tiles=True)
    assert not (off / "fabric00" / GROUPS_FILE).exists()  # grid tiles never overlap
    groups = json.loads((on / "fabric00" / GROUPS_FILE).read_text())
    starting = json.loads((start / "fabric00" / GROUPS_FILE).read_text())
    for k in (1, 2, 3):
        tile = f"train/good/000{k}_000_00_{{}}.png".format
        # h00 (x = 128) lies in grid columns 0 and 1, h02 (x = 640) in 2 and 3
        assert groups[tile("h00")] == groups[tile("x01")] != groups[tile("x02")]
        assert groups[tile("x02")] == groups[tile("h02")]
        # l01 (x = 300) spans columns 1 and 2: it joins the two
        assert len({starting[tile(t)] for t in ("h00", "x01", "l01", "x02", "h02", "r02")}) == 1
    assert len(set(groups.values())) == 6  # no group across strips
    category = Category.open(on / "fabric00")
    labels = category.groups_of(category.train)
    for seed in range(20):
        train, held = split_held_out(len(labels), 0.3, seed, groups=labels)
        assert len(held) >= round(0.3 * len(labels)) - 1
        assert not set(labels[train]) & set(labels[held]), seed


def test_tiles_are_grey_crops_of_the_strip(fake_aitex, tmp_path):
    dst = tmp_path / "mvtec"
    _import(fake_aitex, dst)
    with Image.open(dst / "fabric00/train/good/0002_000_00_x02.png") as im:
        assert im.mode == "L" and im.size == (256, 256)
        assert np.array_equal(np.asarray(im), _strip(2)[:, 512:768])


def test_defect_tiles_and_masks(fake_aitex, tmp_path):
    dst = tmp_path / "mvtec"
    _import(fake_aitex, dst)
    cat = dst / "fabric00"
    assert sorted(p.name for p in (cat / "test").iterdir()) == [
        "broken_end", "defect_099", "fuzzyball", "good",
    ]  # fmt: skip
    assert defect_name("099") == "defect_099" and defect_name("036") == "weft_crack"
    # mask1 and mask2 are united; the partly blank x03 tile is kept because it is a defect.
    assert _names(cat / "test" / "fuzzyball") == ["0011_019_00_x01.png", "0011_019_00_x03.png"]
    for defect in ("broken_end", "defect_099", "fuzzyball"):
        tiles = [n.removesuffix(".png") for n in _names(cat / "test" / defect)]
        gt = [n.removesuffix("_mask.png") for n in _names(cat / "ground_truth" / defect)]
        assert tiles == gt and tiles
    with Image.open(cat / "ground_truth/broken_end/0010_002_00_x02_mask.png") as im:
        gt = np.asarray(im)
    assert set(np.unique(gt)) == {0, 255}
    expected = np.zeros((256, 256), dtype=np.uint8)
    expected[100:140, 600 - 512 : 640 - 512] = 255  # the grey halo binarises away
    assert np.array_equal(gt, expected)
    with Image.open(cat / "test/broken_end/0010_002_00_x02.png") as im:
        assert np.all(np.asarray(im)[gt > 0] == 10)


def test_warnings_name_the_bad_files(fake_aitex, tmp_path):
    _, messages = _import(fake_aitex, tmp_path / "mvtec")
    text = "\n".join(messages)
    for name in (
        "0018_00_00.png",  # malformed name
        "0013_002_00.png",  # corrupt strip
        "0014_030_00_mask.png",  # corrupt mask ...
        "Defect_images/0014_030_00.png",  # ... leaves its strip without a mask
        "0015_030_00.png",  # no mask file
        "0016_030_00.png",  # empty mask
        "0002_000_01.png",  # duplicate pixels
        "0004_000_01.png",  # truncated good strip
    ):
        assert name in text, name
    assert "notes.txt" not in text


def test_deterministic_filter_and_overwrite(fake_aitex, tmp_path):
    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))
        }

    first, second = tmp_path / "a", tmp_path / "b"
    _import(fake_aitex, first)
    with pytest.warns(AitexImportWarning):
        import_aitex(fake_aitex, second, n_train_strips=3, progress=True)
    assert digest(first) == digest(second) and digest(first)

    assert list(_import(fake_aitex, tmp_path / "d", fabrics="01")[0]) == ["fabric01"]
    only, messages = _import(fake_aitex, tmp_path / "c", fabrics=["fabric01"])
    assert list(only) == ["fabric01"] and [p.name for p in (tmp_path / "c").iterdir()] == [
        "fabric01"
    ]
    assert not any("_00.png" in m for m in messages)  # other fabrics are not even looked at

    with pytest.raises(FileExistsError, match="fabric00"):
        import_aitex(fake_aitex, first, n_train_strips=3, progress=False)
    stale = first / "fabric00" / "train" / "good" / "stale.png"
    stale.write_bytes(b"x")
    _import(fake_aitex, first, overwrite=True)
    assert not stale.exists() and digest(first) == digest(second)


def test_margin_rule():
    tile = np.full((256, 256), 128, dtype=np.uint8)
    tile[:, :128] = 240  # exactly half near-white: still fabric
    assert not is_margin_tile(tile)
    tile[0, 128] = 255
    assert is_margin_tile(tile)
    tile[:, :] = 239
    assert not is_margin_tile(tile)


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        import_aitex(tmp_path / "missing", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="fabric"):
        import_aitex(tmp_path, tmp_path / "out", fabrics=["cotton"], progress=False)


def test_a_folder_without_aitex_strips_is_refused(fake_aitex, tmp_path):
    """A folder of something else (or the fabrics asked for absent) imported nothing and said
    nothing wrong; a missed path in a script then trained on an empty category."""
    other = tmp_path / "photos"
    (other / "holiday").mkdir(parents=True)
    (other / "holiday" / "beach.png").write_bytes(b"not a strip")
    with pytest.raises(ValueError, match="holds no AITEX strip: want NoDefect_images"):
        import_aitex(other, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="holds no AITEX strip of fabric 07"):
        import_aitex(fake_aitex, tmp_path / "out", fabrics="07", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.aitex
def test_real_aitex_one_fabric(tmp_path):
    if not (REAL_AITEX / "README.md").is_file():
        pytest.skip(f"real AITEX data not found at {REAL_AITEX.resolve()}")
    counts, messages = _import(
        REAL_AITEX, tmp_path, n_train_strips=15, fabrics=["01"], defect_strip_good=True
    )
    # 20 defect-free strips of 14 non-margin tiles (15 train, 5 test) plus a stray copy
    # named 0018_00_01.png; 11 defect strips add 28 defect and 147 good tiles; each training
    # strip adds one tile across the fabric's edge.
    assert counts == {
        "fabric01": {"train_good": 210 + 15, "test_good": 217, "test_defect": 28, "skipped": 1}
    }
    assert any("0018_00_01.png" in m for m in messages)
    for path in (tmp_path / "fabric01" / "train" / "good").glob("*_x??.png"):
        with Image.open(path) as im:
            assert not is_margin_tile(np.asarray(im))


def test_the_cli_says_when_nothing_was_imported_and_how_to_overwrite(fake_aitex, tmp_path, capsys):
    """`--tile 300` skipped every strip (256 rows) and exited 0; an existing folder asked for
    "overwrite=True", the Python argument, not the flag."""
    from cli.main import main

    with pytest.warns(AitexImportWarning, match="smaller than a tile"):
        code = main(["datasets", "import-aitex", str(fake_aitex), str(tmp_path / "big"),
                     "--tile", "300", "--fabric", "00"])  # fmt: skip
    assert code == 2 and "no tile imported from" in capsys.readouterr().err
    _import(fake_aitex, tmp_path / "out", fabrics="00")
    with pytest.raises(FileExistsError, match="replace it with --overwrite"):
        import_aitex(fake_aitex, tmp_path / "out", fabrics="00", progress=False)
