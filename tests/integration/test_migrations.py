"""Alembic migrations and the schema check, each test on a fresh scratch database."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from supervisor import access, config, db, schema, store
from supervisor.errors import DatabaseUnavailable, SchemaOutOfDate

REPOSITORY = Path(__file__).resolve().parents[2]
TABLES_AT_HEAD = {"alembic_version", "jobs", "job_events", "job_results", "supervisors", "readings", "job_limits"}

SNAPSHOT_QUERIES = {
    "tables": "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    "columns": (
        "SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity "
        "FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> 'alembic_version' "
        "ORDER BY 1, 2"
    ),
    "indexes": (
        "SELECT tablename, indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = 'public' AND tablename <> 'alembic_version' ORDER BY 1, 2"
    ),
    "constraints": (
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> 'alembic_version' "
        "ORDER BY 1, 2"
    ),
}


@pytest.fixture
def fresh_url(scratch_databases) -> str:
    """URL of a new, empty database."""
    return scratch_databases.create("analysis_migrations")


@pytest.fixture
def fresh_engine(fresh_url):
    engine = db.create_engine(fresh_url, pool_size=2)
    yield engine
    engine.dispose()


def snapshot(engine: sa.Engine, part: str) -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.text(SNAPSHOT_QUERIES[part]))]


def table_names(engine: sa.Engine) -> set[str]:
    return {row[0] for row in snapshot(engine, "tables")}


def count_jobs(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()


@pytest.fixture
def created_engine(scratch_databases):
    """Engine of a database built by ``metadata.create_all`` instead of migrations."""
    engine = db.create_engine(scratch_databases.create("analysis_create_all"), pool_size=2)
    schema.metadata.create_all(engine)
    yield engine
    engine.dispose()


# Upgrade and downgrade ---------------------------------------------------


def test_upgrade_reaches_head(fresh_url, fresh_engine):
    assert db.current_revision(fresh_engine) is None

    db.upgrade(fresh_url)

    assert db.current_revision(fresh_engine) == db.head_revision()
    assert table_names(fresh_engine) == TABLES_AT_HEAD


def test_upgrade_twice_changes_nothing(fresh_url, fresh_engine):
    db.upgrade(fresh_url)
    before = {part: snapshot(fresh_engine, part) for part in SNAPSHOT_QUERIES}

    db.upgrade(fresh_url)

    assert db.current_revision(fresh_engine) == db.head_revision()
    for part in SNAPSHOT_QUERIES:
        assert snapshot(fresh_engine, part) == before[part], part


def test_upgrade_concurrent_runs_both_succeed(fresh_url, fresh_engine):
    # env.py serialises upgrades with an advisory lock, so two supervisors
    # starting against a fresh database do not both create the tables.
    # Separate processes, because alembic keeps its migration context in
    # module globals that two threads of one process would share.
    command = [sys.executable, "-c", "import sys; from supervisor import db; db.upgrade(sys.argv[1])", fresh_url]
    processes = [
        subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]

    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    assert db.current_revision(fresh_engine) == db.head_revision()


def test_migrated_schema_matches_metadata(fresh_url, fresh_engine):
    db.upgrade(fresh_url)

    with fresh_engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        differences = compare_metadata(context, schema.metadata)

    assert differences == []


# compare_metadata skips CHECK constraints and index predicates, so these
# compare the catalog of a migrated database with one built by create_all.


def test_migrated_columns_match_create_all(fresh_url, fresh_engine, created_engine):
    db.upgrade(fresh_url)

    assert snapshot(fresh_engine, "columns") == snapshot(created_engine, "columns")


def test_migrated_indexes_match_create_all(fresh_url, fresh_engine, created_engine):
    db.upgrade(fresh_url)

    assert snapshot(fresh_engine, "indexes") == snapshot(created_engine, "indexes")


def test_migrated_constraints_match_create_all(fresh_url, fresh_engine, created_engine):
    db.upgrade(fresh_url)

    assert snapshot(fresh_engine, "constraints") == snapshot(created_engine, "constraints")


def test_downgrade_to_base_drops_tables(fresh_url, fresh_engine):
    db.upgrade(fresh_url)

    db.downgrade(fresh_url, "base")

    # Alembic keeps its own version table, emptied.
    assert table_names(fresh_engine) == {"alembic_version"}
    assert db.current_revision(fresh_engine) is None


def test_downgrade_to_0002_keeps_jobs(fresh_url, fresh_engine):
    db.upgrade(fresh_url)
    with fresh_engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO jobs (analysis, params, submitted_by, max_attempts, priority) "
                                   "VALUES ('noop', '{}', 'ana', 1, 5)"))

    db.downgrade(fresh_url, "0002")

    assert db.current_revision(fresh_engine) == "0002"
    assert table_names(fresh_engine) == TABLES_AT_HEAD - {"job_limits"}
    db.upgrade(fresh_url)
    with fresh_engine.connect() as connection:
        # The upgrade gives existing jobs the key a submit would have given them.
        key, created = connection.execute(sa.text(
            "SELECT queue_key, EXTRACT(EPOCH FROM created_at) FROM jobs")).one()
    assert key == pytest.approx(float(created) - 5 * store.PRIORITY_STEP_SECONDS)


def test_downgrade_to_0001_drops_readings(fresh_url, fresh_engine):
    db.upgrade(fresh_url)

    db.downgrade(fresh_url, "0001")

    assert db.current_revision(fresh_engine) == "0001"
    assert table_names(fresh_engine) == TABLES_AT_HEAD - {"readings", "job_limits"}


def test_upgrade_after_downgrade_restores_schema(fresh_url, fresh_engine):
    db.upgrade(fresh_url)
    before = {part: snapshot(fresh_engine, part) for part in SNAPSHOT_QUERIES}
    db.downgrade(fresh_url, "base")

    db.upgrade(fresh_url)

    for part in SNAPSHOT_QUERIES:
        assert snapshot(fresh_engine, part) == before[part], part


# Schema check ----------------------------------------------------------------


def test_check_schema_at_head_passes(fresh_url, fresh_engine):
    db.upgrade(fresh_url)

    db.check_schema(fresh_engine)


def test_check_schema_empty_database_raises(fresh_engine):
    with pytest.raises(SchemaOutOfDate) as caught:
        db.check_schema(fresh_engine)

    assert "analysisctl db upgrade" in caught.value.message
    assert "has no job tables" in caught.value.message


def test_check_schema_behind_head_raises(fresh_url, fresh_engine):
    db.upgrade(fresh_url, "0001")

    with pytest.raises(SchemaOutOfDate) as caught:
        db.check_schema(fresh_engine)

    assert "analysisctl db upgrade" in caught.value.message
    assert "revision 0001" in caught.value.message
    assert f"needs {db.head_revision()}" in caught.value.message


def test_check_schema_unknown_revision_raises(fresh_url, fresh_engine):
    db.upgrade(fresh_url)
    with fresh_engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))

    with pytest.raises(SchemaOutOfDate) as caught:
        db.check_schema(fresh_engine)

    assert "9999" in caught.value.message
    assert "upgrade analysis-jobs" in caught.value.message


def test_check_schema_unreachable_server_raises():
    # Port 1 on loopback: nothing listens there, so the connection is refused.
    engine = db.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/postgres", pool_size=1)
    try:
        with pytest.raises(DatabaseUnavailable) as caught:
            db.check_schema(engine)
    finally:
        engine.dispose()

    assert "127.0.0.1:1" in caught.value.message


def test_connect_checks_schema(fresh_url, tmp_path):
    settings = config.load({"ANALYSIS_DATABASE_URL": fresh_url, "ANALYSIS_DATA_DIR": str(tmp_path)})

    # db.connect leaks a connection here (see the next test). Collecting it
    # inside this block keeps its ResourceWarning from failing a later test.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with pytest.raises(SchemaOutOfDate):
            db.connect(settings)
        gc.collect()


def test_connect_failed_check_closes_connection(fresh_url, tmp_path):
    settings = config.load({"ANALYSIS_DATABASE_URL": fresh_url, "ANALYSIS_DATA_DIR": str(tmp_path)})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SchemaOutOfDate):
            db.connect(settings)
        gc.collect()

    leaks = [str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning)]
    assert leaks == []


def test_migrations_have_single_head():
    # Two migrations written against the same parent give two heads, and
    # `upgrade head` then fails.
    script = ScriptDirectory.from_config(db.alembic_config("postgresql+psycopg://"))

    assert script.get_heads() == [db.head_revision()]


# The active-key index ----------------------------------------------------------


def test_active_key_index_rejects_second_active_job(fresh_url, fresh_engine):
    db.upgrade(fresh_url)
    insert = sa.text(
        "INSERT INTO jobs (analysis, params, job_key, submitted_by, max_attempts) "
        "VALUES ('noop', '{}'::jsonb, 'K', 'alice', 1)"
    )
    with fresh_engine.begin() as connection:
        connection.execute(insert)

    with pytest.raises(sa.exc.IntegrityError) as caught, fresh_engine.begin() as connection:
        connection.execute(insert)

    assert isinstance(caught.value.orig, psycopg.errors.UniqueViolation)
    assert "uq_jobs_active_key" in str(caught.value.orig)


def test_without_active_key_index_duplicates_insert(fresh_url, fresh_engine):
    # Nothing but the index (no trigger, no other constraint) keeps keys unique.
    db.upgrade(fresh_url)
    insert = sa.text(
        "INSERT INTO jobs (analysis, params, job_key, submitted_by, max_attempts) "
        "VALUES ('noop', '{}'::jsonb, 'K', 'alice', 1)"
    )
    with fresh_engine.begin() as connection:
        connection.execute(sa.text("DROP INDEX uq_jobs_active_key"))

    with fresh_engine.begin() as connection:
        connection.execute(insert)
        connection.execute(insert)

    assert count_jobs(fresh_engine) == 2


def test_without_active_key_index_submit_fails(fresh_url, fresh_engine):
    # submit's INSERT ... ON CONFLICT names the index's column and predicate as
    # its arbiter. Without the index Postgres rejects the statement, so there is
    # no code path that would insert duplicates instead.
    db.upgrade(fresh_url)
    with fresh_engine.begin() as connection:
        connection.execute(sa.text("DROP INDEX uq_jobs_active_key"))
    errors, ids = [], []
    barrier = threading.Barrier(20)

    def submit_one():
        barrier.wait()
        try:
            ids.append(store.submit(fresh_engine, "noop", {}, user="alice", key="K").job.id)
        except sa.exc.DBAPIError as error:
            errors.append(error)

    threads = [threading.Thread(target=submit_one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert ids == []
    assert len(errors) == 20
    for error in errors:
        assert isinstance(error.orig, psycopg.errors.InvalidColumnReference), error
    assert count_jobs(fresh_engine) == 0


def test_active_key_index_makes_waiter_deduplicate(fresh_url, fresh_engine):
    # An open transaction has inserted a job with key K. A second submit with
    # K must wait on the index entry instead of inserting, and return that
    # job once the first transaction commits.
    db.upgrade(fresh_url)
    holder = fresh_engine.connect()
    transaction = holder.begin()
    held_id = store.submit(holder, "noop", {}, user="alice", key="K").job.id
    outcome = {}

    def submit_concurrently():
        outcome["result"] = store.submit(fresh_engine, "noop", {}, user="bob", key="K")

    thread = threading.Thread(target=submit_concurrently)
    thread.start()
    try:
        waiting = wait_for_lock_waiter(fresh_engine, timeout=20)
    finally:
        transaction.commit()
        holder.close()
        thread.join(timeout=20)

    assert waiting, "the second submit never waited for the open transaction"
    assert not thread.is_alive()
    assert outcome["result"].deduplicated
    assert outcome["result"].job.id == held_id
    assert count_jobs(fresh_engine) == 1


def wait_for_lock_waiter(engine: sa.Engine, timeout: float) -> bool:
    """Return True once a session of this database waits on a lock, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            waiters = connection.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        if waiters:
            return True
        time.sleep(0.02)
    return False


# Roles and row-level security (0004) ---------------------------------------------------

POLICY_COUNT = "SELECT count(*) FROM pg_policies WHERE tablename IN ('jobs', 'job_events', 'job_results')"


def test_concurrent_upgrades_share_roles(scratch_databases):
    # Roles belong to the cluster: both migrations reach the role creation,
    # and the one that loses the race must carry on.
    urls = [scratch_databases.create("analysis_roles") for _ in range(2)]
    command = [sys.executable, "-c", "import sys; from supervisor import db; db.upgrade(sys.argv[1])"]
    processes = [subprocess.Popen([*command, url], cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for url in urls]
    outputs = [process.communicate(timeout=120) for process in processes]

    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    for url in urls:
        engine = db.create_engine(url, pool_size=1)
        try:
            with engine.connect() as connection:
                roles = connection.execute(sa.text(
                    "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(:names) ORDER BY 1"),
                    {"names": list(access.ROLES)}).all()
                assert connection.execute(sa.text(POLICY_COUNT)).scalar_one() == 15
        finally:
            engine.dispose()
        assert roles == [(name, False) for name in sorted(access.ROLES)]


def test_downgrade_to_0003_keeps_roles_and_drops_access(fresh_url, fresh_engine):
    db.upgrade(fresh_url)
    with fresh_engine.begin() as connection:
        for scope in ("", "alice", "bob"):
            connection.execute(sa.text(
                "INSERT INTO jobs (analysis, params, job_key, key_scope, submitted_by, max_attempts) "
                "VALUES ('noop', '{}', 'K', :scope, 'ana', 1)"), {"scope": scope})

    db.downgrade(fresh_url, "0003")

    with fresh_engine.connect() as connection:
        assert connection.execute(sa.text(POLICY_COUNT)).scalar_one() == 0
        assert not connection.execute(sa.text(
            "SELECT relrowsecurity FROM pg_class WHERE relname = 'jobs'")).scalar_one()
        assert not connection.execute(sa.text(
            "SELECT has_table_privilege(:role, 'jobs', 'SELECT')"), {"role": access.ANALYST_ROLE}).scalar_one()
        assert connection.execute(sa.text(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY(:names)"), {"names": list(access.ROLES)}
        ).scalar_one() == 3
        # The restored index allows one active job per key: the newest keeps it.
        assert connection.execute(sa.text("SELECT id, job_key FROM jobs ORDER BY id")).all() == [
            (1, None), (2, None), (3, "K")]
    db.upgrade(fresh_url)
    with fresh_engine.connect() as connection:
        assert connection.execute(sa.text(POLICY_COUNT)).scalar_one() == 15
