"""Import the AITEX fabric database into the MVTec AD folder layout.

Source layout (see the data set's README):

    NoDefect_images/<roll>/NNNN_000_FF.png      defect-free strips, in scan order
    Defect_images/NNNN_DDD_FF.png               strips with defects
    Mask_images/NNNN_DDD_FF_mask.png            white = defect (or _mask1, _mask2, ...)

Output, one category per fabric code FF:

    fabricFF/train/good/<stem>_xCC.png
    fabricFF/test/good/<stem>_xCC.png
    fabricFF/test/<defect name>/<stem>_xCC.png
    fabricFF/ground_truth/<defect name>/<stem>_xCC_mask.png    0 / 255

CC is the tile's column index along the strip (x offset = CC * tile), two digits so the
names sort in strip order.  Strips taller than one tile (only when `tile` is smaller than
the strip height) get `_yRR_xCC`.  Training strips also give `<stem>_hCC.png`: the tiles
across the fabric's edge half a tile off the grid (x offset = CC * tile + tile / 2;
`distill.data.aitex_edge_tiles`), and, asked for, `<stem>_lCC.png` / `<stem>_rCC.png`: the
tiles that start at the fabric's left edge and end at its right one, as the pipeline lays them
for a model trained with the fabric tile layout.

Blank-margin rule: a tile is a margin tile when more than half of its pixels are
near-white (>= 240).  Figures behind it, from all 2672 tiles of the 167 real strips
(5 fabrics): the white ends are exactly 255; tiles away from the ends never have more
than 2.5 % near-white pixels (fabric 04's bright selvage line ~1.5 %, the weft-crack
strip 0080 ~2.5 %); 317 tiles are > 99 % white; the ~100 tiles across the fabric/blank
edge spread evenly from 3.6 % to 99 %, so no gap suggests a cut there.  Half is chosen
because defect tiles are kept even when partly blank (eleven real defect tiles in
fabrics 00 and 03 hold 7-83 % margin), so good tiles holding the same fabric/blank edge
must stay in train and test too: dropping them all would make "edge present" a cue for
"defective".  Tiles that are mostly blank carry little fabric and are dropped from
train/good and test/good.

Fabric region: the near-white rule misses the non-white ends of fabrics 04 and 06 (a darker,
textured backing over the first ~2 tiles, then a white line, then the fabric).  So each strip's
fabric is also found by `distill.fabric_region` (the tracker the pipeline uses on bands): a good
tile with less than half its width on fabric is margin too, and every kept tile that is not
fabric from side to side gets its fabric columns in `fabric_regions.json` (`distill.data.mvtec`),
which evaluation uses to leave off-fabric pixels out, as the product does.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distill.data.aitex_edge_tiles import (
    grid_fabric_columns,
    overlap_groups,
    tiles_across_the_edge,
    tiles_from_the_edges,
)
from distill.data.mvtec import GROUPS_FILE, REGIONS_FILE
from distill.fabric_region import Extent, block_extent
from distill.progress import progress_bar

__all__ = [
    "DEFECT_NAMES",
    "MARGIN_MAX_WHITE_FRACTION",
    "MARGIN_WHITE_LEVEL",
    "AitexImportWarning",
    "defect_name",
    "import_aitex",
    "is_margin_tile",
]

DEFECT_NAMES: dict[str, str] = {
    "002": "broken_end",
    "006": "broken_yarn",
    "010": "broken_pick",
    "016": "weft_curling",
    "019": "fuzzyball",
    "022": "cut_selvage",
    "023": "crease",
    "025": "warp_ball",
    "027": "knots",
    "029": "contamination",
    "030": "nep",
    "036": "weft_crack",
}
MARGIN_WHITE_LEVEL = 240
MARGIN_MAX_WHITE_FRACTION = 0.5
_MASK_LEVEL = 127  # the masks have soft edges; the README says threshold at > 127

# A strip's file stem: `<defect code>_<strip>_<fabric code>`, e.g. 0044_019_04.
STRIP_STEM = re.compile(r"^(\d{4})_(\d{3})_(\d{2})$")
# Malformed names that still end in a fabric code, so their skip can be counted there.
_LOOSE_STEM = re.compile(r"^\d+_\d+_(\d{2})$")
_MASK_NAME = re.compile(r"^(?P<stem>.+)_mask(?P<k>\d*)\.png$", re.IGNORECASE)


class AitexImportWarning(UserWarning):
    """A source file was skipped or could not be used."""


def _warn(message: str) -> None:
    warnings.warn(message, AitexImportWarning, stacklevel=3)


def defect_name(code: str) -> str:
    """Folder name for a defect code: the README's name, or defect_DDD when unknown."""
    return DEFECT_NAMES.get(code, f"defect_{code}")


def is_margin_tile(tile: np.ndarray, fabric_columns: tuple[int, int] | None = None) -> bool:
    """True when more than half the tile's pixels are near-white (see module docstring), or
    off the fabric found by `distill.fabric_region` (`fabric_columns`, within the tile)."""
    if fabric_columns is not None:
        x0, x1 = fabric_columns
        if (x1 - x0) < MARGIN_MAX_WHITE_FRACTION * tile.shape[1]:
            return True
    return float(np.mean(tile >= MARGIN_WHITE_LEVEL)) > MARGIN_MAX_WHITE_FRACTION


def read_grey(path: Path) -> np.ndarray | None:
    """8-bit greyscale array, or None (with a warning) when the file does not decode."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):
                wide = np.asarray(im, dtype=np.int64)
                return (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
            # Fabric 04 is stored as grey + opaque alpha ("LA"); keep the grey.
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except Exception as exc:  # any decoder failure means "unreadable": skip, go on
        _warn(f"AITEX: cannot read {path}: {type(exc).__name__}: {exc}")
        return None


@dataclass(frozen=True)
class _Strip:
    path: Path
    fabric: str  # "00"
    defect_code: str | None  # None for defect-free strips
    split: str  # "train" or "test"


def _mask_files(mask_dir: Path, stem: str) -> list[Path]:
    if not mask_dir.is_dir():
        return []
    found = []
    for p in mask_dir.iterdir():
        m = _MASK_NAME.match(p.name)
        if m and m["stem"] == stem:
            found.append((int(m["k"] or 0), p.name, p))
    return [p for _, _, p in sorted(found)]


def load_mask(mask_dir: Path, strip: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """Union of the strip's binarised masks, or None when none is usable (warned)."""
    union = None
    paths = _mask_files(mask_dir, strip.stem)
    for path in paths:
        mask = read_grey(path)
        if mask is None:
            continue  # already warned; treated as absent
        if mask.shape != shape:
            _warn(f"AITEX: mask {path} is {mask.shape}, strip {strip.name} is {shape}; ignored")
            continue
        union = mask > _MASK_LEVEL if union is None else union | (mask > _MASK_LEVEL)
    if union is None or not union.any():
        why = "an empty mask" if union is not None else "no readable mask" if paths else "no mask"
        _warn(f"AITEX: defect strip {strip} has {why}; skipped")
        return None
    return union


def _plan(
    src: Path, n_train_strips: int, wanted: set[str] | None
) -> tuple[list[_Strip], list[tuple[str | None, Path]]]:
    """The strips to import, in a fixed order, and the malformed names (fabric, path)."""
    strips: list[_Strip] = []
    malformed: list[tuple[str | None, Path]] = []

    def parse(path: Path) -> tuple[str, str] | None:
        m = STRIP_STEM.match(path.stem)
        if m:
            return (m[3], m[2]) if wanted is None or m[3] in wanted else None
        loose = _LOOSE_STEM.match(path.stem)
        fabric = loose[1] if loose else None
        if wanted is None or fabric in wanted:
            malformed.append((fabric, path))
        return None

    def pngs(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")

    good_root = src / "NoDefect_images"
    if good_root.is_dir():
        for roll in sorted(p for p in good_root.iterdir() if p.is_dir()):
            position: dict[str, int] = {}
            for path in pngs(roll):
                parsed = parse(path)
                if parsed is None:
                    continue
                fabric = parsed[0]
                # Split by name order within the roll, decided before decoding, so a
                # corrupt strip does not shift later strips between train and test.
                k = position[fabric] = position.get(fabric, 0) + 1
                split = "train" if k <= n_train_strips else "test"
                strips.append(_Strip(path, fabric, None, split))
    defect_root = src / "Defect_images"
    if defect_root.is_dir():
        for path in pngs(defect_root):
            parsed = parse(path)
            if parsed is not None:
                strips.append(_Strip(path, parsed[0], parsed[1], "test"))
    return strips, malformed


def _tile_grid(shape: tuple[int, int], tile: int) -> list[tuple[str, int, int]]:
    rows, cols = shape[0] // tile, shape[1] // tile  # partial tiles are dropped
    return [
        (f"x{c:02d}" if rows == 1 else f"y{r:02d}_x{c:02d}", r, c)
        for r in range(rows)
        for c in range(cols)
    ]


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def _normalise_fabric(code: str) -> str:
    code = str(code)
    code = code.removeprefix("fabric")
    if not re.fullmatch(r"\d{2}", code):
        raise ValueError(f"fabric codes look like '03' or 'fabric03', got {code!r}")
    return code


def import_aitex(
    src: Path,
    dst: Path,
    *,
    tile: int = 256,
    n_train_strips: int = 15,
    progress: bool = True,
    fabrics: Iterable[str] | None = None,
    overwrite: bool = False,
    defect_strip_good: bool = False,
    edge_tiles: bool = True,
    edge_start_tiles: bool = False,
) -> dict[str, dict[str, int]]:
    """Convert AITEX strips under `src` into MVTec AD categories `dst/fabricFF`.

    Strips are cut into non-overlapping `tile`×`tile` tiles (a partial last tile is
    dropped).  Per roll folder, in name order, the first `n_train_strips` defect-free
    strips of each fabric go to train/good and the rest to test/good.  Tiles of a defect
    strip with any mask pixel (union of its masks, binarised at > 127) go to
    test/<defect name> with their mask; its other tiles go to test/good only with
    `defect_strip_good` — by default they are left out, because a mask marks the annotated
    defect, not everything else as good: defect strips also hold off-fabric areas that are
    neither white margin nor fabric (e.g. the machine bed beside the cut selvage of
    0062_022_00), which would count as false alarms on "good" tiles.  Margin tiles
    (see module docstring) are dropped from train/good and test/good only.

    `edge_tiles`: training strips also give the tiles across the fabric's edge half a tile off
    the grid (`tiles_across_the_edge`), counted in train_good; with `edge_start_tiles` too,
    the tiles that start at its edges (`tiles_from_the_edges`), for a model trained with
    `tile_layout="fabric"`.

    Unreadable strips, unreadable masks, defect strips without a usable (non-empty)
    mask, malformed file names and strips whose pixels duplicate an earlier strip of the
    same fabric are skipped with an `AitexImportWarning` naming the file.

    `fabrics` limits the import to some codes ("03" or "fabric03", or one such string).  An existing,
    non-empty `dst/fabricFF` raises FileExistsError unless `overwrite`, which deletes it
    first, so stale tiles from an earlier run cannot mix in.

    Returns {"fabricFF": {"train_good", "test_good", "test_defect", "skipped"}} where
    the first three count tiles written and "skipped" counts source strips not imported.
    The output is deterministic: same input, same files, same bytes.
    """
    src, dst = Path(src), Path(dst)
    if tile < 1 or n_train_strips < 0:
        raise ValueError(f"need tile >= 1 and n_train_strips >= 0, got {tile}, {n_train_strips}")
    if not src.is_dir():
        raise FileNotFoundError(f"AITEX source folder not found: {src}")
    if isinstance(fabrics, str):  # one code, not an iterable of characters
        fabrics = [fabrics]
    wanted = None if fabrics is None else {_normalise_fabric(f) for f in fabrics}
    strips, malformed = _plan(src, n_train_strips, wanted)
    if not strips and not malformed:  # not an AITEX folder, or none of the fabrics asked for
        which = "" if wanted is None else f" of fabric {', '.join(sorted(wanted))}"
        raise ValueError(
            f"{src} holds no AITEX strip{which}: want NoDefect_images/<roll>/NNNN_DDD_FF.png "
            "and Defect_images/NNNN_DDD_FF.png"
        )

    fabric_codes = sorted({s.fabric for s in strips} | {f for f, _ in malformed if f})
    counts = {
        f"fabric{f}": {"train_good": 0, "test_good": 0, "test_defect": 0, "skipped": 0}
        for f in fabric_codes
    }
    for f in fabric_codes:
        category = dst / f"fabric{f}"
        if category.exists() and any(category.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{category} is not empty; replace it with --overwrite")
            shutil.rmtree(category)

    for fabric, path in malformed:
        _warn(f"AITEX: unexpected file name {path} (want NNNN_DDD_FF.png); skipped")
        if fabric is not None:
            counts[f"fabric{fabric}"]["skipped"] += 1
    mask_dir = src / "Mask_images"
    seen: dict[str, dict[bytes, Path]] = {}
    regions: dict[Path, dict[str, list[int]]] = {}
    groups: dict[Path, dict[str, str]] = {}  # training tiles that share pixels
    for strip in progress_bar(strips, desc="AITEX import", unit="strip", disable=not progress):
        c = counts[f"fabric{strip.fabric}"]
        image = read_grey(strip.path)
        if image is None:
            c["skipped"] += 1
            continue
        if image.shape[0] < tile or image.shape[1] < tile:
            _warn(f"AITEX: strip {strip.path} is {image.shape}, smaller than a tile; skipped")
            c["skipped"] += 1
            continue
        digest = hashlib.sha1(image.tobytes() + repr(image.shape).encode()).digest()
        first = seen.setdefault(strip.fabric, {}).setdefault(digest, strip.path)
        if first != strip.path:
            # A copied strip would otherwise sit in train and test at once.
            _warn(f"AITEX: strip {strip.path} duplicates {first}; skipped")
            c["skipped"] += 1
            continue
        mask = None
        if strip.defect_code is not None:
            mask = load_mask(mask_dir, strip.path, image.shape)
            if mask is None:
                c["skipped"] += 1
                continue

        category = dst / f"fabric{strip.fabric}"
        # the tracker once per strip, for the grid's fabric columns and the edge tiles alike
        extents = [
            Extent(r, r + tile, *block_extent(image[r : r + tile]))
            for r in range(0, image.shape[0] // tile * tile, tile)
        ]
        fabric = grid_fabric_columns(extents, image.shape[1], tile)
        kept: dict[str, tuple[int, int]] = {}  # the training grid tiles of this strip
        for tag, r, col in _tile_grid(image.shape, tile):
            name = f"{strip.path.stem}_{tag}"
            rows, cols = slice(r * tile, (r + 1) * tile), slice(col * tile, (col + 1) * tile)
            piece, region = image[rows, cols], fabric.get((r, col))
            if mask is not None and mask[rows, cols].any():
                defect = defect_name(strip.defect_code)
                relative = Path("test") / defect / f"{name}.png"
                tile_mask = mask[rows, cols].astype(np.uint8) * 255
                _save_png(tile_mask, category / "ground_truth" / defect / f"{name}_mask.png")
                c["test_defect"] += 1
            elif (mask is None or defect_strip_good) and not is_margin_tile(piece, region):
                relative = Path(strip.split) / "good" / f"{name}.png"
                c[f"{strip.split}_good"] += 1
                kept[tag] = (r, col)
            else:
                continue
            _save_png(piece, category / relative)
            if region is not None:
                regions.setdefault(category, {})[relative.as_posix()] = list(region)
        if strip.split == "train" and mask is None:
            across = tiles_across_the_edge(image, extents, tile) if edge_tiles else []
            starting = (
                [(tag, piece, None) for tag, piece in tiles_from_the_edges(image, extents, tile)]
                if edge_start_tiles
                else []
            )
            for tag, piece, region in across + starting:
                relative = Path("train") / "good" / f"{strip.path.stem}_{tag}.png"
                _save_png(piece, category / relative)
                if region is not None:
                    regions.setdefault(category, {})[relative.as_posix()] = list(region)
                c["train_good"] += 1
            extra = [tag for tag, *_ in across + starting]
            for tag, group in overlap_groups(strip.path.stem, kept, extra).items():
                groups.setdefault(category, {})[f"train/good/{strip.path.stem}_{tag}.png"] = group
    for name, found_in in ((REGIONS_FILE, regions), (GROUPS_FILE, groups)):
        for category, found in found_in.items():
            (category / name).write_text(json.dumps(found, indent=0, sort_keys=True) + "\n")
    return counts
