"""roll_widths aggregates each roll's blocks on its own; roll_grades shows completed_at.

`roll_widths` was a GROUP BY over the whole of `fabric_extents`: a query that filtered it through
a join ("the widths of last week's rolls") aggregated every block of the archive first — 6.7 s
at 5 M blocks, and a mill's archive holds tens of millions. The same rows, one roll at a time.
`roll_grades.graded_at` moves whenever a roll is graded again: its `completed_at` now stands
beside it, for selecting rolls by when they were made.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from storage.sql_views import ROLL_GRADES_V2, ROLL_GRADES_V3, ROLL_WIDTHS, ROLL_WIDTHS_V2

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(ROLL_WIDTHS_V2)  # the same columns: replaced in place
    op.execute(ROLL_GRADES_V3)  # a column added last


def downgrade() -> None:
    op.execute(ROLL_WIDTHS.replace("CREATE VIEW", "CREATE OR REPLACE VIEW"))
    op.execute("DROP VIEW roll_grades")  # CREATE OR REPLACE cannot drop a column
    op.execute(ROLL_GRADES_V2.replace("CREATE OR REPLACE VIEW", "CREATE VIEW"))
