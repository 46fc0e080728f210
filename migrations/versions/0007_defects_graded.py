"""current_defects.graded: whether the defect's run has been graded.

Finalize stores a run's defects with NULL points; the grading fills them in, leaving NULL only
where a defect lies wholly within the selvage margin. Before the nightly grading (or `rollscan
grade`), a quality engineer counting selvage defects, or summing points, could not tell the two
NULLs apart.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from storage.sql_views import CURRENT_DEFECTS_V2, CURRENT_DEFECTS_V3

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(CURRENT_DEFECTS_V3)  # the new column comes last: CREATE OR REPLACE keeps the rest


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS current_defects")  # a view cannot lose a column in place
    op.execute(CURRENT_DEFECTS_V2)
