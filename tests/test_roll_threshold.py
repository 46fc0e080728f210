"""The roll's own threshold: the robust Gumbel fit of its block peaks, the streaming block
peaks over banded ¼-res maps, the modes, and finalize through PostgreSQL recording the
threshold it applied (and `current_runs` showing it)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sqlalchemy import select, text

from distill.calibration import MIN_ROLL_BLOCKS, roll_threshold
from storage.schema import Defect, Model, Roll, Run
from storage.settings import Settings, SettingsError, get_settings
from storage.zarr_rolls import create_roll
from worker.context import WorkerContext
from worker.finalize import finalize_run
from worker.inline import InlineEnqueuer
from worker.roll_threshold import BlockPeaks, run_threshold

# ------------------------------------------------------------------- the robust fit


def test_fit_recovers_the_gumbel_quantile():
    peaks = stats.gumbel_r.rvs(loc=2.0, scale=0.5, size=20_000, random_state=0)
    assert roll_threshold(peaks, 1e-3) == pytest.approx(
        stats.gumbel_r.ppf(0.999, 2.0, 0.5), rel=0.02
    )


@pytest.mark.parametrize(("defects", "moved"), [(40, 0.05), (200, 0.2)])
def test_defects_in_the_upper_tail_barely_move_it(defects, moved):
    good = stats.gumbel_r.rvs(loc=2.0, scale=0.5, size=2_000, random_state=1)
    clean = roll_threshold(good, 1e-3)
    peaks = np.concatenate([good, np.full(defects, 40.0)])  # 2 % and 9 % of the blocks
    assert roll_threshold(peaks, 1e-3) == pytest.approx(clean, rel=moved)
    # what a maximum-likelihood fit would have done
    assert stats.gumbel_r.ppf(0.999, *stats.gumbel_r.fit(peaks)) > 1.5 * clean


def test_too_few_blocks_or_no_spread_give_no_estimate():
    rng = np.random.default_rng(2)
    assert roll_threshold(rng.gumbel(size=MIN_ROLL_BLOCKS - 1), 1e-3) is None
    assert roll_threshold(rng.gumbel(size=MIN_ROLL_BLOCKS), 1e-3) is not None
    assert roll_threshold(np.full(500, 0.3), 1e-3) is None
    # off-fabric blocks (−inf) and NaN do not count as blocks
    assert roll_threshold(np.r_[rng.gumbel(size=10), np.full(100, -np.inf)], 1e-3) is None


# --------------------------------------------------------------- streaming block peaks


def _direct_peaks(scores: np.ndarray, block: int) -> np.ndarray:
    out = []
    for r in range(0, scores.shape[0], block):
        for c in range(0, scores.shape[1], block):
            part = scores[r : r + block, c : c + block]
            if np.isfinite(part).all():
                out.append(part.max())
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("band_rows", [1, 7, 32, 37, 64, 200])
def test_block_peaks_whatever_the_banding(band_rows):
    rng = np.random.default_rng(band_rows)
    scores = rng.random((150, 101)).astype(np.float32)  # neither side a multiple of 32
    scores[:, :50] = -np.inf  # the table beside the fabric: column block 0 off, 1 partly
    scores[100:120, 60:70] = -np.inf
    peaks = BlockPeaks(32)
    for row0 in range(0, scores.shape[0], band_rows):
        peaks.add_band(scores[row0 : row0 + band_rows], row0)
    got = peaks.peaks()
    np.testing.assert_array_equal(got, _direct_peaks(scores, 32))
    # columns 64–95 and 96–100 in 5 rows of blocks, less the one the hole reaches into
    assert np.isfinite(got).all() and len(got) == 5 * 2 - 1


def test_block_peaks_refuse_bands_out_of_order():
    peaks = BlockPeaks(4)
    peaks.add_band(np.zeros((3, 8)), 0)
    with pytest.raises(ValueError, match="expected row 3"):
        peaks.add_band(np.zeros((3, 8)), 4)
    with pytest.raises(ValueError, match="block"):
        BlockPeaks(0)


def test_modes():
    peaks = stats.gumbel_r.rvs(loc=1.0, scale=0.1, size=500, random_state=3)
    own = roll_threshold(peaks, 1e-3)
    assert run_threshold("model", 0.5, peaks, 1e-3) == (0.5, own)  # recorded, not applied
    assert run_threshold("max", 0.5, peaks, 1e-3) == (own, own)
    assert run_threshold("max", 9.0, peaks, 1e-3) == (9.0, own)
    assert run_threshold("max", 0.5, peaks[:10], 1e-3) == (0.5, None)  # too few: the model's
    assert run_threshold("max", 0.5, peaks, None)[1] == own  # an old model: train's default fpr
    assert run_threshold("max", 0.5, peaks, 1e-5)[1] > own
    with pytest.raises(ValueError, match="one of"):
        run_threshold("median", 0.5, peaks, 1e-3)


def test_setting_default_env_and_choices(monkeypatch):
    assert Settings().roll_threshold == "model"
    monkeypatch.setenv("ROLLSCAN_ROLL_THRESHOLD", "max")
    assert get_settings().roll_threshold == "max"
    monkeypatch.setenv("ROLLSCAN_ROLL_THRESHOLD", "median")
    with pytest.raises(SettingsError, match="roll_threshold"):
        get_settings()


# ----------------------------------------------------------- finalize, in PostgreSQL

PX_PER_MM = 10.0
SIDE = 1024  # px: a ¼-res map of 256 × 256, 64 blocks of 32² (a 128² tile's)


def _finalize(ctx: WorkerContext, roll_id: str, scores: np.ndarray) -> int:
    arrays = create_roll(ctx.store, roll_id, width=SIDE, channels=1, band_height=512,
                         manifest={"roll_id": roll_id})  # fmt: skip
    for band in range(2):
        arrays.write_band_scores("m-roll", band, scores[128 * band : 128 * (band + 1)])
    with ctx.session() as session:
        if session.get(Model, "m-roll") is None:
            session.add(Model(version="m-roll", fabric_type="denim", variant="residual",
                              teacher="resnet34", tile=128, checkpoint_uri="file:///m.pt",
                              sha256="b" * 64, threshold=0.5, metrics={"target_fpr": 1e-3}))  # fmt: skip
        session.add(Roll(id=roll_id, fabric_type="denim", width_mm=SIDE / PX_PER_MM,
                         px_per_mm_x=PX_PER_MM, px_per_mm_y=PX_PER_MM, width_px=SIDE,
                         channels=1, rows_ingested=SIDE))  # fmt: skip
        session.flush()
        run = Run(roll_id=roll_id, model_version="m-roll", purpose="live", status="scoring",
                  bands_total=2, bands_done=2)  # fmt: skip
        session.add(run)
        session.flush()
        run_id = run.id
    finalize_run(ctx, run_id)
    return run_id


def _fabric(loc: float, scale: float, seed: int) -> np.ndarray:
    scores = np.random.default_rng(seed).gumbel(loc, scale, size=(256, 256)).astype(np.float32)
    scores[200:204, 100:104] = 5.0  # one flaw, far above any fabric
    return scores


@pytest.mark.parametrize("mode", ["max", "model"])
def test_a_roll_that_scores_higher_all_over_raises_the_threshold(
    db_engine, local_store, tmp_path, mode
):
    # the fabric's ¼-res pixels exceed the model's 0.5 one time in six: under the model's
    # threshold they percolate into defects across the roll; the roll's own keeps the flaw
    settings = Settings(band_height=512, data_dir=tmp_path / "data", roll_threshold=mode)
    ctx = WorkerContext(settings, db_engine, local_store, InlineEnqueuer(), device="cpu")
    run_id = _finalize(ctx, f"R-high-{mode}", _fabric(0.45, 0.03, seed=4))
    with ctx.session() as session:
        run = session.get(Run, run_id)
        defects = session.scalars(select(Defect).where(Defect.run_id == run_id)).all()
        view = session.execute(
            text("SELECT threshold, roll_threshold FROM current_runs WHERE run_id = :r"),
            {"r": run_id},
        ).one()
    assert tuple(view) == (run.threshold, run.roll_threshold)
    assert 0.6 < run.roll_threshold < 5.0  # recorded in either mode: this roll scores high
    if mode == "model":
        assert run.threshold == 0.5
        assert sum(d.area_mm2 for d in defects) > 0.1 * (SIDE / PX_PER_MM) ** 2
        return
    assert run.threshold == run.roll_threshold
    assert [(d.x0_mm, d.y0_mm, d.x1_mm, d.y1_mm) for d in defects] == [
        pytest.approx((40.0, 80.0, 41.6, 81.6))
    ]


@pytest.mark.parametrize("mode", ["max", "model"])
def test_a_roll_that_scores_lower_keeps_the_model_threshold(db_engine, local_store, tmp_path, mode):
    settings = Settings(band_height=512, data_dir=tmp_path / "data", roll_threshold=mode)
    ctx = WorkerContext(settings, db_engine, local_store, InlineEnqueuer(), device="cpu")
    scores = _fabric(0.05, 0.01, seed=5)
    scores[200:204, 100:104] = 0.4  # under the model's threshold, far over this roll's fabric
    run_id = _finalize(ctx, f"R-low-{mode}", scores)
    with ctx.session() as session:
        run = session.get(Run, run_id)
        found = session.scalars(select(Defect).where(Defect.run_id == run_id)).all()
    assert run.threshold == 0.5 and run.roll_threshold < 0.4 and found == []
