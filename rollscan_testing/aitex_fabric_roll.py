"""A roll of real fabric: one AITEX fabric's strips stacked along the length, defects at known rows.

The roll is the fabric's good strips that do not train (per roll folder, in name order, the
first `n_train_strips` train — the same split as `distill.data.aitex.import_aitex`), with the
fabric's defect strips interleaved evenly among them; every strip is 256 rows and the full
width, so the roll is a synthetic length of real texture. The planted defects are the
physical flaws of each defect strip's mask (union of `_mask`, `_mask1`, …; > 127), shifted to
roll rows: its 8-connected components merged by finalize's rule for found defects
(`worker.components.merge_groups`: boxes within `merge_gap_mm` across and along are one flaw),
so that a crease drawn as a dozen specks counts once, as a mill counts it. Written in the
scanner's format (`manifest.json`, `frames/000001.tif` …) plus `planted.json` and
`strips.json` (which strip lies at which rows, with its mask's flaws and components).

AITEX gives no scale: the roll is written at a nominal `px_per_mm` (default 10), so every mm
and m figure derived from it (positions, defect lengths, roll length, false defects per metre,
the grade) is nominal too.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from sqlalchemy import select

from distill.data.aitex import STRIP_STEM, defect_name, load_mask, read_grey
from results.grade_store import SYSTEM, grade_run
from rollscan_testing.aitex_strip_rolls import strip_levels
from rollscan_testing.roll_matching import (
    AITEX_PX_PER_MM,
    match_planted,
    off_fabric,
    pixel_matches,
)
from rollscan_testing.synthetic_roll import PlantedDefect
from scheduler.submit import submit
from storage.fabric_extents import roll_extents
from storage.registry import activate_model, active_model, checkpoint_key, register_model
from storage.schema import Defect, Grade, Model, Roll, Run
from storage.settings import MERGE_GAP_MM
from storage.zarr_rolls import open_roll
from worker.band_scores import SCORE_SCALE
from worker.components import merge_groups
from worker.context import WorkerContext
from worker.fabric_mask import Extent, quarter_fabric_mask
from worker.task_metrics import tiles_scored_total

N_TRAIN_STRIPS = 15
BLANK = 255  # the strips' margins are white: a narrower strip is padded with it
REPORT_KEYS = ("planted", "planted_components", "matched", "recall", "false_defects",
               "false_per_m", "roll_length_m", "grade", "tiles_per_s", "matched_px",
               "false_defects_px", "off_fabric", "width_source", "graded_width_mm",
               "extents", "threshold", "model_threshold", "roll_threshold",
               "strip_levels", "false_at_seam", "false_at_selvage", "defects")  # fmt: skip
_FOUND = ("defect_no", "x_mm", "y_mm", "x0_mm", "y0_mm", "x1_mm", "y1_mm", "length_mm", "max_score")


@dataclass
class PlantedFlaw(PlantedDefect):
    """A planted physical flaw: `components` connected components of its strip's mask."""

    components: int = 1


def mask_flaws(
    mask: np.ndarray, px_per_mm: float, merge_gap_mm: float | None, kind: str, row0: int = 0
) -> list[PlantedFlaw]:
    """The flaws of one strip's boolean mask, moved down by `row0`: its 8-connected components,
    merged by `merge_groups` on their boxes in mm (None: each component is a flaw)."""
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, 2))
    if not n:
        return []
    slices = ndimage.find_objects(labels)
    box = np.array([(s.start, c.start, s.stop, c.stop) for s, c in slices], dtype=np.int64)
    group = np.arange(n)
    if merge_gap_mm is not None:
        group = merge_groups(box[:, [1, 0, 3, 2]] / px_per_mm, merge_gap_mm)
    ys, xs = np.nonzero(labels)
    flaw_of_pixel = group[labels[ys, xs] - 1]
    flaws = []
    for g in range(int(group.max()) + 1):
        members = box[group == g]
        y0, x0 = members[:, :2].min(axis=0)
        y1, x1 = members[:, 2:].max(axis=0)
        y0, y1 = y0 + row0, y1 + row0
        inside = flaw_of_pixel == g
        pixels = list(zip((ys[inside] + row0).tolist(), xs[inside].tolist(), strict=True))
        flaws.append(PlantedFlaw(
            kind, (int(y0 + y1) // 2, int(x0 + x1) // 2),
            (int(y0), int(x0), int(y1), int(x1)), pixels, components=len(members),
        ))  # fmt: skip
    return flaws


def _fabric_code(fabric: str) -> str:
    code = str(fabric).removeprefix("fabric")
    if len(code) != 2 or not code.isdigit():
        raise ValueError(f"fabric codes look like '03' or 'fabric03', got {fabric!r}")
    return code


def _strips(folder: Path, code: str) -> list[tuple[Path, str]]:
    """(path, defect code) of the fabric's well-named strips in `folder`, in name order."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        m = STRIP_STEM.match(path.stem) if path.suffix.lower() == ".png" else None
        if m and m[3] == code:
            found.append((path, m[2]))
    return found


def split_good_strips(
    src: str | Path, fabric: str, n_train_strips: int = N_TRAIN_STRIPS
) -> tuple[list[Path], list[Path]]:
    """(training strips, roll strips) of the fabric: per roll folder, the first
    `n_train_strips` good strips in name order train, the rest go into the roll."""
    code, train, rest = _fabric_code(fabric), [], []
    root = Path(src) / "NoDefect_images"
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        paths = [p for p, _ in _strips(folder, code)]
        train += paths[:n_train_strips]
        rest += paths[n_train_strips:]
    return train, rest


def _interleave(good: list, defects: list) -> list:
    """Defect items spread evenly among the good ones; a good one first and last when possible."""
    keyed = [(i / max(len(good) - 1, 1), 0, g) for i, g in enumerate(good)]
    keyed += [((j + 0.5) / len(defects), 1, d) for j, d in enumerate(defects)]
    return [item for *_, item in sorted(keyed, key=lambda k: k[:2])]


def _digest(image: np.ndarray) -> bytes:
    return hashlib.sha1(image.tobytes() + repr(image.shape).encode()).digest()


def _fit_width(image: np.ndarray, width: int, fill: int | bool = BLANK) -> np.ndarray:
    if image.shape[1] >= width:
        return image[:, :width]
    return np.pad(image, ((0, 0), (0, width - image.shape[1])), constant_values=fill)


def build_aitex_roll(
    src: str | Path,
    fabric: str,
    dst: str | Path,
    roll_id: str,
    *,
    strips_per_frame: int = 4,
    px_per_mm: float = AITEX_PX_PER_MM,
    n_train_strips: int = N_TRAIN_STRIPS,
    fabric_type: str | None = None,
    merge_gap_mm: float | None = MERGE_GAP_MM,
) -> tuple[dict, list[PlantedFlaw]]:
    """Write the roll (see the module docstring) to `dst`; returns (manifest, planted).

    `merge_gap_mm` must be the finalize setting (`ROLLSCAN_MERGE_GAP_MM`) the roll will be
    scored under, so that planted and found defects are counted by one rule; None plants
    every mask component as a defect of its own.

    The roll's width is that of its first good strip; other strips are cut or padded with
    white on the right (masks likewise). Good strips that duplicate a training strip or an
    earlier roll strip pixel for pixel, and defect strips without a usable mask, are left out
    (the latter with an `AitexImportWarning`). `fabric_type` defaults to ``aitex-FF``.
    """
    src, dst, code = Path(src), Path(dst), _fabric_code(fabric)
    if strips_per_frame < 1:
        raise ValueError(f"strips_per_frame must be at least 1, got {strips_per_frame}")
    train, roll_good = split_good_strips(src, code, n_train_strips)
    seen = {_digest(image) for path in train if (image := read_grey(path)) is not None}
    good: list[tuple[Path, np.ndarray]] = []
    for path in roll_good:
        image = read_grey(path)
        if image is not None and (digest := _digest(image)) not in seen:
            seen.add(digest)
            good.append((path, image))
    defects: list[tuple[Path, np.ndarray, np.ndarray, str]] = []
    for path, defect in _strips(src / "Defect_images", code):
        image = read_grey(path)
        mask = None if image is None else load_mask(src / "Mask_images", path, image.shape)
        if mask is not None:
            defects.append((path, image, mask, defect))
    if not defects:
        raise ValueError(f"AITEX fabric {code} under {src} has no usable defect strip")
    width = (good[0][1] if good else defects[0][1]).shape[1]

    rows, blocks, layout, planted = 0, [], [], []
    for item in _interleave(good, defects):
        path, image = item[0], _fit_width(item[1], width)
        entry = {"strip": path.name, "row": rows, "rows": image.shape[0], "defect": None}
        if len(item) == 4:
            mask = _fit_width(item[2], width, fill=False)
            entry["defect"] = item[3]
            flaws = mask_flaws(mask, px_per_mm, merge_gap_mm, defect_name(item[3]), rows)
            entry["flaws"] = len(flaws)
            entry["components"] = sum(f.components for f in flaws)
            planted += flaws
        layout.append(entry)
        blocks.append(image)
        rows += image.shape[0]

    (dst / "frames").mkdir(parents=True, exist_ok=True)
    frames = -(-len(blocks) // strips_per_frame)
    for k in range(frames):
        frame = np.concatenate(blocks[k * strips_per_frame : (k + 1) * strips_per_frame])
        tifffile.imwrite(dst / "frames" / f"{k + 1:06d}.tif", frame, compression="zlib")
    manifest = {
        "roll_id": roll_id,
        "fabric_type": fabric_type or f"aitex-{code}",
        "width_mm": width / px_per_mm,
        "px_per_mm": px_per_mm,
        "frames": frames,
        "complete": True,
        "meta": {"source": "AITEX", "fabric": code, "scale": "nominal"},
    }
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (dst / "strips.json").write_text(json.dumps(layout, indent=1) + "\n")
    (dst / "planted.json").write_text(json.dumps(
        [{k: v for k, v in asdict(p).items() if k != "pixels"} for p in planted], indent=1
    ) + "\n")  # fmt: skip
    return manifest, planted


def use_model(ctx: WorkerContext, checkpoint: str | Path, fabric_type: str) -> tuple[Model, str]:
    """Register and activate the checkpoint; returns (model, fabric type to submit under).

    A checkpoint already registered for another fabric type keeps it (the registry ties a
    checkpoint to one fabric type), and the roll is then submitted under that type. A model
    the database knows but `ctx.store` lacks (a benchmark's fresh temporary store against a
    lasting database) has its bytes put there: the store is content-addressed."""
    data = Path(checkpoint).read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    with ctx.session() as session:
        model = session.scalar(select(Model).where(Model.sha256 == sha256))
        if model is None:
            model, _ = register_model(session, ctx.store, checkpoint, fabric_type=fabric_type)
        elif not ctx.store.exists(checkpoint_key(sha256)):
            ctx.store.put(checkpoint_key(sha256), data)
        activate_model(session, model.version)
        return model, model.fabric_type or fabric_type


def report(result: dict) -> dict:
    """The JSON report: REPORT_KEYS of `run_aitex_roll`'s result, in that order."""
    return {k: result[k] for k in REPORT_KEYS}


def run_aitex_roll(ctx: WorkerContext, roll_dir: str | Path, planted: list[PlantedDefect]) -> dict:
    """Submit the roll in this process (`ctx.enqueue` must be a wired `InlineEnqueuer`), grade
    it, and return the figures: REPORT_KEYS, plus `found`, `tiles`, `seconds`, `points_per_100yd2`,
    `model_version`, `defects` (the found rows), `matches` (planted index → found index), and
    `matched_px`, `false_defects_px` by `pixel_matches`' stricter rule (at the threshold the
    run applied: `threshold`, from `model_threshold` and the roll's own `roll_threshold`).
    `planted` counts physical flaws, `planted_components` the mask components they were merged
    from."""
    manifest = json.loads((Path(roll_dir) / "manifest.json").read_text())
    roll_id, px_per_mm = manifest["roll_id"], float(manifest["px_per_mm"])
    with ctx.session() as session:
        model = active_model(session, manifest["fabric_type"])
        if model is None:
            raise RuntimeError(f"no active model for fabric type {manifest['fabric_type']}")
    ctx.detector(model)  # loaded outside the timing, as a warm worker would have it
    started, tiles_before = time.perf_counter(), tiles_scored_total()
    submit(ctx, str(roll_dir))
    ctx.enqueue.drain()
    seconds = time.perf_counter() - started
    with ctx.session() as session:
        roll = session.get(Roll, roll_id)
        run = session.scalar(select(Run).where(Run.roll_id == roll_id, Run.is_current))
        if roll is None or roll.status != "done" or run is None:
            raise RuntimeError(f"roll {roll_id} ended {roll and roll.status}: "
                               f"{roll and roll.failure_reason}")  # fmt: skip
        tiles = tiles_scored_total() - tiles_before
        found = [
            {c: getattr(d, c) for c in _FOUND}
            for d in session.scalars(
                select(Defect).where(Defect.run_id == run.id).order_by(Defect.defect_no)
            )
        ]
        graded = grade_run(session, run.id)
        details = session.get(Grade, (roll_id, run.id, SYSTEM)).details
        length_m, version, rows = roll.length_m, run.model_version, roll.rows_ingested
        threshold, own = run.threshold, run.roll_threshold
        extents = [Extent(*e) for e in roll_extents(session, roll_id)]
    matched, false_found = match_planted(planted, found, px_per_mm)
    strips = json.loads((Path(roll_dir) / "strips.json").read_text())
    block = max(1, model.tile // SCORE_SCALE)
    seam_mm = block // 4 * SCORE_SCALE / px_per_mm  # as `strip_levels`' margin
    seams = [s["row"] / px_per_mm for s in strips[1:]]
    at_seam = sum(
        any(found[j]["y0_mm"] - seam_mm <= y <= found[j]["y1_mm"] + seam_mm for y in seams)
        for j in false_found
    )
    scores = open_roll(ctx.store, roll_id, read_only=True).read_scores(
        version, 0, -(-rows // SCORE_SCALE)
    )
    # finalize's view of the map: nothing off the fabric
    fabric = quarter_fabric_mask(extents, 0, scores.shape[0], scores.shape[1], SCORE_SCALE)
    scores = np.where(fabric, scores, -np.inf)
    found_px, false_px = pixel_matches(scores, threshold, planted, px_per_mm=px_per_mm,
                                       merge_gap_mm=ctx.settings.merge_gap_mm)  # fmt: skip
    return {
        "planted": len(planted),
        "planted_components": sum(getattr(p, "components", 1) for p in planted),
        "matched": len(matched),
        "recall": len(matched) / len(planted) if planted else None,
        "false_defects": len(false_found),
        "false_per_m": len(false_found) / length_m,
        "roll_length_m": length_m,
        "grade": graded.grade,
        "tiles_per_s": tiles / seconds,
        "found": len(found),
        "tiles": tiles,
        "seconds": seconds,
        "points_per_100yd2": graded.points_per_100yd2,
        "model_version": version,
        "defects": found,
        "matches": matched,
        "matched_px": len(found_px),
        "false_defects_px": false_px,
        "off_fabric": off_fabric(found, extents, px_per_mm, SCORE_SCALE / px_per_mm),
        "width_source": details.get("width_source"),
        "graded_width_mm": details["roll_width_in"] * 25.4,
        "px_per_mm": px_per_mm,
        "extents": [[e.row_start, e.row_stop, e.left, e.right] for e in extents],
        "threshold": threshold,
        "model_threshold": model.threshold,
        "strip_levels": strip_levels(scores, strips, planted, block),
        "false_at_seam": at_seam,
        # the grading's own rule (indices in defect_no order, as `found`)
        "false_at_selvage": len(set(false_found) & set(details["defects_ignored_at_selvage"])),
        "roll_threshold": own,
    }
