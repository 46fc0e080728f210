"""Indexes for the questions asked by date and for the rolls with open work.

On an archive of 20,000 rolls: "grades of the last week" scanned every grade and roll (44 ms),
"rolls finished yesterday" every roll, `rollscan grade --since` every current run, and the
scheduler's idle-roll check (each metrics pass) every run for the open ones. (The nightly
selection, "finished since or not graded yet", still reads every current run: the OR takes no
index.)

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_rolls_completed_at", "rolls", ["completed_at"])
    op.create_index("ix_grades_graded_at", "grades", ["graded_at"])
    op.create_index(
        "ix_runs_finished_at_current",
        "runs",
        ["finished_at"],
        postgresql_where=sa.text("is_current"),
    )
    op.create_index(
        "ix_runs_open_roll_id",
        "runs",
        ["roll_id"],
        postgresql_where=sa.text("status <> ALL (ARRAY['done'::text, 'failed'::text])"),
    )


def downgrade() -> None:
    for name in ("ix_runs_open_roll_id", "ix_runs_finished_at_current", "ix_grades_graded_at",
                 "ix_rolls_completed_at"):  # fmt: skip
        op.drop_index(name)
