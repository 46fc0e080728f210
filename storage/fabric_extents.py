"""The fabric's measured extents in PostgreSQL (`fabric_extents`): written by scoring, read by
finalize (the mask) and grading (the measured width, and the selvage beside each defect).

An extent is anything with `row_start`, `row_stop`, `left`, `right` (pixels), such as
`distill.fabric_region.Extent`; a band scored again replaces the extents of its rows. Rows where
no fabric was seen have an empty extent (width 0): the fabric's widths and edges are read over
the others, and their length counts as not seen (`unseen_mm`, `roll_widths`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import delete, insert, select, text
from sqlalchemy.orm import Session

from storage.schema import FabricExtent

_ON_FABRIC = FabricExtent.width_mm > 0  # the blocks where fabric was seen


class ExtentLike(Protocol):
    """What `store_extents` reads of a measured extent (rows [row_start, row_stop), fabric columns
    [left, right)): `distill.fabric_region`'s, without importing it."""

    row_start: int
    row_stop: int
    left: int
    right: int


def store_extents(
    session: Session, roll_id: str, px_per_mm: tuple[float, float], extents: Sequence[ExtentLike]
) -> None:
    """Store the extents of some of a roll's rows, in millimetres (px_per_mm: across, along)
    as well as pixels, in place of those stored for the same rows (a block measured again on a
    frame sent again may split otherwise: an older extent left beside the new ones hid them)."""
    if not extents:
        return
    start, stop = min(e.row_start for e in extents), max(e.row_stop for e in extents)
    session.execute(
        delete(FabricExtent).where(
            FabricExtent.roll_id == roll_id,
            FabricExtent.row_start >= start,
            FabricExtent.row_start < stop,
        )
    )
    mx, my = px_per_mm
    rows = [
        {"roll_id": roll_id, "row_start": e.row_start, "row_stop": e.row_stop,
         "left_px": e.left, "right_px": e.right, "y0_mm": e.row_start / my,
         "y1_mm": e.row_stop / my, "left_mm": e.left / mx, "right_mm": e.right / mx,
         "width_mm": (e.right - e.left) / mx}
        for e in extents
    ]  # fmt: skip
    session.execute(insert(FabricExtent).values(rows))


def roll_extents(session: Session, roll_id: str) -> list[tuple[int, int, int, int]]:
    """The stored extents of a roll, in row order: (row_start, row_stop, left, right) px, the
    blocks without fabric (left = right) among them."""
    rows = session.execute(
        select(FabricExtent.row_start, FabricExtent.row_stop, FabricExtent.left_px,
               FabricExtent.right_px)
        .where(FabricExtent.roll_id == roll_id)
        .order_by(FabricExtent.row_start)
    ).all()  # fmt: skip
    return [tuple(r) for r in rows]


def unseen_mm(session: Session, roll_id: str) -> float:
    """The length (mm) along a roll not inspected: its rows without fabric and the fabric's
    rows beside them that finalize masks (`roll_widths.unseen_mm`, the one definition)."""
    value = session.scalar(
        text("SELECT unseen_mm FROM roll_widths WHERE roll_id = :roll"), {"roll": roll_id}
    )
    return float(value or 0.0)


def measured_fabric_mm(session: Session, roll_id: str) -> tuple[float, float, float] | None:
    """The fabric's median left and right edges and its median width (mm) along a roll, or None
    if unmeasured. The width is the median of the blocks' widths — `roll_widths.median_width_mm`,
    what the report shows — not the medians' difference, which differs from it where the
    fabric narrows on alternate sides."""
    # read from the view, the one definition (over the extents that hold fabric)
    row = session.execute(
        text("SELECT median_left_mm, median_right_mm, median_width_mm FROM roll_widths "
             "WHERE roll_id = :roll"), {"roll": roll_id},
    ).one_or_none()  # fmt: skip
    return None if row is None or row[0] is None else (float(row[0]), float(row[1]), float(row[2]))


def edges_along_mm(session: Session, roll_id: str) -> list[tuple[float, float, float, float]]:
    """The fabric's edges block by block along a roll: (y0_mm, y1_mm, left_mm, right_mm), in
    row order — where the selvage lies beside each defect, as the fabric wanders."""
    rows = session.execute(
        select(FabricExtent.y0_mm, FabricExtent.y1_mm, FabricExtent.left_mm, FabricExtent.right_mm)
        .where(FabricExtent.roll_id == roll_id, _ON_FABRIC)
        .order_by(FabricExtent.row_start)
    ).all()  # fmt: skip
    return [tuple(r) for r in rows]
