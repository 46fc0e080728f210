"""fabric_extents: the fabric's measured left and right edges per block of rows, and the
`roll_widths` view over them.

A line-scan camera sees the table beside the fabric; scoring measures where the fabric lies in
each band and stores it here, finalize turns no score outside it into a defect, and grading
takes the measured width when the manifest's disagrees.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.sql_views import ROLL_WIDTHS

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fabric_extents",
        sa.Column("roll_id", sa.Text(), nullable=False),
        sa.Column("row_start", sa.BigInteger(), nullable=False),
        sa.Column("row_stop", sa.BigInteger(), nullable=False, comment="exclusive"),
        sa.Column("left_px", sa.Integer(), nullable=False, comment="first fabric column"),
        sa.Column(
            "right_px", sa.Integer(), nullable=False, comment="one past the last fabric column"
        ),
        sa.Column("y0_mm", sa.Double(), nullable=False, comment="rows in mm along the roll"),
        sa.Column("y1_mm", sa.Double(), nullable=False),
        sa.Column(
            "left_mm",
            sa.Double(),
            nullable=False,
            comment="the fabric's left edge, from the image's",
        ),
        sa.Column("right_mm", sa.Double(), nullable=False),
        sa.Column("width_mm", sa.Double(), nullable=False, comment="measured fabric width"),
        sa.Column(
            "measured_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "row_start >= 0 AND row_stop > row_start", name=op.f("ck_fabric_extents_rows_ordered")
        ),
        sa.CheckConstraint(
            "left_px >= 0 AND right_px > left_px", name=op.f("ck_fabric_extents_columns_ordered")
        ),
        sa.CheckConstraint("width_mm > 0", name=op.f("ck_fabric_extents_width_positive")),
        sa.ForeignKeyConstraint(
            ["roll_id"],
            ["rolls.id"],
            name=op.f("fk_fabric_extents_roll_id_rolls"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("roll_id", "row_start", name=op.f("pk_fabric_extents")),
    )
    op.execute(ROLL_WIDTHS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS roll_widths")
    op.drop_table("fabric_extents")
