"""runs.stride: the tile stride every band of a run is scored at, fixed once.

Each worker took the stride from its own ROLLSCAN_OVERLAP when it scored a band: workers set up
apart scored the bands of one run on different tile grids, each band matching the worker that
took it, and nothing said so. The run now fixes its stride when its first bands are recorded
(under the run's lock), and every band is scored at it; runs recorded before this revision
fix theirs at their next recorded band.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "runs",
        sa.Column(
            "stride",
            sa.Integer(),
            nullable=True,
            comment="the tile stride (px) every band of the run is scored at, fixed when its "
            "first bands are recorded (NULL: none yet)",
        ),
    )


def downgrade() -> None:
    op.drop_column("runs", "stride")
