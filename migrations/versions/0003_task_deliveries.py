"""task_deliveries: deliveries of a task that have not finished (worker.deliveries).

A task is acknowledged late and rejected back to its queue when its worker dies, so a frame
that kills its worker (out of memory, a crash in a decoder) would be delivered for ever. Each
delivery counts itself here as it starts and uncounts itself when it ends in any way Python
sees; what remains counts the deaths, and after too many the task fails its roll instead.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_deliveries",
        sa.Column("task", sa.Text(), nullable=False, comment="ingest, score or finalize"),
        sa.Column("key", sa.Text(), nullable=False, comment="roll/frame, run/band or run"),
        sa.Column(
            "unfinished",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="deliveries started and never ended: their worker died",
        ),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "unfinished >= 0", name=op.f("ck_task_deliveries_unfinished_not_negative")
        ),
        sa.PrimaryKeyConstraint("task", "key", name=op.f("pk_task_deliveries")),
    )


def downgrade() -> None:
    op.drop_table("task_deliveries")
