"""task_deliveries.retries, bands.generation and rolls.bits_per_sample.

`task_deliveries.retries`: the Celery retry number of the message a delivery count belongs to.
A retry is a new message whose first delivery starts the count of deaths again; the broker
redelivers the same message, retry number and all, after its worker died. Keyed by the number,
a retried message that kills its workers is given up like any other (worker.deliveries); keyed
by "is a retry" it was counted from 1 on every redelivery and never given up.

`bands.generation`: raised each time a changed frame sends a band back to be scored. A scorer
marks its band done, and writes its map, only if the generation it read the pixels under is
still the band's: a frame replaced while its band was scored leaves no stale map behind.

`rolls.bits_per_sample`: the first frame's sample depth (8 or 16), which later frames must
have: 16-bit samples are brought to 8 bits by a fixed shift, so a depth that changes within a
roll would change its grey levels and every score from that frame on.

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


# integer counters that start at 0: (table, column, comment)
_COUNTERS = (
    ("task_deliveries", "retries",
     "the Celery retry number of the message last counted (0: the first message)"),
    ("bands", "generation", "raised when a changed frame sends the band back to be scored"),
)  # fmt: skip


def upgrade() -> None:
    for table, column, comment in _COUNTERS:
        op.add_column(
            table,
            sa.Column(
                column, sa.Integer(), server_default=sa.text("0"), nullable=False, comment=comment
            ),
        )
    op.add_column(
        "rolls",
        sa.Column(
            "bits_per_sample",
            sa.SmallInteger(),
            nullable=True,
            comment="8 or 16, the frames' sample depth: known once the first is read",
        ),
    )
    op.create_check_constraint(
        op.f("ck_rolls_bits_per_sample"), "rolls", "bits_per_sample IN (8, 16)"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_rolls_bits_per_sample"), "rolls", type_="check")
    op.drop_column("rolls", "bits_per_sample")
    for table, column, _ in reversed(_COUNTERS):
        op.drop_column(table, column)
