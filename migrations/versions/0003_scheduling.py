"""Fair scheduling: queue order with aging, concurrency limits, crash counts, memory limits.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Each point of priority counts as this many seconds of waiting. The value is
# copied here rather than imported, so this migration keeps doing what it did
# when the constant in supervisor/store.py changes.
PRIORITY_STEP_SECONDS = 60


def upgrade() -> None:
    op.add_column("jobs", sa.Column("queue_key", sa.Float(precision=53)))
    op.execute(
        f"UPDATE jobs SET queue_key = EXTRACT(EPOCH FROM created_at) - priority * {PRIORITY_STEP_SECONDS}"
    )
    # The store sets the key at submit; the default serves rows inserted
    # otherwise (priority 0 at insert time).
    op.alter_column("jobs", "queue_key", nullable=False, server_default=sa.text("EXTRACT(EPOCH FROM now())"))
    op.add_column("jobs", sa.Column("crashes", sa.Integer, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("memory_limit_mib", sa.Integer))
    op.create_check_constraint(op.f("ck_jobs_crashes"), "jobs", "crashes >= 0")
    op.create_check_constraint(op.f("ck_jobs_memory_limit"), "jobs",
                               "memory_limit_mib IS NULL OR memory_limit_mib > 0")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.create_index("ix_jobs_queue", "jobs", ["submitted_by", "analysis", "queue_key"],
                    postgresql_where=sa.text("status = 'queued'"))
    op.create_index("ix_jobs_running_owner", "jobs", ["submitted_by", "analysis"],
                    postgresql_where=sa.text("status = 'running'"))

    op.create_table(
        "job_limits",
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("max_running", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("scope", "name", name="pk_job_limits"),
        sa.CheckConstraint("scope IN ('user', 'analysis')", name=op.f("ck_job_limits_scope")),
        sa.CheckConstraint("max_running >= 0", name=op.f("ck_job_limits_max_running")),
    )


def downgrade() -> None:
    op.drop_table("job_limits")
    op.drop_index("ix_jobs_running_owner", table_name="jobs")
    op.drop_index("ix_jobs_queue", table_name="jobs")
    op.create_index("ix_jobs_claim", "jobs", [sa.text("priority DESC"), "id"],
                    postgresql_where=sa.text("status = 'queued'"))
    op.drop_constraint(op.f("ck_jobs_memory_limit"), "jobs", type_="check")
    op.drop_constraint(op.f("ck_jobs_crashes"), "jobs", type_="check")
    op.drop_column("jobs", "memory_limit_mib")
    op.drop_column("jobs", "crashes")
    op.drop_column("jobs", "queue_key")
