"""A defect longer than a yard is charged in every yard it touches: `defects.points` is its
charge in all (up to 4 per yard), `defects.yards_charged` the number of yards.

Before this revision `points` had to lie in 1..4, so grading a roll with such a defect (charged
8 points over two yards) violated the check and rolled the whole nightly grading back.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.sql_views import CURRENT_DEFECTS, CURRENT_DEFECTS_V2

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS current_defects")
    op.add_column(
        "defects",
        sa.Column(
            "yards_charged",
            sa.SmallInteger(),
            nullable=True,
            comment="linear yards the defect is charged in (NULL: ignored at the selvage)",
        ),
    )
    op.execute("UPDATE defects SET yards_charged = 1 WHERE points IS NOT NULL")
    op.alter_column(
        "defects", "points", comment="4-point system: charged in all, 1..4 per yard charged"
    )
    op.drop_constraint(op.f("ck_defects_points_range"), "defects", type_="check")
    op.create_check_constraint(
        op.f("ck_defects_points_per_yard"),
        "defects",
        "points BETWEEN yards_charged AND 4 * yards_charged",
    )
    op.create_check_constraint(
        op.f("ck_defects_yards_charged_positive"), "defects", "yards_charged >= 1"
    )
    op.create_check_constraint(
        op.f("ck_defects_points_with_yards"),
        "defects",
        "(points IS NULL) = (yards_charged IS NULL)",
    )
    op.execute(CURRENT_DEFECTS_V2)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS current_defects")
    op.drop_constraint(op.f("ck_defects_points_with_yards"), "defects", type_="check")
    op.drop_constraint(op.f("ck_defects_yards_charged_positive"), "defects", type_="check")
    op.drop_constraint(op.f("ck_defects_points_per_yard"), "defects", type_="check")
    # the old range cannot hold a charge over several yards: keep the first yard's share
    op.execute("UPDATE defects SET points = points / yards_charged WHERE yards_charged > 1")
    op.create_check_constraint(op.f("ck_defects_points_range"), "defects", "points BETWEEN 1 AND 4")
    op.alter_column("defects", "points", comment="4-point system, 1..4")
    op.drop_column("defects", "yards_charged")
    op.execute(CURRENT_DEFECTS)
