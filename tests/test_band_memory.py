"""Scoring a band needs memory for the band, not for the roll (issue 7; bench/band_memory.py)."""

import tracemalloc

import tifffile

from distill.checkpoint import random_checkpoint
from distill.data.synthetic import make_fabric
from scheduler.submit import submit
from storage.registry import activate_model, register_model
from storage.schema import Run
from storage.settings import Settings
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer
from worker.scoring import score_band

BAND, WIDTH, BATCH = 256, 512, 4
SHORT, LONG = 3, 48  # bands; the band measured is the middle one, with halo rows on both sides
ROLL_BYTES = LONG * BAND * WIDTH  # the long roll's whole image (uint8, one channel): 6 MiB
SLACK = 256 << 10  # bytes: the roll's zarr metadata, ORM rows, allocator jitter


class IngestOnly(InlineEnqueuer):
    """Runs ingest; drops the bands it announces (the test scores the ones it measures)."""

    def score(self, run_id: int, band_index: int, reprocess: bool = False) -> None:
        pass


def _ingest(ctx, folder, roll_id, bands):
    (folder / "frames").mkdir(parents=True)
    for k in range(bands):  # one frame per band
        pixels = make_fabric(BAND, WIDTH, weave="twill", seed=3, row_offset=k * BAND)
        tifffile.imwrite(folder / "frames" / f"{k + 1:06d}.tif", pixels)
    (folder / "manifest.json").write_text(
        f'{{"roll_id": "{roll_id}", "fabric_type": "mem", "width_mm": {WIDTH / 10}, '
        f'"px_per_mm": 10, "frames": {bands}, "complete": true}}'
    )
    submit(ctx, str(folder))
    ctx.enqueue.drain()
    with ctx.session() as session:
        return session.query(Run.id).filter(Run.roll_id == roll_id).scalar()


def _traced_peak(ctx, run_id, band_index):
    tracemalloc.start()
    try:
        assert score_band(ctx, run_id, band_index) == "scored"
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_band_of_a_long_roll_needs_no_more_memory_than_one_of_a_short_roll(
    db_engine, local_store, tmp_path
):
    """The traced (numpy + Python, all threads) peak of `score_band` on the middle band of a
    48-band roll stays within 25 % + 256 KiB of the same on the middle band of a 3-band roll.

    Why that margin: the band's own peak is about 1.4 MiB here (its read window of 480 rows,
    one batch's float32 tile maps, the band's float32 map), measured equal to
    within 1 % for both roll lengths, so 25 % + 256 KiB never trips on noise. The bound,
    about 2 MiB, is below the 6 MiB of the long roll's whole image (48 × 256 × 512 uint8):
    any read of the whole roll, even one freed at once, needs that much at a time, so it
    cannot pass (checked by hand: a `read_rows` that read the whole roll and kept only the
    window peaked at 10.6 MB here).
    """
    settings = Settings(band_height=BAND, data_dir=tmp_path / "data", device="cpu")
    enqueuer = IngestOnly()
    ctx = WorkerContext(settings, db_engine, local_store, enqueuer, device="cpu", batch_size=BATCH)
    enqueuer.ctx = ctx
    with ctx.session() as session:
        model, _ = register_model(session, local_store, random_checkpoint(tmp_path / "m.pt"),
                                  fabric_type="mem", random_teacher_ok=True)  # fmt: skip
        activate_model(session, model.version)
    short = _ingest(ctx, tmp_path / "short", "R-short", SHORT)
    long = _ingest(ctx, tmp_path / "long", "R-long", LONG)
    score_band(ctx, short, 0)  # warm-up: the model, zarr codecs, the ORM's caches

    short_peak = _traced_peak(ctx, short, SHORT // 2)
    long_peak = _traced_peak(ctx, long, LONG // 2)
    bound = 1.25 * short_peak + SLACK
    assert long_peak <= bound, (short_peak, long_peak)
    assert bound < ROLL_BYTES  # so the margin cannot hide a read of the whole roll
