"""A model refuses a roll unlike its training tiles — in colour where they were grey, grey where
they were in colour, scanned at another resolution — before anything of the roll is written."""

import re
from dataclasses import replace

import numpy as np
import pytest
from fixtures_celery import FABRIC
from sqlalchemy import func, select

from distill.checkpoint import load_model, read_checkpoint, save_checkpoint
from distill.input_fit import colour_channels, input_misfit, training_input
from rollscan_testing.synthetic_roll import write_synthetic_roll
from scheduler.submit import submit
from storage.registry import activate_model, register_model
from storage.schema import Band, FabricExtent, Roll, Run
from worker.roll_rows import RollError

GREY = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 1), dtype=np.uint8)


def test_colour_is_told_by_the_pixels_not_the_channel_count():
    assert colour_channels(GREY) == 1
    assert colour_channels(np.repeat(GREY, 3, axis=-1)) == 1  # a grey camera sending RGB
    colour = np.repeat(GREY, 3, axis=-1)
    colour[..., 0] //= 2
    assert colour_channels(colour) == 3
    assert training_input(colour, 12.5) == {"channels": 3, "px_per_mm": 12.5}


@pytest.mark.parametrize(
    ("trained", "roll_channels", "scale", "pixels", "why"),
    [
        ({"channels": 3}, 1, (10, 10), GREY, "trained on colour tiles and the roll is grey"),
        ({"channels": 1}, 3, (10, 10), np.dstack([GREY[0], GREY[0] // 2, GREY[0]]),
         "trained on grey tiles and the roll is in colour"),
        ({"channels": 1}, 3, (10, 10), np.repeat(GREY, 3, axis=-1), None),
        ({"px_per_mm": 10.0}, 1, (20, 20), GREY, "trained at 10 px/mm .* 20 × 20 px/mm"),
        ({"px_per_mm": 10.0}, 1, (10, 5), GREY, "scanned at 10 × 5 px/mm"),
        ({"px_per_mm": 10.0}, 1, (11.4, 8.8), GREY, None),  # within 15 %
        ({}, 3, (50, 1), GREY, None),  # a checkpoint from before these were recorded
    ],
)  # fmt: skip
def test_input_misfit(trained, roll_channels, scale, pixels, why):
    misfit = input_misfit(trained, roll_channels, scale, pixels)
    if why is None:
        assert misfit is None
    else:
        assert misfit is not None
        assert re.search(why, misfit), misfit


@pytest.fixture
def ctx(make_inline_ctx):
    return make_inline_ctx(1024)


def test_a_roll_scanned_at_another_resolution_is_refused_with_nothing_written(
    ctx, tmp_path, twill_model
):
    """The session's twill model, its card saying it was trained at 20 px/mm, scores a roll
    scanned at 10: one roll-wide defect came of it, graded reject; now the band is refused
    before its scores or extents are written, naming the model and both resolutions."""
    model, card = load_model(twill_model)
    _, state = read_checkpoint(twill_model)
    assert card.train_config["channels"] == 1  # recorded by training
    path = save_checkpoint(
        tmp_path / "at20.pt", model,
        replace(card, train_config={**card.train_config, "px_per_mm": 20.0}),
        state.get("calibration_tiles"),
    )  # fmt: skip
    with ctx.session() as session:
        version, _ = register_model(session, ctx.store, path, fabric_type=FABRIC)
        activate_model(session, version.version)
    folder = tmp_path / "R-at10"
    write_synthetic_roll(folder, "R-at10", frames=2, frame_rows=512, width=512, px_per_mm=10.0,
                         plan=[])  # fmt: skip
    submit(ctx, str(folder))
    with pytest.raises(RollError, match=rf"model {version.version} cannot score roll R-at10: "
                       r"the model was trained at 20 px/mm .* scanned at 10 × 10 px/mm"):  # fmt: skip
        ctx.enqueue.drain()
    with ctx.session() as session:
        run = session.scalar(select(Run).where(Run.roll_id == "R-at10"))
        assert session.get(Roll, "R-at10").rows_ingested == 1024  # the frames are in
        assert session.scalar(select(func.count()).select_from(FabricExtent)) == 0
        assert session.scalar(
            select(func.count()).where(Band.run_id == run.id, Band.status == "done")
        ) == 0  # fmt: skip
        assert run.bands_done == 0
