"""The fabric's measured extents in PostgreSQL (`fabric_extents`): written by scoring, read by
finalize (the mask) and grading (the measured width, and the selvage beside each defect).

An extent is anything with `row_start`, `row_stop`, `left`, `right` (pixels), such as
`distill.fabric_region.Extent`; a band scored twice measures the same pixels and upserts the
same rows. A block where no fabric was seen has an empty extent (width 0): the fabric's widths
and edges are read over the other blocks, and its length counts as not seen (`unseen_mm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
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
    """Upsert the extents of some of a roll's rows, in millimetres (px_per_mm: across, along)
    as well as pixels."""
    if not extents:
        return
    mx, my = px_per_mm
    rows = [
        {"roll_id": roll_id, "row_start": e.row_start, "row_stop": e.row_stop,
         "left_px": e.left, "right_px": e.right, "y0_mm": e.row_start / my,
         "y1_mm": e.row_stop / my, "left_mm": e.left / mx, "right_mm": e.right / mx,
         "width_mm": (e.right - e.left) / mx}
        for e in extents
    ]  # fmt: skip
    stmt = insert(FabricExtent).values(rows)
    columns = ("row_stop", "left_px", "right_px", "y0_mm", "y1_mm", "left_mm", "right_mm",
               "width_mm")  # fmt: skip
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[FabricExtent.roll_id, FabricExtent.row_start],
            set_={
                **{c: stmt.excluded[c] for c in columns},
                "measured_at": stmt.excluded.measured_at,
            },
        )
    )


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
    """The length (mm) along a roll of its blocks where no fabric was seen."""
    length = func.coalesce(func.sum(FabricExtent.y1_mm - FabricExtent.y0_mm), 0.0)
    return float(
        session.scalar(
            select(length).where(FabricExtent.roll_id == roll_id, FabricExtent.width_mm == 0)
        )
    )


def measured_fabric_mm(session: Session, roll_id: str) -> tuple[float, float, float] | None:
    """The fabric's median left and right edges and its median width (mm) along a roll, or None
    if unmeasured. The width is the median of the blocks' widths — `roll_widths.median_width_mm`,
    what the report shows — not the medians' difference, which differs from it where the
    fabric narrows on alternate sides."""
    # the medians of the roll_widths view, computed in the database as there
    edges = (FabricExtent.left_mm, FabricExtent.right_mm, FabricExtent.width_mm)
    median = [func.percentile_cont(0.5).within_group(edge) for edge in edges]
    row = session.execute(select(*median).where(FabricExtent.roll_id == roll_id, _ON_FABRIC)).one()
    return None if row[0] is None else (float(row[0]), float(row[1]), float(row[2]))


def edges_along_mm(session: Session, roll_id: str) -> list[tuple[float, float, float, float]]:
    """The fabric's edges block by block along a roll: (y0_mm, y1_mm, left_mm, right_mm), in
    row order — where the selvage lies beside each defect, as the fabric wanders."""
    rows = session.execute(
        select(FabricExtent.y0_mm, FabricExtent.y1_mm, FabricExtent.left_mm, FabricExtent.right_mm)
        .where(FabricExtent.roll_id == roll_id, _ON_FABRIC)
        .order_by(FabricExtent.row_start)
    ).all()  # fmt: skip
    return [tuple(r) for r in rows]
