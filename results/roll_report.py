"""`rollscan report ROLL --out DIR`: one roll as a self-contained HTML page.

`DIR/index.html` shows the roll's facts, its grade and how it was computed, the roll map (the
whole image downsampled, the roll's length running left → right in metres, defects outlined
and numbered, the fabric's measured edges drawn) and the defect table with two crops per defect: the image around the defect and
its ¼-resolution score map. Images are PNGs beside the page (`map.png`, `crops/`), referenced
by relative paths, so the folder can be copied or zipped as it is.

The database is read first into plain values (`load_report_data`), then the images are
rendered without a transaction open (`render_report`). Crops read only the chunks they need;
only the map reads the whole image, block by block (`RollArrays.overview`). Every text from
the database or the manifest is HTML-escaped.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw
from sqlalchemy import select
from sqlalchemy.orm import Session

from results.defect_tables import format_value, roll_defects, why_unscored
from results.grade_store import SYSTEM
from results.grading import decisive_text
from results.roll_map import MAX_LABELS, draw_roll_map
from storage.fabric_extents import unseen_mm
from storage.objectstore import ObjectNotFound, ObjectStore
from storage.schema import FabricExtent, Grade, Model, Roll, current_run
from storage.zarr_rolls import SCORE_SCALE, RollArrays, open_roll

MAX_CROPS = 200  # defects beyond this get a table row but no crops
# defects beyond this get no table row: a roll that scores like no fabric the model knows has
# hundreds of thousands of specks, and its page was 76 MB, which no browser shows
MAX_TABLE_ROWS = 2000
CROP_PX = 280  # a crop's long side on the page (px), at most 4× the pixels read
CROP_MIN_PX = 48  # nor its short side below this
CROP_MARGIN_PX = 64  # image pixels around the defect's bbox, at least
CROP_KEEP_ROWS = 1024  # a longer crop keeps every k-th row (a long streak is not read whole)
LISTED = 20  # ignored defects and capped yards named in the grade table; the rest counted


@dataclass
class ReportData:
    """What the HTML report of a roll shows, read from the database in one session: the roll, its
    current run, defects, grade, threshold and measured fabric edges."""

    roll: dict[str, Any]
    run: dict[str, Any] | None = None
    defects: list[dict[str, Any]] = field(default_factory=list)
    grade: dict[str, Any] | None = None
    threshold: float | None = None
    extents: list[dict[str, Any]] = field(default_factory=list)  # the fabric's measured edges
    unseen_mm: float = 0.0  # the length not inspected (no fabric seen): `unseen_mm`
    unscored: str | None = None  # why no defects are shown (`unscored_reason`), if so
    zone: tzinfo | None = None  # the site's (ROLLSCAN_TIMEZONE) for dates; None: the process's


def _row(obj: Any) -> dict[str, Any]:
    """An ORM row's columns as a plain dict (readable after the session is gone)."""
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}


def load_report_data(session: Session, roll_id: str, zone: tzinfo | None = None) -> ReportData:
    """Everything the page shows from the database, its dates to be shown in `zone`; ValueError
    for an unknown roll."""
    roll = session.get(Roll, roll_id)
    if roll is None:
        raise ValueError(f"unknown roll {roll_id!r}")
    data = ReportData(_row(roll), zone=zone)
    data.extents = [
        _row(x)
        for x in session.scalars(
            select(FabricExtent)
            .where(FabricExtent.roll_id == roll_id)
            .order_by(FabricExtent.row_start)
        )
    ]
    data.unseen_mm = unseen_mm(session, roll_id)
    run = current_run(session, roll_id)
    data.unscored = why_unscored(roll, run)
    if run is not None:
        data.run = _row(run)
    if data.unscored is not None:  # a failed current run's defects may read replaced pixels
        return data
    data.defects = roll_defects(session, roll_id)
    model = session.get(Model, run.model_version)
    # the run's own record (`ROLLSCAN_ROLL_THRESHOLD=max` may have raised it); runs finalized
    # before it was recorded applied the model's
    data.threshold = run.threshold if run.threshold is not None else (
        model.threshold if model is not None else None
    )  # fmt: skip
    grade = session.scalar(select(Grade).where(Grade.run_id == run.id, Grade.system == SYSTEM))
    if grade is not None:
        data.grade = _row(grade)
    return data


def write_roll_report(
    session: Session,
    store: ObjectStore,
    roll_id: str,
    out_dir: str | Path,
    *,
    max_crops: int = MAX_CROPS,
) -> Path:
    """Write `out_dir/index.html` and its images for a roll's current run; return the page."""
    return render_report(load_report_data(session, roll_id), store, out_dir, max_crops=max_crops)


# ---------------------------------------------------------------------------------- images


def _to_pil(pixels: np.ndarray) -> Image.Image:
    """(H, W, C) uint8, C 1 or 3, as an RGB image."""
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels[:, :, :3])
    return image.convert("RGB")


def _read_crop(roll: RollArrays, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Image rows [r0, r1) × columns [c0, c1); a long crop keeps every k-th row only, and only
    the chunks holding the kept rows' columns are read (a 50 m streak is not read whole)."""
    step = max(1, math.ceil((r1 - r0) / CROP_KEEP_ROWS))
    return roll.read_rows(r0, r1, step, slice(c0, c1))


def _crops(
    roll: RollArrays, data: ReportData, d: dict[str, Any], vmax: float, out: Path
) -> tuple[str | None, str | None]:
    """Write a defect's image and score crops (along → left to right); their paths in `out`."""
    ppx, ppy = data.roll["px_per_mm_x"], data.roll["px_per_mm_y"]
    length = int(data.roll["rows_ingested"])
    # a box's edges are whole pixels in mm: rounded back, not truncated (3603.9999 → 3604)
    r0, r1 = round(d["y0_mm"] * ppy), round(d["y1_mm"] * ppy)
    c0, c1 = round(d["x0_mm"] * ppx), round(d["x1_mm"] * ppx)
    mr, mc = max(CROP_MARGIN_PX, (r1 - r0) // 2), max(CROP_MARGIN_PX, (c1 - c0) // 2)
    # on the score map's ¼-res cells, so that the heat map lies under the outline it is drawn with
    s = SCORE_SCALE
    lo, hi = max(0, r0 - mr) // s * s, min(length, -(-(r1 + mr) // s) * s)
    left, right = max(0, c0 - mc) // s * s, min(roll.width, -(-(c1 + mc) // s) * s)
    if lo >= hi or left >= right:
        return None, None
    image_src, score_src = (f"crops/d{int(d['defect_no']):05d}_{k}.png" for k in ("image", "score"))
    pixels = _read_crop(roll, lo, hi, left, right)
    image = _to_pil(pixels.transpose(1, 0, 2))  # across rows, along columns
    scale = min(CROP_PX / max(hi - lo, right - left), 4.0)
    # a long thin crop is stretched across to stay visible (at least CROP_MIN_PX)
    size = (
        max(CROP_MIN_PX, round((hi - lo) * scale)),
        max(CROP_MIN_PX, round((right - left) * scale)),
    )
    sx, sy = size[0] / (hi - lo), size[1] / (right - left)
    image = image.resize(size, Image.Resampling.LANCZOS)
    box = ((r0 - lo) * sx, (c0 - left) * sy, (r1 - lo) * sx, (c1 - left) * sy)
    _outline(image, box).save(out / image_src)
    try:
        q_lo, q_hi = lo // SCORE_SCALE, -(-hi // SCORE_SCALE)
        scores = roll.read_scores(data.run["model_version"], q_lo, q_hi)
    except (ObjectNotFound, ValueError):  # no score map (yet)
        return image_src, None
    scores = scores[:, left // SCORE_SCALE : -(-right // SCORE_SCALE)].astype(np.float32)
    rgba = matplotlib.colormaps["inferno"](np.clip(scores.T / vmax, 0.0, 1.0), bytes=True)
    heat = Image.fromarray(rgba[:, :, :3]).resize(size, Image.Resampling.NEAREST)
    _outline(heat, box, "#36d6ff").save(out / score_src)
    return image_src, score_src


def _outline(image: Image.Image, box: tuple[float, ...], color: str = "#ff2a2a") -> Image.Image:
    x0, y0, x1, y1 = box
    ImageDraw.Draw(image).rectangle((x0 - 2, y0 - 2, x1 + 1, y1 + 1), outline=color, width=2)
    return image


# ---------------------------------------------------------------------------------- page

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 12px} h2{font-size:17px;margin:24px 0 8px}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
th{background:#f0f0f0;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.facts th{width:170px} .grade{font-size:26px;font-weight:bold} .note{color:#666}
img.map{max-width:100%;border:1px solid #999} img.crop{display:block;border:1px solid #999}
"""


def e(value: Any) -> str:
    """Text for the page: escaped, None as '–'."""
    return "–" if value is None else html.escape(str(value), quote=True)


def _num(value: Any, spec: str) -> str:
    return "–" if value is None else e(format(value, spec))


def _when(value: Any, zone: tzinfo | None) -> str:
    return "–" if value is None else e(format_value(value, zone=zone))  # as `rollscan rolls`


def _table(rows: list[tuple[str, str] | None]) -> str:
    """A two-column table; both sides are HTML already (escaped by the caller)."""
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in filter(None, rows))
    return f'<table class="facts">{body}</table>'


def _facts_html(data: ReportData) -> str:
    r, run = data.roll, data.run or {}
    run_text = f"{e(run.get('id'))} ({e(run.get('purpose'))}, {e(run.get('status'))})"
    rows = [
        ("roll", e(r["id"])), ("fabric type", e(r["fabric_type"])), ("status", e(r["status"])),
        # an open or stalled roll's reason says why it waits, not that it failed
        (("failure" if r["status"] == "failed" else "waiting"), e(r["failure_reason"]))
        if r["failure_reason"] else None,
        ("length", f"{_num(r['length_m'], '.2f')} m"), ("width", f"{_num(r['width_mm'], '.1f')} mm"),
        ("resolution", f"{_num(r['px_per_mm_x'], 'g')} × {_num(r['px_per_mm_y'], 'g')} px/mm "
                       "(across × along)"),
        _width_row(data.extents, data.unseen_mm),
        ("frames", e(r["frames_total"])), ("registered", _when(r["created_at"], data.zone)),
        ("completed", _when(r["completed_at"], data.zone)), ("model version", e(run.get("model_version"))),
        ("run", run_text if run else "no run yet"), ("run finished", _when(run.get("finished_at"), data.zone)),
        _threshold_row(data) if run and not data.unscored else None,
    ]  # fmt: skip
    for key, value in sorted((r["meta"] or {}).items()):
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        rows.append((f"meta: {e(key)}", e(text)))
    return _table(rows)


def _threshold_row(data: ReportData) -> tuple[str, str]:
    own = (data.run or {}).get("roll_threshold")
    text = f"{_num(data.threshold, '.4g')} (a score above it is a defect pixel)"
    if own is not None:
        text += f"; the roll's own estimate {_num(own, '.4g')}"
    return "threshold", text


def _width_row(extents: list[dict[str, Any]], unseen_mm: float) -> tuple[str, str]:
    fabric = [x for x in extents if x["width_mm"] > 0]
    # dark or blank frames: nothing there is a defect, and nothing there was inspected
    note = (f"; not inspected over {unseen_mm / 1000:.2f} m (no fabric seen: dark or blank "
            "frames)" if unseen_mm else "")  # fmt: skip
    if not fabric:
        return ("measured width", ("not measured" if not extents else "no fabric seen") + note)
    widths = np.array([x["width_mm"] for x in fabric])
    left = np.median([x["left_mm"] for x in fabric])
    right = np.median([x["right_mm"] for x in fabric])
    return ("measured width", f"{np.median(widths):.1f} mm (min {widths.min():.1f}, max "
            f"{widths.max():.1f}; edges at {left:.1f} and {right:.1f} mm, drawn in cyan){note}")  # fmt: skip


def _listed(items: list[str], sep: str, shown: int = LISTED) -> str:
    # a 1,000 m roll capped some 550 yards: the whole list filled the first screen
    if len(items) <= shown:
        return sep.join(items) or "none"
    return f"{len(items)}: {sep.join(items[:shown])}{sep}… and {len(items) - shown} more"


def _grade_html(data: ReportData) -> str:
    g = data.grade
    if g is None:
        run = data.run
        why = (" (no run of it has finished)" if run is None
               else "" if run["status"] == "done" else f" (its current run is {e(run['status'])})")  # fmt: skip
        return f'<p class="note">Not graded yet{why}.</p>'
    d = g["details"] or {}
    nos = [x["defect_no"] for x in data.defects]
    ignored = [f"no. {nos[i]}" for i in d.get("defects_ignored_at_selvage", []) if i < len(nos)]
    capped = [f"yard {c['yard']}–{c['yard'] + 1}: {c['points']} → {c['counted']} points"
              for c in d.get("yards_capped", [])]  # fmt: skip
    rules = ", ".join(f"{e(name)} ≤ {e(limit)}" for name, limit in d.get("acceptance", []))
    yards, width = _num(g["yards"], ".2f"), _num(g["width_in"], ".2f")
    rows = [
        ("grade", f'<span class="grade">{e(g["grade"])}</span>'),
        ("points", f"{e(g['points'])} (before the {e(d.get('max_points_per_yard'))}-points-a-yard "
                   f"cap: {e(d.get('points_before_cap'))})"),
        ("points / 100 yd²", e(decisive_text(g["points_per_100yd2"],
                                             [limit for _, limit in d.get("acceptance", [])]))),
        ("computed as", f"{e(d.get('formula'))} = {e(g['points'])} × 3600 / ({yards} × {width})"),
        ("yards inspected", yards + (f" (not inspected: {d['unseen_m']:.2f} m of the roll, no "
                                     "fabric seen)" if d.get("unseen_m") else "")),
        ("cuttable width", f"{width} in (roll {_num(d.get('roll_width_in'), '.2f')} in less 2 × "
                           f"{e(d.get('selvage_margin_in'))} in selvage)"),
        ("ignored at the selvage", e(_listed(ignored, ", "))),
        ("capped yards", e(_listed(capped, "; "))),
        ("limits", f"{rules}, else {e(d.get('reject_name'))} (points / 100 yd²)"
                   + (f" — the rules' {e(d['rules_section'])} section" if d.get("rules_section") else "")),
        ("graded", f"{_when(g['graded_at'], data.zone)}, ASTM D5430 four-point system"),
    ]  # fmt: skip
    return _table(rows)


def _defects_html(
    data: ReportData, crops: dict[int, tuple[str | None, str | None]], max_crops: int, vmax: float
) -> str:
    if data.unscored is not None:  # not "no defects": a reader would take it for a flawless roll
        return f'<p class="note">No defects to show: {e(data.unscored)}.</p>'
    if not data.defects:
        return '<p class="note">No defects in the current run.</p>'
    n = len(data.defects)
    note = (
        f"Crops: the image around each defect (red box: its bounding box) and its "
        f"¼-resolution score map (0 black … {vmax:.3g} yellow; threshold "
        f"{_num(data.threshold, '.3g')}); the roll's length runs left → right."
    )
    if n > max_crops:
        note += f" Only the first {max_crops} of {n} defects have crops."
    head = (
        "<tr><th>no</th><th>x mm</th><th>y mm</th><th>length mm</th><th>width mm</th>"
        "<th>area mm²</th><th>max score</th><th>mean score</th><th>points</th>"
        "<th>image</th><th>score map</th></tr>"
    )
    graded = data.grade is not None
    rows = []
    for d in data.defects[:MAX_TABLE_ROWS]:
        cells = [f'<td class="n">{e(d["defect_no"])}</td>']
        cells += [
            f'<td class="n">{_num(d[k], ".1f")}</td>'
            for k in ("x_mm", "y_mm", "length_mm", "width_mm", "area_mm2")
        ]
        cells += [f'<td class="n">{_num(d[k], ".3f")}</td>' for k in ("max_score", "mean_score")]
        points = "selvage" if graded and d["points"] is None else e(d["points"])
        cells.append(f'<td class="n">{points}</td>')
        for src in crops.get(d["defect_no"], (None, None)):
            img = f'<img class="crop" src="{e(src)}" alt="defect {e(d["defect_no"])}">'
            cells.append(f"<td>{img if src else '–'}</td>")
        rows.append(f'<tr id="d{e(d["defect_no"])}">{"".join(cells)}</tr>')
    more = ""
    if n > MAX_TABLE_ROWS:
        more = (
            f'<p class="note">… and {n - MAX_TABLE_ROWS} more defects, not listed here: '
            f"<code>rollscan defects {e(data.roll['id'])} --csv</code> lists all {n}.</p>"
        )
    return f'<p class="note">{e(note)}</p><table>{head}{"".join(rows)}</table>{more}'


def render_report(
    data: ReportData, store: ObjectStore, out_dir: str | Path, *, max_crops: int = MAX_CROPS
) -> Path:
    """Write the page and its images for `data` (from `load_report_data`); return the page.

    Written into a folder beside them first, then renamed into place, the page last: a full
    disk or an interrupt leaves the report that was there whole (written in place, a report
    written again left a 0-byte page, its crops deleted first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        _render(data, store, staging, max_crops)
        (out / "crops").mkdir(exist_ok=True)
        written = {path.name for path in (staging / "crops").iterdir()}
        for name in sorted(written):
            (staging / "crops" / name).replace(out / "crops" / name)
        if (staging / "map.png").exists():
            (staging / "map.png").replace(out / "map.png")
        (staging / "index.html").replace(out / "index.html")
        for old in (out / "crops").glob("d*_*.png"):  # a previous report's crops
            if old.name not in written:
                old.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "index.html"


def _render(data: ReportData, store: ObjectStore, out: Path, max_crops: int) -> None:
    (out / "crops").mkdir()
    roll = None
    if data.roll["rows_ingested"]:
        with contextlib.suppress(ObjectNotFound):
            roll = open_roll(store, data.roll["id"], read_only=True)
    map_html = '<p class="note">No image stored for this roll yet.</p>'
    crops: dict[int, tuple[str | None, str | None]] = {}
    scores = [d["max_score"] for d in data.defects] + [2 * (data.threshold or 0.0)]
    vmax = max(max(scores), 1e-6)
    if roll is not None:
        r = data.roll
        ppmm = (r["px_per_mm_x"], r["px_per_mm_y"])
        draw_roll_map(
            roll, int(r["rows_ingested"]), ppmm, data.defects, data.extents, out / "map.png"
        )
        map_html = (
            '<img class="map" src="map.png" alt="roll map"><p class="note">The whole '
            "roll downsampled: along the roll left → right (metres), across top → "
            "bottom (mm from the first column); defects outlined and numbered (outlined only "
            f"where a segment holds over {MAX_LABELS}), the fabric's measured edges in cyan.</p>"
        )
        if data.unscored is None:
            for d in data.defects[:max_crops]:
                crops[d["defect_no"]] = _crops(roll, data, d, vmax, out)
    r = data.roll
    title = f"Roll {e(r['id'])}"
    # not "0 defects" for a roll with none to show: a reader would take it for a flawless roll
    count = "no defects to show" if data.unscored else f"{len(data.defects)} defects"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style></head>
<body>
<h1>{title} <span class="note">{e(r["fabric_type"])}, {count}</span></h1>
<h2>Roll</h2>{_facts_html(data)}
<h2>Grade</h2>{_grade_html(data)}
<h2>Roll map</h2>{map_html}
<h2>Defects{"" if data.unscored else f" ({len(data.defects)})"}</h2>{_defects_html(data, crops, max_crops, vmax)}
</body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
