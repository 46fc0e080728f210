"""runs.requested_at: when the run was last asked for, which decides the roll's current run.

A run became current when it finished for the first time, so an older model's reprocess that
finished after a newer one's took the roll from it for good, and a reprocess run that failed and
was asked for again never got the roll back. Now the run asked for last is current once it is
done (`worker.finalize`); runs recorded before this revision were asked for when they were made.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "runs",
        sa.Column(
            "requested_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=True,
            comment="when the run was last asked for (made, or asked for again by `rollscan "
            "reprocess`): of the roll's finished runs, the one asked for last is current",
        ),
    )
    op.execute("UPDATE runs SET requested_at = created_at")
    op.alter_column("runs", "requested_at", nullable=False)


def downgrade() -> None:
    op.drop_column("runs", "requested_at")
