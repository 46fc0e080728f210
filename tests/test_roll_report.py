"""Looking at results: `rollscan rolls`, `rollscan defects`, `rollscan report` on one real roll.

One small roll goes through the pipeline once per module (real PostgreSQL, a local store under
a data directory, the session's trained twill model) and is graded; the tests read it.
"""

import csv
import io
import json
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fixtures_pg import empty_tables
from PIL import Image
from sqlalchemy import select, text

from results.grade_store import grade_run
from results.roll_map import draw_roll_map, edge_lines
from results.roll_report import write_roll_report
from rollscan_testing.synthetic_roll import write_synthetic_roll
from scheduler.submit import submit
from storage.objectstore import open_object_store
from storage.registry import activate_model, register_model
from storage.schema import Defect, Roll, Run
from storage.settings import Settings
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer

ROLL = "R-report-1"
PX_PER_MM, BAND, FRAME_ROWS, FRAMES, WIDTH = 10.0, 1024, 512, 4, 768  # 2048 rows, 2 bands
PLAN = [("hole", (700, 250)), ("knot", (1500, 520))]
TABLE = (48, 704)  # the fabric's columns; a dark table beside it
EVIL = "<script>alert('x')</script> & <b>bold</b>"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def graded(_session_engine, twill_model, tmp_path_factory):
    """(ctx, data_dir, report page) of one graded roll; the tables are emptied afterwards."""
    root = tmp_path_factory.mktemp("roll-report")
    settings = Settings(band_height=BAND, data_dir=root / "data", device="cpu", batch_size=8)
    store = open_object_store(settings)  # the store the CLI builds from ROLLSCAN_DATA_DIR
    enqueuer = InlineEnqueuer()
    ctx = WorkerContext(settings, _session_engine, store, enqueuer, device="cpu", batch_size=8)
    enqueuer.ctx = ctx
    try:
        with ctx.session() as session:
            model, _ = register_model(session, store, twill_model, fabric_type="demo-twill")
            activate_model(session, model.version)
        folder = root / ROLL
        manifest, _ = write_synthetic_roll(
            folder,
            ROLL,
            frames=FRAMES,
            frame_rows=FRAME_ROWS,
            width=WIDTH,
            plan=PLAN,
            px_per_mm=PX_PER_MM,
            table=(TABLE[0], WIDTH - TABLE[1], 20),
        )
        manifest["meta"] = {**manifest["meta"], "operator": EVIL, "lot": "A&B"}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        submit(ctx, str(folder))
        ctx.enqueue.drain()
        with ctx.session() as session:
            assert session.get(Roll, ROLL).status == "done"
            grade_run(session, session.scalar(select(Run.id).where(Run.roll_id == ROLL)))
        started = time.perf_counter()
        with ctx.session() as session:
            page = write_roll_report(session, store, ROLL, root / "report")
        print(f"report written in {time.perf_counter() - started:.2f} s")
        yield ctx, root / "data", page
    finally:
        empty_tables(_session_engine)


def _defect_nos(ctx):
    with ctx.session() as session:
        return list(session.scalars(select(Defect.defect_no).order_by(Defect.defect_no)))


def test_the_page_shows_defects_grade_and_escaped_meta(graded):
    ctx, _, page = graded
    nos = _defect_nos(ctx)
    assert len(nos) >= len(PLAN)
    doc = page.read_text(encoding="utf-8")
    assert f"Roll {ROLL}" in doc and f"Defects ({len(nos)})" in doc
    assert re.findall(r'<tr id="d(\d+)">', doc) == [str(n) for n in nos]
    for no in nos:
        for kind in ("image", "score"):
            src = f"crops/d{no:05d}_{kind}.png"
            assert f'src="{src}"' in doc
            with Image.open(page.parent / src) as crop:
                assert min(crop.size) > 10 and np.asarray(crop).std() > 5
    with ctx.session() as session:
        grade = session.scalar(
            text("SELECT grade FROM roll_grades WHERE roll_id = :r"), {"r": ROLL}
        )
    assert f'<span class="grade">{grade}</span>' in doc and "Not graded yet" not in doc
    assert "points × 3600 / (yards × cuttable width in)" in doc
    measured = re.search(r"<td>(\d+\.\d) mm \(min [^<]*edges at (\d+\.\d) and (\d+\.\d) mm", doc)
    assert measured, "the measured width is not on the page"
    width, left, right = (float(v) for v in measured.groups())
    assert abs(width - (TABLE[1] - TABLE[0]) / PX_PER_MM) <= 3.2
    assert abs(left - TABLE[0] / PX_PER_MM) <= 1.6 and abs(right - TABLE[1] / PX_PER_MM) <= 1.6
    # the threshold the run applied, and the roll's own estimate, as the run recorded them
    with ctx.session() as session:
        run = session.scalar(select(Run).where(Run.roll_id == ROLL, Run.is_current))
    assert run.threshold is not None
    shown = re.search(r"<td>([-\d.e+]+) \(a score above it is a defect pixel\)(.*?)</td>", doc)
    assert shown and float(shown[1]) == pytest.approx(run.threshold, rel=1e-3)
    if run.roll_threshold is not None:
        assert f"the roll's own estimate {run.roll_threshold:.4g}" in shown[2]
    # the manifest's meta can never inject markup
    assert "<script>" not in doc and "<b>bold" not in doc
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in doc
    assert "A&amp;B" in doc
    # images are referenced relatively and exist beside the page
    for src in re.findall(r'src="([^"]+)"', doc):
        assert not src.startswith(("/", "http", "file:")) and (page.parent / src).is_file()
    with Image.open(page.parent / "map.png") as roll_map:
        assert roll_map.width > roll_map.height  # the roll's length runs left → right


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(graded, tmp_path):
    _, _, page = graded
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, fabric, score maps
    assert pixels.std() > 20
    # the map (grey fabric) and the score crops (inferno) both came through
    r, g, b = (pixels[..., k].astype(int) for k in range(3))
    assert ((r - b > 80) & (g < 120)).sum() > 500  # reds/oranges: outlines, inferno colours
    # the fabric's edges, drawn in cyan along the whole map: two long horizontal lines
    cyan = (r < 80) & (g > 150) & (b > 200)
    rows = np.flatnonzero(cyan.sum(axis=1) > 400)
    assert len(rows) >= 2 and rows.max() - rows.min() > 20, "no edge lines on the map"


def test_cli_rolls_and_defects(graded, monkeypatch, capsys, migrated_url):
    from cli.main import main

    ctx, data_dir, _ = graded
    monkeypatch.setenv("ROLLSCAN_DATABASE_URL", migrated_url)
    monkeypatch.setenv("ROLLSCAN_DATA_DIR", str(data_dir))
    nos = _defect_nos(ctx)
    assert main(["rolls"]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["roll", "fabric", "status", "length"]
    assert line.split()[:6] == [ROLL, "demo-twill", "done", "0.2", "4", str(len(nos))]
    monkeypatch.setenv("ROLLSCAN_TIMEZONE", "Asia/Tokyo")  # dates in the site's zone, named
    assert main(["rolls"]) == 0
    registered = capsys.readouterr().out.splitlines()[1]
    assert " JST" in registered
    # a date copied from the table is pasted back as it reads, its zone with it
    words = registered.split()
    completed = " ".join(words[words.index("JST") - 2 : words.index("JST") + 1])
    assert main(["rolls", "--since", completed]) == 0
    assert main(["rolls", "--since", completed.replace("JST", "PST")]) == 2
    assert "'PST' is neither the site's zone" in capsys.readouterr().err
    assert main(["rolls", "--status", "failed"]) == 0
    assert capsys.readouterr().out.strip() == "no rolls"
    assert main(["rolls", "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out.strip() == "no rolls"
    # a mill's archive is tens of thousands of rolls: the most recent, and how many are older
    with ctx.session() as session:
        for k in range(3):
            session.add(Roll(id=f"R-older-{k}", fabric_type="denim", width_mm=100.0,
                             px_per_mm_x=4.0, px_per_mm_y=4.0, status="registered",
                             created_at=datetime(2020, 1, 1 + k, tzinfo=UTC)))  # fmt: skip
    assert main(["rolls", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("… 2 older roll(s) not shown (--limit 0 lists all")
    assert [line.split()[0] for line in lines[2:]] == ["R-older-2", ROLL]
    assert main(["rolls", "--limit", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 4

    assert main(["defects", ROLL, "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["defect_no"]) for r in rows] == nos
    assert all(float(r["max_score"]) > 0 and r["model_version"] for r in rows)
    assert main(["defects", ROLL]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["no", "x", "mm"] and len(table) == 1 + len(nos)
    # graded: each defect's points, or "selvage" where the grading ignored it (never "-")
    charges = {line.split()[-1] for line in table[1:]}
    assert charges and charges <= {"1", "2", "3", "4", "selvage"}, table
    assert {r["graded"] for r in rows} == {"True"}
    assert all((r["points"] == "") == (r["yards_charged"] == "") for r in rows)
    assert main(["defects", "R-missing"]) == 2
    assert "unknown roll 'R-missing'" in capsys.readouterr().err


def test_cli_report(graded, monkeypatch, capsys, migrated_url, tmp_path):
    from cli.main import main

    ctx, data_dir, _ = graded
    monkeypatch.setenv("ROLLSCAN_DATABASE_URL", migrated_url)
    monkeypatch.setenv("ROLLSCAN_DATA_DIR", str(data_dir))
    monkeypatch.setenv("ROLLSCAN_TIMEZONE", "Asia/Tokyo")
    assert main(["report", ROLL, "--out", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    doc = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert re.search(r"<th>completed</th><td>\d{4}-\d\d-\d\d \d\d:\d\d JST</td>", doc)
    assert len(re.findall(r'<tr id="d\d+">', doc)) == len(_defect_nos(ctx))
    assert (tmp_path / "out" / "map.png").is_file()


def test_a_defects_crops_put_its_outline_and_heat_map_on_its_own_pixels(tmp_path):
    """At 7.7 px/mm a defect's first row, 3604, came back from millimetres as 3603 (truncated),
    and the score crop, read in whole ¼-res cells from an unaligned first row, was stretched over
    rows it did not cover: the heat sat a cell away from the outline. Both crops now hold the
    flaw's pixels inside the outline, and its heat exactly where its pixels are."""
    from results.roll_report import ReportData, render_report
    from storage.objectstore import LocalStore
    from storage.zarr_rolls import create_roll
    from worker.components import DefectFinder

    ppx = ppy = 7.7
    rows, width, band = 8192, 1200, 2048
    r0, r1, c0, c1 = 3604, 3612, 428, 436
    image = np.full((rows, width, 1), 30, np.uint8)
    image[r0:r1, c0:c1] = 250
    quarter = np.zeros((rows // 4, width // 4), np.float16)
    quarter[r0 // 4 : r1 // 4, c0 // 4 : c1 // 4] = 1.0
    store = LocalStore(tmp_path / "o")
    roll = create_roll(store, "R-crop", width=width, channels=1, band_height=band, manifest={})
    roll.write_rows(0, image)
    for b in range(rows // band):
        roll.write_band_scores("m", b, quarter[b * band // 4 : (b + 1) * band // 4])
    finder = DefectFinder(0.5, ppx, ppy)
    finder.add_band(quarter.astype(np.float32), 0)
    (defect,) = finder.finish()
    roll_row = {"id": "R-crop", "fabric_type": "twill", "status": "done", "px_per_mm_x": ppx,
                "px_per_mm_y": ppy, "rows_ingested": rows, "frames_total": 1, "meta": {},
                "created_at": None, "completed_at": None, "failure_reason": None,
                "length_m": rows / ppy / 1000, "width_mm": width / ppx}  # fmt: skip
    data = ReportData(roll=roll_row, run={"model_version": "m", "status": "done"}, threshold=0.5,
                      defects=[{**vars(defect), "points": None}])  # fmt: skip
    render_report(data, store, tmp_path / "out")
    image_src, score_src = "crops/d00001_image.png", "crops/d00001_score.png"
    found = {}
    for src, colour in ((image_src, (255, 42, 42)), (score_src, (54, 214, 255))):
        pixels = np.asarray(Image.open(tmp_path / "out" / src).convert("RGB")).astype(int)
        outline = np.all(np.abs(pixels - colour) < 40, axis=2)
        hot = pixels.sum(2) > 600 if src == image_src else (pixels[:, :, 1] > 200) & ~outline
        ys, xs = np.nonzero(outline)
        hy, hx = np.nonzero(hot)
        assert xs.min() < hx.min() and hx.max() < xs.max(), src
        assert ys.min() < hy.min() and hy.max() < ys.max(), src
        found[src] = (hx.min(), hx.max(), hy.min(), hy.max())
    assert found[image_src] == found[score_src]  # the heat lies on the flaw's own pixels


def test_the_page_of_a_roll_not_scored_or_failed_says_so(db_session, local_store, tmp_path):
    """It said "No defects in the current run" of a roll that had no run: a flawless roll, read
    quickly."""
    db_session.add(Roll(id="R-open", fabric_type="twill", width_mm=30.0, px_per_mm_x=10.0,
                        px_per_mm_y=10.0, status="ingesting"))  # fmt: skip
    db_session.add(Roll(id="R-failed", fabric_type="twill", width_mm=30.0, px_per_mm_x=10.0,
                        px_per_mm_y=10.0, status="failed", failure_reason="frame 2: not a TIFF"))  # fmt: skip
    db_session.flush()
    for roll_id, why in [
        ("R-open", "roll R-open is not scored yet (status ingesting)"),
        ("R-failed", "roll R-failed failed, before any run finished: frame 2: not a TIFF"),
    ]:
        page = write_roll_report(db_session, local_store, roll_id, tmp_path / roll_id)
        doc = page.read_text(encoding="utf-8")
        assert f"No defects to show: {why}." in doc and "No defects in the current run" not in doc
        assert "no defects to show</span></h1>" in doc and "0 defects" not in doc
    assert "frame 2: not a TIFF" in doc


def test_the_maps_edges_join_the_blocks_that_keep_them() -> None:
    """One line per run of blocks with the same edge: a 300 m roll's ~12,000 blocks were drawn
    one call each in every segment (92 s)."""
    blocks = [(0, 25.6, 20.0), (25.6, 51.2, 20.0), (51.2, 76.8, 21.0), (102.4, 128.0, 21.0)]
    extents = [dict(y0_mm=a, y1_mm=b, left_mm=left, right_mm=980.0, width_mm=980.0 - left)
               for a, b, left in blocks]  # fmt: skip
    # a block where no fabric was seen has no edges to draw
    extents.insert(3, dict(y0_mm=76.8, y1_mm=102.4, left_mm=0.0, right_mm=0.0, width_mm=0.0))
    lines = edge_lines(extents)  # (along m, across mm) pairs: left edges first, then right
    assert lines.tolist() == [
        [[0.0, 20.0], [0.0512, 20.0]],  # the first two blocks: one line
        [[0.0512, 21.0], [0.0768, 21.0]],  # the edge moved
        [[0.1024, 21.0], [0.128, 21.0]],  # a block without fabric between
        [[0.0, 980.0], [0.0768, 980.0]],
        [[0.1024, 980.0], [0.128, 980.0]],
    ]


def test_the_map_draws_each_overview_pixel_over_the_rows_and_columns_it_holds(tmp_path):
    """The overview's last pixel across holds fewer columns than the others; stretched to the
    roll's width, a narrow roll's marks were drawn 0.7× across, beside their boxes."""
    from storage.objectstore_local import LocalStore
    from storage.zarr_rolls import create_roll

    rows, width = 65536, 10  # 1 px/mm: 65.5 m by 10 mm, 4 px a pixel of the map's overview
    image = np.full((rows, width, 1), 30, np.uint8)
    image[:, 7] = 250  # a running line 7–8 mm across
    roll = create_roll(LocalStore(tmp_path / "o"), "R-thin", width=width, channels=1,
                       band_height=2048, manifest={})  # fmt: skip
    roll.write_rows(0, image)
    fig = draw_roll_map(roll, rows, (1.0, 1.0), [], [], tmp_path / "map.png")
    (shown,) = fig.axes[0].images
    pixels = np.asarray(shown.get_array())  # across × along
    _, _, across_drawn, _ = shown.get_extent()
    bright = int(np.argmax(pixels.mean(axis=1)))
    cell = across_drawn / pixels.shape[0]
    assert bright * cell <= 7.5 <= (bright + 1) * cell  # drawn where the line is
    assert fig.axes[0].get_ylim() == (10.0, 0.0)  # and cut at the roll's edge


def test_a_long_list_of_capped_yards_is_counted_not_spelt_out(tmp_path):
    """A 1,000 m roll capped some 550 yards: the grade table listed each, a screen long."""
    from datetime import UTC, datetime

    from results.roll_report import ReportData, render_report
    from storage.objectstore_local import LocalStore
    from storage.zarr_rolls import create_roll

    store = LocalStore(tmp_path / "o")
    roll = create_roll(store, "R-cap", width=64, channels=1, band_height=256, manifest={})
    roll.write_rows(0, np.full((256, 64, 1), 30, np.uint8))
    capped = [{"yard": y, "points": 8, "counted": 4} for y in range(30)]
    details = {"yards_capped": capped, "defects_ignored_at_selvage": [], "acceptance": [["A", 20]],
               "reject_name": "reject", "rules_section": "fabric_types.denim"}  # fmt: skip
    grade = {"grade": "reject", "details": details, "points": 120, "points_per_100yd2": 9.9,
             "yards": 30.0, "width_in": 60.0, "graded_at": datetime(2026, 12, 1, tzinfo=UTC)}  # fmt: skip
    roll_row = {"id": "R-cap", "fabric_type": "denim", "status": "done", "px_per_mm_x": 1.0,
                "px_per_mm_y": 1.0, "rows_ingested": 256, "frames_total": 1, "meta": {},
                "created_at": None, "completed_at": None, "failure_reason": None,
                "length_m": 0.256, "width_mm": 64.0}  # fmt: skip
    data = ReportData(roll=roll_row, run={"model_version": "m", "status": "done"}, grade=grade)
    page = render_report(data, store, tmp_path / "out").read_text()
    assert "30: yard 0–1: 8 → 4 points; " in page and "… and 10 more" in page
    assert "yard 20–21" not in page and "yard 19–20" in page
    assert "the rules' fabric_types.denim section" in page


def test_a_roll_of_thousands_of_specks_lists_the_first_defects_and_counts_the_rest(tmp_path):
    """A roll that scores like no fabric the model knows turns into specks: the page listed
    every one, 76 MB for 300,000, which no browser shows."""
    from results.roll_report import MAX_TABLE_ROWS, ReportData, render_report
    from storage.objectstore_local import LocalStore
    from storage.zarr_rolls import create_roll

    store = LocalStore(tmp_path / "o")
    roll = create_roll(store, "R-many", width=64, channels=1, band_height=256, manifest={})
    roll.write_rows(0, np.full((256, 64, 1), 30, np.uint8))
    n = MAX_TABLE_ROWS + 500
    defects = [
        {"defect_no": k, "x_mm": 30.0, "y_mm": k * 0.1, "x0_mm": 29.0, "x1_mm": 31.0,
         "y0_mm": k * 0.1, "y1_mm": k * 0.1 + 0.1, "length_mm": 2.0, "width_mm": 0.1,
         "area_mm2": 0.2, "max_score": 2.0, "mean_score": 1.5, "points": 1}
        for k in range(1, n + 1)
    ]  # fmt: skip
    roll_row = {"id": "R-many", "fabric_type": "denim", "status": "done", "px_per_mm_x": 1.0,
                "px_per_mm_y": 1.0, "rows_ingested": 256, "frames_total": 1, "meta": {},
                "created_at": None, "completed_at": None, "failure_reason": None,
                "length_m": 0.256, "width_mm": 64.0}  # fmt: skip
    data = ReportData(roll=roll_row, run={"model_version": "m", "status": "done"},
                      defects=defects, threshold=1.0)  # fmt: skip
    page = render_report(data, store, tmp_path / "out", max_crops=0).read_text()
    assert page.count('<tr id="d') == MAX_TABLE_ROWS
    assert f'id="d{MAX_TABLE_ROWS}"' in page and f'id="d{MAX_TABLE_ROWS + 1}"' not in page
    assert (
        f"… and 500 more defects, not listed here: <code>rollscan defects R-many --csv</code> lists all {n}."
        in page
    )
    assert f"Defects ({n})" in page
