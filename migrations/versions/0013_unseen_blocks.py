"""fabric_extents may hold an empty extent: a block where the camera saw no fabric.

A dark or saturated frame (the lights off, a capped lens, the line running before the fabric's
start or past its end) was taken for fabric from side to side and scored into one roll-wide
defect, the roll graded reject for what the camera never saw. Such a block is now stored with an
empty extent (`left_px = right_px = 0`, `width_mm = 0`): nothing there becomes a defect, grading
counts the roll's length without it, and `roll_widths` gives the fabric's widths over the blocks
that hold it and, last, `unseen_mm`.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from storage.sql_views import ROLL_WIDTHS_V2, ROLL_WIDTHS_V3

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLE = "fabric_extents"


def _replace_checks(columns: str, width: str) -> None:
    for name, condition in (("columns_ordered", columns), ("width_positive", width)):
        op.drop_constraint(op.f(f"ck_{_TABLE}_{name}"), _TABLE, type_="check")
        op.create_check_constraint(op.f(f"ck_{_TABLE}_{name}"), _TABLE, condition)


def upgrade() -> None:
    _replace_checks("left_px >= 0 AND right_px >= left_px", "width_mm >= 0")
    op.execute(ROLL_WIDTHS_V3)  # a column added last


def downgrade() -> None:
    # the blocks without fabric cannot be told in the old form: they go (the roll measured less)
    op.execute(f"DELETE FROM {_TABLE} WHERE right_px = left_px")
    _replace_checks("left_px >= 0 AND right_px > left_px", "width_mm > 0")
    op.execute("DROP VIEW roll_widths")  # CREATE OR REPLACE cannot drop a column
    op.execute(ROLL_WIDTHS_V2.replace("CREATE OR REPLACE VIEW", "CREATE VIEW"))
