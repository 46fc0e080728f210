"""runs.threshold and runs.roll_threshold: the threshold finalize applied to a run, and the
roll's own estimate it was raised to when the roll scored higher all over than the model's
held-out tiles (worker/roll_threshold.py); the current_runs view shows both.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.sql_views import CURRENT_RUNS, CURRENT_RUNS_V2

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "runs",
        sa.Column(
            "threshold",
            sa.Double(),
            nullable=True,
            comment="the score threshold finalize applied (NULL: not finalized)",
        ),
    )
    op.add_column(
        "runs",
        sa.Column(
            "roll_threshold",
            sa.Double(),
            nullable=True,
            comment="the roll's own threshold at the model's target false-alarm rate, from its "
            "tile-sized blocks of fabric (NULL: not estimated)",
        ),
    )
    op.execute(CURRENT_RUNS_V2)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS current_runs")
    op.execute(CURRENT_RUNS)
    op.drop_column("runs", "roll_threshold")
    op.drop_column("runs", "threshold")
