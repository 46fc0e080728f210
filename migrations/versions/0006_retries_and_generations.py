"""task_deliveries.retries: the Celery retry number of the message a delivery count belongs to.

A retry is a new message whose first delivery starts the count of deaths again; the broker
redelivers the same message, retry number and all, after its worker died. Keyed by the number,
a retried message that kills its workers is given up like any other (worker.deliveries); keyed
by "is a retry" it was counted from 1 on every redelivery and never given up.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "task_deliveries",
        sa.Column(
            "retries",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="the Celery retry number of the message last counted (0: the first message)",
        ),
    )


def downgrade() -> None:
    op.drop_column("task_deliveries", "retries")
