"""Periodic store maintenance: lease recovery, deadline and results expiry, pruning.

Any supervisor may run these. Each statement locks the rows it changes with
``FOR UPDATE SKIP LOCKED`` and handles at most ``SWEEP_BATCH`` of them, so
two supervisors sweeping at once share the work without waiting.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import sqlalchemy as sa

from supervisor.store import SWEEP_BATCH, WORK_CHANNEL, Bind, _notify_change, _transaction, notify
from supervisor.transitions import Status, sources

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Recovered:
    job_id: int
    status: str
    attempt: int
    previous_owner: str | None


_RECOVER = sa.text(
    """
    WITH expired AS (
        SELECT id FROM jobs
        WHERE status = 'running' AND lease_expires_at < now()
        ORDER BY lease_expires_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ), changed AS (
        UPDATE jobs SET
            status = CASE WHEN jobs.cancel_requested_at IS NOT NULL THEN 'cancelled'
                          WHEN jobs.attempt < jobs.max_attempts OR jobs.started_at IS NULL THEN 'queued'
                          ELSE 'failed' END,
            finished_at = CASE WHEN jobs.cancel_requested_at IS NULL
                                    AND (jobs.attempt < jobs.max_attempts OR jobs.started_at IS NULL)
                               THEN NULL ELSE now() END,
            -- A run that never reached a worker (it waited in a prefetch
            -- queue) gives its attempt back.
            attempt = CASE WHEN jobs.started_at IS NULL AND jobs.cancel_requested_at IS NULL
                           THEN jobs.attempt - 1 ELSE jobs.attempt END,
            run_after = now(),
            error = jsonb_build_object(
                'code', 'lease_expired',
                'message', 'the supervisor running this job stopped renewing its lease',
                'details', jsonb_build_object('supervisor', jobs.lease_owner,
                                              'lease_expired_at', jobs.lease_expires_at,
                                              'started', jobs.started_at IS NOT NULL),
                'attempt', jobs.attempt, 'at', now()),
            lease_owner = NULL, lease_expires_at = NULL, attempt_token = NULL,
            updated_at = now(), event_seq = jobs.event_seq + 1
        FROM expired
        WHERE jobs.id = expired.id AND jobs.status = 'running' AND jobs.lease_expires_at < now()
        RETURNING jobs.id, jobs.status, jobs.attempt, jobs.event_seq, jobs.error
    ), events AS (
        INSERT INTO job_events (job_id, seq, kind, payload)
        SELECT id, event_seq, 'lease_expired', jsonb_build_object('status', status, 'error', error)
        FROM changed
    )
    SELECT id, status, attempt, error FROM changed
    """
)


def recover_expired_leases(bind: Bind) -> list[Recovered]:
    """Re-queue running jobs whose lease expired, or fail them when no attempt is left.

    Recovery looks only at the job row's own lease, never at whether its
    supervisor's row exists: a supervisor that died without a trace and one
    that is merely partitioned look the same, and both lose the job.
    """
    recovered: list[Recovered] = []
    with _transaction(bind) as connection:
        rows = connection.execute(_RECOVER, {"limit": SWEEP_BATCH}).all()
        for row in rows:
            owner = row.error.get("details", {}).get("supervisor")
            recovered.append(Recovered(row.id, row.status, row.attempt, owner))
            if row.status == Status.QUEUED:
                notify(connection, WORK_CHANNEL, "queued", row.id)
            _notify_change(connection, row.id, row.status)
    for item in recovered:
        logger.warning(
            "recovered job with expired lease",
            extra={"event": "lease_recovered", "job_id": item.job_id, "status": item.status,
                   "attempt": item.attempt, "previous_supervisor": item.previous_owner},
        )
    return recovered


def expire_jobs(bind: Bind) -> dict[str, Any]:
    """Expire queued jobs past their start-by deadline and succeeded jobs past their results expiry.

    Returns the expired job ids by reason and the result file paths whose
    index rows were removed; the caller deletes those files.
    """
    with _transaction(bind) as connection:
        deadline_rows = connection.execute(
            sa.text(
                """
                WITH late AS (
                    SELECT id FROM jobs WHERE status = 'queued' AND start_by < now()
                    LIMIT :limit FOR UPDATE SKIP LOCKED
                ), changed AS (
                    UPDATE jobs SET status = 'expired', finished_at = now(), updated_at = now(),
                        error = jsonb_build_object('code', 'expired',
                            'message', 'the job was not started before its start-by deadline',
                            'details', jsonb_build_object('start_by', jobs.start_by)),
                        event_seq = jobs.event_seq + 1
                    FROM late WHERE jobs.id = late.id AND jobs.status = ANY(:sources)
                    RETURNING jobs.id, jobs.event_seq
                ), events AS (
                    INSERT INTO job_events (job_id, seq, kind, payload)
                    SELECT id, event_seq, 'expired', '{"reason": "start_by"}'::jsonb FROM changed
                )
                SELECT id FROM changed
                """
            ),
            {"limit": SWEEP_BATCH, "sources": sources(Status.EXPIRED)},
        ).all()
        results_rows = connection.execute(
            sa.text(
                """
                WITH old AS (
                    SELECT id FROM jobs WHERE status = 'succeeded' AND results_expire_at < now()
                    LIMIT :limit FOR UPDATE SKIP LOCKED
                ), changed AS (
                    UPDATE jobs SET status = 'expired', updated_at = now(), event_seq = jobs.event_seq + 1
                    FROM old WHERE jobs.id = old.id AND jobs.status = 'succeeded'
                    RETURNING jobs.id, jobs.event_seq
                ), events AS (
                    INSERT INTO job_events (job_id, seq, kind, payload)
                    SELECT id, event_seq, 'expired', '{"reason": "results_expired"}'::jsonb FROM changed
                )
                SELECT id FROM changed
                """
            ),
            {"limit": SWEEP_BATCH},
        ).all()
        expired_results = [row.id for row in results_rows]
        paths = []
        if expired_results:
            paths = connection.execute(
                sa.text("DELETE FROM job_results WHERE job_id = ANY(:ids) RETURNING path"),
                {"ids": expired_results},
            ).scalars().all()
        for row in [*deadline_rows, *results_rows]:
            _notify_change(connection, row.id, Status.EXPIRED)
    return {
        "start_by": [row.id for row in deadline_rows],
        "results": expired_results,
        "files": [path for path in paths if path],
    }


def prune_jobs(bind: Bind, *, older_than_seconds: float, batch_size: int = 1000) -> dict[str, Any]:
    """Delete finished jobs that ended more than ``older_than_seconds`` ago, in batches.

    Each batch is its own short transaction, so pruning millions of rows never
    holds many locks or one long transaction. Returns the count and the
    result file paths of the deleted jobs, which the caller deletes.
    """
    deleted = 0
    files: list[str] = []
    while True:
        with _transaction(bind) as connection:
            ids = connection.execute(
                sa.text(
                    "SELECT id FROM jobs WHERE finished_at < now() - make_interval(secs => :age) "
                    "AND status NOT IN ('queued', 'running') ORDER BY finished_at LIMIT :batch "
                    "FOR UPDATE SKIP LOCKED"
                ),
                {"age": older_than_seconds, "batch": batch_size},
            ).scalars().all()
            if ids:
                files += connection.execute(
                    sa.text("SELECT path FROM job_results WHERE job_id = ANY(:ids) AND path IS NOT NULL"),
                    {"ids": ids},
                ).scalars().all()
                connection.execute(sa.text("DELETE FROM jobs WHERE id = ANY(:ids)"), {"ids": ids})
        deleted += len(ids)
        if len(ids) < batch_size or not isinstance(bind, sa.Engine):
            break
    return {"deleted": deleted, "files": files}
