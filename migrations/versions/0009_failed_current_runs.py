"""current_defects and roll_grades leave out a current run that failed.

A done run reopened by a changed frame stays current while it is scored again; when a band of
it is given up and no finished run can take its place, it stays current and failed. Its defects
may read pixels replaced since: `rollscan defects` and the report refused them, but the views
(and `rollscan rolls`, which reads them) still showed its defects and grade.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from storage.sql_views import CURRENT_DEFECTS_V3, CURRENT_DEFECTS_V4, ROLL_GRADES, ROLL_GRADES_V2

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(CURRENT_DEFECTS_V4)  # the same columns: CREATE OR REPLACE in place
    op.execute(ROLL_GRADES_V2)


def downgrade() -> None:
    op.execute(CURRENT_DEFECTS_V3)
    op.execute(ROLL_GRADES.replace("CREATE VIEW", "CREATE OR REPLACE VIEW"))
