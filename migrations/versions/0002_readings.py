"""Create the default readings table that analyses read sensor data from.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The primary key (sensor_id, ts) doubles as the index for the analyses'
    # only query shape: some sensors over a time window.
    op.create_table(
        "readings",
        sa.Column("sensor_id", sa.Text, nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("value", sa.Float(precision=53), nullable=False),
        sa.PrimaryKeyConstraint("sensor_id", "ts", name="pk_readings"),
    )


def downgrade() -> None:
    op.drop_table("readings")
