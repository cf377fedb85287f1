"""Create the job store: jobs, job_events, job_results and supervisors.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("analysis", sa.Text, nullable=False),
        sa.Column("params", pg.JSONB, nullable=False),
        sa.Column("job_key", sa.Text),
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("submitted_by", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=NOW),
        sa.Column("updated_at", TS, nullable=False, server_default=NOW),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("run_after", TS, nullable=False, server_default=NOW),
        sa.Column("start_by", TS),
        sa.Column("timeout_seconds", sa.Float),
        sa.Column("lease_owner", pg.UUID(as_uuid=True)),
        sa.Column("lease_expires_at", TS),
        sa.Column("attempt_token", pg.UUID(as_uuid=True)),
        sa.Column("cancel_requested_at", TS),
        sa.Column("cancel_requested_by", sa.Text),
        sa.Column("progress_phase", sa.Text),
        sa.Column("progress_completed", sa.BigInteger),
        sa.Column("progress_total", sa.BigInteger),
        sa.Column("progress_message", sa.Text),
        sa.Column("progress_rate", sa.Float),
        sa.Column("progress_eta_seconds", sa.Float),
        sa.Column("progress_updated_at", TS),
        sa.Column("error", pg.JSONB),
        sa.Column("result", pg.JSONB),
        sa.Column("results_expire_at", TS),
        sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired')",
            name=op.f("ck_jobs_status"),
        ),
        sa.CheckConstraint(
            "max_attempts >= 1 AND attempt >= 0 AND attempt <= max_attempts", name=op.f("ck_jobs_attempts")
        ),
        sa.CheckConstraint(
            "(status = 'running') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL "
            "AND attempt_token IS NOT NULL)",
            name=op.f("ck_jobs_lease"),
        ),
        sa.CheckConstraint("(status IN ('queued', 'running')) = (finished_at IS NULL)", name=op.f("ck_jobs_finished")),
        sa.CheckConstraint("priority BETWEEN -1000 AND 1000", name=op.f("ck_jobs_priority")),
        sa.CheckConstraint("timeout_seconds IS NULL OR timeout_seconds > 0", name=op.f("ck_jobs_timeout")),
    )
    op.create_index(
        "uq_jobs_active_key", "jobs", ["job_key"], unique=True,
        postgresql_where=sa.text("job_key IS NOT NULL AND status IN ('queued', 'running')"),
    )
    op.create_index("ix_jobs_claim", "jobs", [sa.text("priority DESC"), "id"],
                    postgresql_where=sa.text("status = 'queued'"))
    op.create_index("ix_jobs_status_id", "jobs", ["status", sa.text("id DESC")])
    op.create_index("ix_jobs_analysis_id", "jobs", ["analysis", sa.text("id DESC")])
    op.create_index("ix_jobs_submitted_by_id", "jobs", ["submitted_by", sa.text("id DESC")])
    op.create_index("ix_jobs_lease", "jobs", ["lease_expires_at"], postgresql_where=sa.text("status = 'running'"))
    op.create_index("ix_jobs_results_expiry", "jobs", ["results_expire_at"],
                    postgresql_where=sa.text("status = 'succeeded'"))
    op.create_index("ix_jobs_start_by", "jobs", ["start_by"],
                    postgresql_where=sa.text("status = 'queued' AND start_by IS NOT NULL"))
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"],
                    postgresql_where=sa.text("finished_at IS NOT NULL"))

    op.create_table(
        "job_events",
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("payload", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("created_at", TS, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("job_id", "seq", name="pk_job_events"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE", name="fk_job_events_job_id_jobs"),
    )

    op.create_table(
        "job_results",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("value", pg.JSONB),
        sa.Column("path", sa.Text),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("sha256", sa.Text),
        sa.Column("format", sa.Text),
        sa.Column("created_at", TS, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name="pk_job_results"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE", name="fk_job_results_job_id_jobs"),
        sa.UniqueConstraint("job_id", "name", name="uq_job_results_job_id_name"),
        sa.CheckConstraint(
            "(kind = 'inline' AND value IS NOT NULL AND path IS NULL) OR "
            "(kind = 'file' AND path IS NOT NULL AND size_bytes IS NOT NULL AND sha256 IS NOT NULL)",
            name=op.f("ck_job_results_kind"),
        ),
    )

    op.create_table(
        "supervisors",
        sa.Column("id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("started_at", TS, nullable=False, server_default=NOW),
        sa.Column("heartbeat_at", TS, nullable=False, server_default=NOW),
        sa.Column("stopped_at", TS),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("throttle", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.PrimaryKeyConstraint("id", name="pk_supervisors"),
    )


def downgrade() -> None:
    op.drop_table("supervisors")
    op.drop_table("job_results")
    op.drop_table("job_events")
    op.drop_table("jobs")
