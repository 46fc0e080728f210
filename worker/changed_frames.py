"""A frame uploaded again with other pixels: which bands read it, in which runs, and sending
them back.

A band's map depends on every row its scoring reads — its own, the rows of its neighbours that
its tiles reach into, and the whole blocks of rows its fabric mask is measured on — so all the
bands that read a changed frame are scored again, not only those that hold it — in every run of
the roll, the reprocess runs of newer models as well as the live one. A scorer may be
under way on the old pixels meanwhile: each band's generation is raised, and a scorer writes its
map and counts its band only under the generation it read the pixels with (`worker.scoring`).
"""

from __future__ import annotations

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from storage.schema import Band, Run
from storage.zarr_rolls import RollArrays
from worker.fabric_mask import band_window, block_reach


def bands_reading(
    arrays: RollArrays, roll_rows: int, start: int, stop: int, tile: int, stride: int
) -> list[int]:
    """The bands whose scoring reads any of rows [start, stop) (`worker.fabric_mask.band_window`)."""
    height, reach = arrays.band_height, block_reach(tile)  # no band reads further than reach
    near = arrays.bands_of_rows(max(0, start - reach), min(stop + reach, roll_rows))
    windows = {
        b: band_window(b * height, min((b + 1) * height, roll_rows), roll_rows, tile, stride)
        for b in near
    }
    return [b for b, (lo, hi) in windows.items() if lo < stop and start < hi]


def runs_of_pixels(session: Session, roll_id: str) -> list[Run]:
    """The roll's runs, whose maps all come from its pixels, in ascending id (the order their
    rows are locked in) — a failed reprocess run too: started again, it keeps its scored bands."""
    return list(session.scalars(select(Run).where(Run.roll_id == roll_id).order_by(Run.id)))


def hold_bands(session: Session, run_id: int, bands: list[int]) -> None:
    """Lock the rows of the run's `bands`, in ascending order, until the transaction ends.

    A scorer holds its band's row, then the run's, while it writes its map and counts it; a
    changed frame takes its bands before the run's row too, so neither waits on the other in
    a cycle."""
    session.execute(
        select(Band.band_index)
        .where(Band.run_id == run_id, Band.band_index.in_(bands))
        .order_by(Band.band_index)
        .with_for_update()
    )


def send_bands_back(session: Session, run_id: int, bands: list[int]) -> list[int]:
    """Raise the generation of the run's `bands` (those that exist), make the done ones pending
    and uncount them; return them all, to be scored again — a pending band may be under way on
    the old pixels, and its scorer will now neither write nor count it."""
    where = (Band.run_id == run_id, Band.band_index.in_(bands))
    raised = Band.generation + 1
    undone = session.scalars(
        update(Band).where(*where, Band.status != "done").values(generation=raised)
        .returning(Band.band_index)
    ).all()  # fmt: skip
    done = session.scalars(
        update(Band).where(*where, Band.status == "done").values(status="pending", generation=raised)
        .returning(Band.band_index)
    ).all()  # fmt: skip
    # in SQL, relative to the row's value (an absolute value written from what this
    # transaction read would overwrite a band counted meanwhile)
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(
            bands_done=Run.bands_done - len(done),
            status=case((Run.status == "done", "scoring"), else_=Run.status),
        )
    )
    return sorted({*undone, *done})
