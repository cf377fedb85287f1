"""A claim inside the batch transaction must not leave runs behind when that transaction fails to commit."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from supervisor import runs, store
from tests.integration.supervisor_harness import wait_for

# A deferred constraint trigger runs at COMMIT. This one ends its own server
# process when the committing transaction moved a job from queued to
# running. To the supervisor that looks like a connection lost during the
# batch commit, because the claim's UPDATE ran and the commit did not.
INSTALL_COMMIT_FAILURE = [
    """
    CREATE FUNCTION test_fail_claim_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_terminate_backend(pg_backend_pid());
        PERFORM pg_sleep(5);
        RETURN NULL;
    END $$
    """,
    """
    CREATE CONSTRAINT TRIGGER test_fail_claim_commit AFTER UPDATE ON jobs
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.status = 'queued' AND NEW.status = 'running')
    EXECUTE FUNCTION test_fail_claim_commit()
    """,
]
REMOVE_COMMIT_FAILURE = [
    "DROP TRIGGER IF EXISTS test_fail_claim_commit ON jobs",
    "DROP FUNCTION IF EXISTS test_fail_claim_commit()",
]


def execute_all(engine: sa.Engine, statements: list[str]) -> None:
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(sa.text(statement))


@pytest.fixture
def failing_claim_commit(engine):
    """Make every commit that claims a job fail until the test ends."""
    execute_all(engine, INSTALL_COMMIT_FAILURE)
    yield
    execute_all(engine, REMOVE_COMMIT_FAILURE)


def test_failed_batch_commit_keeps_no_claimed_runs(engine, local_supervisor, request):
    supervisor = local_supervisor
    busy = store.submit(engine, "noop", {"steps": 50, "step_seconds": 0.1}, user="tester").job.id
    wait_for(lambda: supervisor.pool.running() or supervisor.tick(time.monotonic()), 30, "the first job to start")
    assert busy in supervisor.runs

    # With the only worker busy and short recent runs, the next claim
    # prefetches inside the batch transaction (write_and_claim).
    waiting = store.submit(engine, "noop", {"steps": 1}, user="tester").job.id
    supervisor.recent_run_seconds = 0.001
    supervisor.wake_claim = True
    assert supervisor.pool.free_slots() == []
    assert supervisor.claim_limit() > 0
    request.getfixturevalue("failing_claim_commit")

    with pytest.raises(sa.exc.OperationalError):
        supervisor.write_and_claim()

    # The claim was rolled back with its transaction, so the job is still
    # queued for any supervisor to claim. A run kept in memory would be
    # dispatched once the worker is free, without a lease: the job would
    # then run twice at once if another supervisor claimed it meanwhile.
    assert store.get_job(engine, waiting).status == "queued"
    assert waiting not in supervisor.runs
    assert [run.job.id for run, _ in supervisor.ready] == []


def test_unconfirmed_claim_given_back_with_attempt(engine, local_supervisor):
    supervisor = local_supervisor
    job_id = store.submit(engine, "noop", {"steps": 1}, user="tester").job.id
    # A claim that committed on the server while its reply was lost: the job
    # runs under this supervisor's lease, with its start recorded, but the
    # supervisor never learned of it.
    [lost] = runs.claim_jobs(engine, supervisor.id, 1, lease_seconds=300, starting=1)
    assert lost.started_at is not None
    supervisor.claims_unconfirmed = True

    supervisor.release_unconfirmed_claims()

    job = store.get_job(engine, job_id)
    assert job.status == "queued"
    assert job.attempt == 0
    assert supervisor.claims_unconfirmed is False
    finished = wait_for(lambda: finished_job(engine, supervisor, job_id), 30, "the job to run again")
    assert finished.status == "succeeded"
    assert finished.attempt == 1


def test_failed_claim_closes_claim_connection(engine, local_supervisor):
    supervisor = local_supervisor
    connection = supervisor.open_claim_connection()
    store.submit(engine, "noop", {"steps": 1}, user="tester")
    with engine.begin() as admin:
        admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": connection.info.backend_pid})

    with pytest.raises(sa.exc.OperationalError):
        supervisor.claim(1)

    assert supervisor.claims_unconfirmed is True
    assert supervisor.claim_connection is None
    assert supervisor.open_claim_connection() is not connection


def finished_job(engine, supervisor, job_id):
    """Run one pass of the supervisor's loop; return the job once it has ended."""
    supervisor.handle_outcomes(supervisor.pool.wait(timeout=0.05))
    supervisor.tick(time.monotonic())
    job = store.get_job(engine, job_id)
    return job if job.is_terminal else None
