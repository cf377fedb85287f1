"""Access control: group roles, their privileges and row-level security on per-job data.

Three NOLOGIN group roles are created when missing. Login roles get their
privileges by membership, granted by an administrator (see the README):

- analysis_supervisor claims, updates and prunes every job, and reads the
  readings table;
- analysis_operator reads and cancels every job, and may submit jobs for
  another user;
- analysis_analyst submits, reads and cancels only the jobs whose
  submitted_by is its own login name (session_user).

Superusers and the owner of the tables bypass row-level security (it is
enabled, not forced), so single-user setups work as before.

Roles belong to the whole cluster, while grants and policies belong to this
database. The downgrade therefore removes only this database's grants and
policies and keeps the roles, which other databases may use.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The names are copied here rather than imported from supervisor/access.py,
# so this migration keeps doing what it did when that module changes.
SUPERVISOR = "analysis_supervisor"
OPERATOR = "analysis_operator"
ANALYST = "analysis_analyst"
ROLES = (SUPERVISOR, OPERATOR, ANALYST)
CLIENTS = f"{OPERATOR}, {ANALYST}"
EVERYONE = f"{SUPERVISOR}, {OPERATOR}, {ANALYST}"

# Columns a client sets when it submits and when it cancels. Everything else
# about a job (lease, attempt, progress, result) only the supervisor writes.
SUBMIT_COLUMNS = ("analysis, params, job_key, key_scope, priority, submitted_by, max_attempts, start_by, "
                  "timeout_seconds, memory_limit_mib, queue_key")
CANCEL_COLUMNS = "status, cancel_requested_at, cancel_requested_by, finished_at, updated_at, error, event_seq"
CLIENT_EVENT_KINDS = "'submitted', 'cancelled', 'cancel_requested'"
# store.PRIORITY_STEP_SECONDS when this migration was written. A client may
# not give its job an earlier queue key than a submit would; one second of
# slack absorbs float rounding.
PRIORITY_STEP_SECONDS = 60
SESSION_USER = "CAST(session_user AS text)"
OWN_JOB = f"submitted_by = {SESSION_USER}"
FAIR_QUEUE_KEY = f"queue_key >= EXTRACT(EPOCH FROM now()) - priority * {PRIORITY_STEP_SECONDS} - 1"
# A client's event must take the sequence number that its own previous
# statement reserved in jobs.event_seq, so it can never occupy a number that
# a later supervisor event needs.
RESERVED_SEQ = "seq = (SELECT jobs.event_seq FROM jobs WHERE jobs.id = job_events.job_id)"


def create_role(name: str) -> None:
    # Two migrations of two databases in one cluster may create the role at
    # the same moment: the loser sees duplicate_object, or unique_violation
    # from the catalog index.
    op.execute(f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{name}') THEN
                CREATE ROLE {name} NOLOGIN;
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END
        $$
    """)


def grant_privileges() -> None:
    op.execute(f"GRANT SELECT ON alembic_version, supervisors, job_limits, readings TO {EVERYONE}")

    op.execute(f"GRANT SELECT, UPDATE, DELETE ON jobs TO {SUPERVISOR}")
    op.execute(f"GRANT SELECT, INSERT ON job_events TO {SUPERVISOR}")
    op.execute(f"GRANT SELECT, INSERT, DELETE ON job_results TO {SUPERVISOR}")
    op.execute(f"GRANT INSERT, UPDATE ON supervisors TO {SUPERVISOR}")

    op.execute(f"GRANT SELECT ON jobs, job_events, job_results TO {CLIENTS}")
    op.execute(f"GRANT INSERT ({SUBMIT_COLUMNS}) ON jobs TO {CLIENTS}")
    op.execute(f"GRANT UPDATE ({CANCEL_COLUMNS}) ON jobs TO {CLIENTS}")
    op.execute(f"GRANT INSERT (job_id, seq, kind, payload) ON job_events TO {CLIENTS}")

    op.execute(f"""
        DO $$
        BEGIN
            EXECUTE format('GRANT USAGE ON SEQUENCE %s TO {CLIENTS}', pg_get_serial_sequence('jobs', 'id'));
            EXECUTE format('GRANT USAGE ON SEQUENCE %s TO {SUPERVISOR}',
                           pg_get_serial_sequence('job_results', 'id'));
        END
        $$
    """)


def revoke_privileges() -> None:
    op.execute(f"""
        DO $$
        BEGIN
            EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM {EVERYONE}', pg_get_serial_sequence('jobs', 'id'));
            EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM {EVERYONE}', pg_get_serial_sequence('job_results', 'id'));
        END
        $$
    """)
    op.execute(f"REVOKE ALL ON alembic_version, jobs, job_events, job_results, supervisors, job_limits, readings "
               f"FROM {EVERYONE}")


def create_policies() -> None:
    for table in ("jobs", "job_events", "job_results"):
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY {table}_supervisor ON {table} TO {SUPERVISOR} USING (true) WITH CHECK (true)")
        op.execute(f"CREATE POLICY {table}_operator_read ON {table} FOR SELECT TO {OPERATOR} USING (true)")

    op.execute(f"CREATE POLICY jobs_operator_submit ON jobs FOR INSERT TO {OPERATOR} WITH CHECK ({FAIR_QUEUE_KEY})")
    op.execute(f"CREATE POLICY jobs_operator_cancel ON jobs FOR UPDATE TO {OPERATOR} USING (true) "
               "WITH CHECK (status IN ('queued', 'running', 'cancelled'))")
    op.execute(f"CREATE POLICY jobs_analyst_read ON jobs FOR SELECT TO {ANALYST} USING ({OWN_JOB})")
    op.execute(f"CREATE POLICY jobs_analyst_submit ON jobs FOR INSERT TO {ANALYST} "
               f"WITH CHECK ({OWN_JOB} AND key_scope = {SESSION_USER} AND {FAIR_QUEUE_KEY})")
    op.execute(f"CREATE POLICY jobs_analyst_cancel ON jobs FOR UPDATE TO {ANALYST} USING ({OWN_JOB}) "
               f"WITH CHECK ({OWN_JOB} AND status IN ('queued', 'running', 'cancelled') "
               f"AND (cancel_requested_by IS NULL OR cancel_requested_by = {SESSION_USER}))")

    # The subqueries on jobs run under the jobs policies of the same role,
    # so an analyst's events and results are those of the jobs it can see.
    visible_job = "EXISTS (SELECT FROM jobs WHERE jobs.id = {table}.job_id)"
    op.execute(f"CREATE POLICY job_events_operator_write ON job_events FOR INSERT TO {OPERATOR} "
               f"WITH CHECK (kind IN ({CLIENT_EVENT_KINDS}) AND {RESERVED_SEQ})")
    op.execute(f"CREATE POLICY job_events_analyst_read ON job_events FOR SELECT TO {ANALYST} "
               f"USING ({visible_job.format(table='job_events')})")
    op.execute(f"CREATE POLICY job_events_analyst_write ON job_events FOR INSERT TO {ANALYST} "
               f"WITH CHECK (kind IN ({CLIENT_EVENT_KINDS}) AND {RESERVED_SEQ})")
    op.execute(f"CREATE POLICY job_results_analyst_read ON job_results FOR SELECT TO {ANALYST} "
               f"USING ({visible_job.format(table='job_results')})")


def drop_policies() -> None:
    names = {
        "jobs": ("supervisor", "operator_read", "operator_submit", "operator_cancel", "analyst_read",
                 "analyst_submit", "analyst_cancel"),
        "job_events": ("supervisor", "operator_read", "operator_write", "analyst_read", "analyst_write"),
        "job_results": ("supervisor", "operator_read", "analyst_read"),
    }
    for table, policies in names.items():
        for policy in policies:
            op.execute(f"DROP POLICY {table}_{policy} ON {table}")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")


def upgrade() -> None:
    for role in ROLES:
        create_role(role)

    # Job keys deduplicate within a scope: '' is shared by superusers, the
    # table owner and operators, who see every job; an analyst's own login
    # name scopes its keys, so its submit never meets a job it cannot see.
    op.add_column("jobs", sa.Column("key_scope", sa.Text, nullable=False, server_default=""))
    op.drop_index("uq_jobs_active_key", table_name="jobs")
    op.create_index("uq_jobs_active_key", "jobs", ["job_key", "key_scope"], unique=True,
                    postgresql_where=sa.text("job_key IS NOT NULL AND status IN ('queued', 'running')"))

    # Clients can insert rows without store.submit, so the table itself
    # rejects parameters that are not a JSON object, as submit does.
    op.create_check_constraint(op.f("ck_jobs_params"), "jobs", "jsonb_typeof(params) = 'object'")

    # Clients may bump event_seq to reserve a number for their event. A
    # decrease or a jump would make a later supervisor event collide or
    # overflow, and fail the claim statement for every job in its batch.
    op.execute("""
        CREATE FUNCTION jobs_check_event_seq() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.event_seq NOT IN (OLD.event_seq, OLD.event_seq + 1) THEN
                RAISE EXCEPTION 'event_seq of job % may only grow by one per update (from % to %)',
                    OLD.id, OLD.event_seq, NEW.event_seq
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END
        $$
    """)
    # The WHEN clause is checked without calling the function, so the
    # supervisor's batch updates pay for the check only when it fails.
    op.execute("CREATE TRIGGER jobs_check_event_seq BEFORE UPDATE OF event_seq ON jobs FOR EACH ROW "
               "WHEN (NEW.event_seq NOT IN (OLD.event_seq, OLD.event_seq + 1)) "
               "EXECUTE FUNCTION jobs_check_event_seq()")

    grant_privileges()
    create_policies()


def downgrade() -> None:
    drop_policies()
    revoke_privileges()
    op.execute("DROP TRIGGER jobs_check_event_seq ON jobs")
    op.execute("DROP FUNCTION jobs_check_event_seq()")
    op.drop_constraint(op.f("ck_jobs_params"), "jobs", type_="check")
    op.drop_index("uq_jobs_active_key", table_name="jobs")
    # Rows that differ only in key_scope would violate the restored index;
    # the newest of each such group keeps its key.
    op.execute("""
        UPDATE jobs SET job_key = NULL WHERE id IN (
            SELECT id FROM (
                SELECT id, row_number() OVER (PARTITION BY job_key ORDER BY id DESC) AS position
                FROM jobs WHERE job_key IS NOT NULL AND status IN ('queued', 'running')
            ) ranked WHERE position > 1
        )
    """)
    op.create_index("uq_jobs_active_key", "jobs", ["job_key"], unique=True,
                    postgresql_where=sa.text("job_key IS NOT NULL AND status IN ('queued', 'running')"))
    op.drop_column("jobs", "key_scope")
