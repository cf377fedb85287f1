"""Table definitions of the job store, as SQLAlchemy Core metadata.

Migrations in ``migrations/versions`` create these tables; a test checks that
upgrading to head yields exactly this metadata. Change both together.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from supervisor.transitions import Status

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

STATUS_VALUES = ", ".join(f"'{status}'" for status in Status)
TS = sa.DateTime(timezone=True)
NOW = sa.text("now()")

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("analysis", sa.Text, nullable=False),
    sa.Column("params", pg.JSONB, nullable=False),
    # Set at submit; unique within its key_scope among queued and running
    # jobs (uq_jobs_active_key).
    sa.Column("job_key", sa.Text),
    sa.Column("status", sa.Text, nullable=False, server_default="queued"),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("submitted_by", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=NOW),
    sa.Column("updated_at", TS, nullable=False, server_default=NOW),
    # When the latest attempt reached a worker process (written with the
    # supervisor's next batch); NULL while a claimed job waits in a
    # supervisor's prefetch queue. Kept after the job finishes.
    sa.Column("started_at", TS),
    sa.Column("finished_at", TS),
    # Incremented by each claim; a shutdown requeue gives the attempt back.
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    # Not claimable before this time: retry backoff.
    sa.Column("run_after", TS, nullable=False, server_default=NOW),
    # A queued job still waiting at this time expires.
    sa.Column("start_by", TS),
    sa.Column("timeout_seconds", sa.Float),
    # Set while running: the claiming supervisor, its lease and the run's token.
    # Every write about a run names the token, so a stale run changes nothing.
    sa.Column("lease_owner", pg.UUID(as_uuid=True)),
    sa.Column("lease_expires_at", TS),
    sa.Column("attempt_token", pg.UUID(as_uuid=True)),
    sa.Column("cancel_requested_at", TS),
    sa.Column("cancel_requested_by", sa.Text),
    # Latest progress snapshot of the current attempt; reset by each claim.
    sa.Column("progress_phase", sa.Text),
    sa.Column("progress_completed", sa.BigInteger),
    sa.Column("progress_total", sa.BigInteger),
    sa.Column("progress_message", sa.Text),
    sa.Column("progress_rate", sa.Float),
    sa.Column("progress_eta_seconds", sa.Float),
    sa.Column("progress_updated_at", TS),
    # The last attempt's error: {code, message, details, traceback, attempt, at}.
    sa.Column("error", pg.JSONB),
    # The body's JSON summary; kept when the results expire.
    sa.Column("result", pg.JSONB),
    sa.Column("results_expire_at", TS),
    # Sequence number of the job's latest event; events are numbered 1, 2, ...
    sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"),
    # Claim order within one user's jobs of one analysis: the submit time in
    # epoch seconds, less store.PRIORITY_STEP_SECONDS per point of priority. A
    # waiting job thus overtakes newer jobs of higher priority once it has
    # waited long enough (aging), and the order never changes after submit.
    sa.Column("queue_key", sa.Float(precision=53), nullable=False,
              server_default=sa.text("EXTRACT(EPOCH FROM now())")),
    # Runs of this job that ended with its worker killed (worker_died,
    # memory_limit); the crash budget quarantines the job at a limit.
    sa.Column("crashes", sa.Integer, nullable=False, server_default="0"),
    # Resident memory the job's processes may grow by, in MiB; NULL: no limit.
    sa.Column("memory_limit_mib", sa.Integer),
    # Where job_key deduplicates, set at submit. It is '' for jobs submitted
    # by superusers, the table owner and operators, who can read every job,
    # and the submitting user for an analyst's job, since an analyst can read
    # only its own.
    sa.Column("key_scope", sa.Text, nullable=False, server_default=""),
    sa.CheckConstraint(f"status IN ({STATUS_VALUES})", name="status"),
    sa.CheckConstraint("max_attempts >= 1 AND attempt >= 0 AND attempt <= max_attempts", name="attempts"),
    sa.CheckConstraint(
        "(status = 'running') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL "
        "AND attempt_token IS NOT NULL)",
        name="lease",
    ),
    sa.CheckConstraint(
        "(status IN ('queued', 'running')) = (finished_at IS NULL)",
        name="finished",
    ),
    sa.CheckConstraint("priority BETWEEN -1000 AND 1000", name="priority"),
    sa.CheckConstraint("timeout_seconds IS NULL OR timeout_seconds > 0", name="timeout"),
    # store.submit checks this too. The constraint covers rows that clients insert directly.
    sa.CheckConstraint("jsonb_typeof(params) = 'object'", name="params"),
    sa.CheckConstraint("crashes >= 0", name="crashes"),
    sa.CheckConstraint("memory_limit_mib IS NULL OR memory_limit_mib > 0", name="memory_limit"),
    sa.Index(
        "uq_jobs_active_key", "job_key", "key_scope", unique=True,
        postgresql_where=sa.text("job_key IS NOT NULL AND status IN ('queued', 'running')"),
    ),
    # The claim query walks these small indices of queued and running jobs
    # only, so millions of finished rows cost it nothing.
    sa.Index("ix_jobs_queue", "submitted_by", "analysis", "queue_key", postgresql_where=sa.text("status = 'queued'")),
    sa.Index("ix_jobs_running_owner", "submitted_by", "analysis", postgresql_where=sa.text("status = 'running'")),
    sa.Index("ix_jobs_status_id", "status", sa.text("id DESC")),
    sa.Index("ix_jobs_analysis_id", "analysis", sa.text("id DESC")),
    sa.Index("ix_jobs_submitted_by_id", "submitted_by", sa.text("id DESC")),
    sa.Index("ix_jobs_lease", "lease_expires_at", postgresql_where=sa.text("status = 'running'")),
    sa.Index("ix_jobs_results_expiry", "results_expire_at", postgresql_where=sa.text("status = 'succeeded'")),
    sa.Index("ix_jobs_start_by", "start_by", postgresql_where=sa.text("status = 'queued' AND start_by IS NOT NULL")),
    sa.Index("ix_jobs_finished_at", "finished_at", postgresql_where=sa.text("finished_at IS NOT NULL")),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("job_id", sa.BigInteger, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("payload", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("created_at", TS, nullable=False, server_default=NOW),
)

job_results = sa.Table(
    "job_results",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("job_id", sa.BigInteger, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("value", pg.JSONB),
    sa.Column("path", sa.Text),
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("sha256", sa.Text),
    sa.Column("format", sa.Text),
    sa.Column("created_at", TS, nullable=False, server_default=NOW),
    sa.CheckConstraint(
        "(kind = 'inline' AND value IS NOT NULL AND path IS NULL) OR "
        "(kind = 'file' AND path IS NOT NULL AND size_bytes IS NOT NULL AND sha256 IS NOT NULL)",
        name="kind",
    ),
    sa.UniqueConstraint("job_id", "name"),
)

supervisors = sa.Table(
    "supervisors",
    metadata,
    # A fresh id per supervisor run: a restarted supervisor never adopts the
    # leases of its previous life.
    sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("started_at", TS, nullable=False, server_default=NOW),
    sa.Column("heartbeat_at", TS, nullable=False, server_default=NOW),
    sa.Column("stopped_at", TS),
    sa.Column("slots", sa.Integer, nullable=False),
    # {"state": "running" | "throttled", "reason": ..., "readings": {...}}
    sa.Column("throttle", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
)

# Concurrency limits enforced by the claim query: at most max_running running
# jobs per submitting user (scope 'user') or per analysis (scope 'analysis').
# The name '*' sets the default for every user or analysis without a row of
# its own; no row at all means no limit.
job_limits = sa.Table(
    "job_limits",
    metadata,
    sa.Column("scope", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("max_running", sa.Integer, nullable=False),
    sa.Column("updated_at", TS, nullable=False, server_default=NOW),
    sa.CheckConstraint("scope IN ('user', 'analysis')", name="scope"),
    sa.CheckConstraint("max_running >= 0", name="max_running"),
)

readings = sa.Table(
    "readings",
    metadata,
    sa.Column("sensor_id", sa.Text, primary_key=True),
    sa.Column("ts", TS, primary_key=True),
    sa.Column("value", sa.Float(precision=53), nullable=False),
)
