"""Store operations of a supervisor's runs: claim, heartbeat, progress and finish.

A run is one attempt of a job. The claim gives it a fresh attempt token, and
every later write about it (lease renewal, progress, finish) names that token
in its WHERE clause together with ``status = 'running'``. Once a run's lease
expired and the job was recovered, those writes match no row, so a slow or
partitioned supervisor can never overwrite the job's newer state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import psycopg
import psycopg.rows
import sqlalchemy as sa

from supervisor import access, payloads
from supervisor.config import RETRY_BASE_SECONDS_DEFAULT, RETRY_MAX_SECONDS_DEFAULT
from supervisor.store import (
    CHANGES_CHANNEL,
    MAX_CLAIM_BATCH,
    Bind,
    Job,
    _json,
    _notify_change,
    _transaction,
    add_event,
    notify,
)
from supervisor.transitions import Status, sources


# Supervisors -------------------------------------------------------------


def register_supervisor(bind: Bind, supervisor_id: uuid.UUID, *, host: str, pid: int, version: str,
                        slots: int) -> None:
    """Insert the row of a starting supervisor; each run of the process has its own id."""
    with _transaction(bind) as connection:
        connection.execute(
            sa.text(
                "INSERT INTO supervisors (id, host, pid, version, slots, throttle) "
                "VALUES (:id, :host, :pid, :version, :slots, '{\"state\": \"running\"}')"
            ),
            {"id": supervisor_id, "host": host, "pid": pid, "version": version, "slots": slots},
        )


def stop_supervisor(bind: Bind, supervisor_id: uuid.UUID) -> None:
    with _transaction(bind) as connection:
        connection.execute(
            sa.text("UPDATE supervisors SET stopped_at = now(), heartbeat_at = now() WHERE id = :id"),
            {"id": supervisor_id},
        )


def list_supervisors(bind: Bind, *, include_stopped: bool = False) -> list[dict[str, Any]]:
    """Return supervisor rows, newest first, with ``heartbeat_age_seconds`` computed by the server."""
    with _transaction(bind) as connection:
        rows = connection.execute(
            sa.text(
                "SELECT *, EXTRACT(EPOCH FROM now() - heartbeat_at) AS heartbeat_age_seconds, "
                "(SELECT count(*) FROM jobs WHERE status = 'running' AND lease_owner = s.id) AS running_jobs "
                "FROM supervisors s WHERE :all OR stopped_at IS NULL ORDER BY started_at DESC"
            ),
            {"all": include_stopped},
        )
        return [dict(row._mapping) for row in rows]


def heartbeat(
    bind: Bind,
    supervisor_id: uuid.UUID,
    tokens: Iterable[uuid.UUID],
    *,
    lease_seconds: float,
    throttle: dict[str, Any] | None = None,
) -> set[uuid.UUID]:
    """Renew the leases of this supervisor's runs and return the tokens it still holds.

    A token missing from the returned set belongs to a run whose lease expired
    and whose job was recovered elsewhere: the caller must stop that run.
    """
    tokens = list(tokens)
    with _transaction(bind) as connection:
        connection.execute(
            sa.text(
                "UPDATE supervisors SET heartbeat_at = now(), "
                "throttle = COALESCE(CAST(:throttle AS jsonb), throttle) WHERE id = :id"
            ),
            {"id": supervisor_id, "throttle": _json(throttle) if throttle is not None else None},
        )
        if not tokens:
            return set()
        rows = connection.execute(
            sa.text(
                "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease) "
                "WHERE status = 'running' AND lease_owner = :owner AND attempt_token = ANY(:tokens) "
                "RETURNING attempt_token"
            ),
            {"lease": lease_seconds, "owner": supervisor_id, "tokens": tokens},
        )
        return {row.attempt_token for row in rows}


# Claim -------------------------------------------------------------------

# The UPDATE and event rows of a claim, shared by both claim statements.
# ``picked`` contains the ids in claim order as one array, and the status
# re-check sits inside COALESCE, which no index on status matches: the
# UPDATE then finds its rows through the primary key. Statistics taken
# before a flood of submits made the planner combine the status indexes
# instead, reading every queued and running entry (1.5 of 4 ms at 63 jobs).
_CLAIMED = """
    claimed AS (
        UPDATE jobs SET
            status = 'running', attempt = jobs.attempt + 1, attempt_token = gen_random_uuid(),
            lease_owner = :owner, lease_expires_at = now() + make_interval(secs => :lease),
            started_at = CASE WHEN array_position((SELECT ids FROM picked), jobs.id) <= :starting THEN now() END,
            updated_at = now(), event_seq = jobs.event_seq + 1,
            progress_phase = NULL, progress_completed = NULL, progress_total = NULL,
            progress_message = NULL, progress_rate = NULL, progress_eta_seconds = NULL,
            progress_updated_at = NULL
        WHERE jobs.id = ANY(CAST((SELECT ids FROM picked) AS bigint[]))
          AND COALESCE(jobs.status = ANY(:sources) AND jobs.cancel_requested_at IS NULL, false)
        RETURNING jobs.*, array_position((SELECT ids FROM picked), jobs.id) AS position
    ), events AS (
        INSERT INTO job_events (job_id, seq, kind, payload)
        SELECT id, event_seq, 'claimed',
               jsonb_build_object('supervisor', lease_owner, 'attempt', attempt, 'token', attempt_token)
        FROM claimed
    )
"""

# Notifies the status change of one claimed row (see claim_jobs, ``notify``).
_NOTIFY_RUNNING = """
    CASE WHEN :notify AND claimed.id IS NOT NULL THEN
        pg_notify(:channel, json_build_object('kind', 'status', 'job', claimed.id, 'status', 'running')::text)
    END AS notified
"""

# The claim statement. Jobs are eligible when queued, due (run_after), not
# cancelled and not past their start-by time. Among eligible jobs it prefers
# the submitting user with the fewest running jobs, then the analysis with
# the fewest, then the queue key (priority with aging, then age). It skips
# jobs whose user or analysis is at its limit in job_limits.
#
# It never scans the whole queue: a loose index scan of ix_jobs_queue finds
# each (user, analysis) pair with queued jobs, and only the first :limit jobs
# of each pair are candidates. "Fewest running" counts the jobs each pick
# adds: a user's k-th candidate counts as running + k (its user_load), which
# interleaves users round-robin within one batch. A user's own candidates
# are ranked the same way by analysis first (pair_load), so one user's jobs
# of a quiet analysis go before more of a busy one.
#
# Limits are applied in three steps: analyses already at their limit drop out,
# then each user's candidates beyond the user's free room, then each
# analysis's beyond its free room. A job dropped at the last step can leave
# its user's room unused in this statement, so ``claim_jobs`` runs the
# statement again while it reports such drops and slots remain. Each run
# takes at least one job while any eligible job fits its limits.
#
# Candidates are read without row locks (locking them all would write to
# every candidate row). Claims are serialized by an advisory lock instead,
# and the UPDATE re-checks each picked row's status, so a job cancelled or
# expired since the statement's snapshot is skipped.
_CLAIM = sa.text(
    """
    WITH RECURSIVE pairs AS (
        (SELECT submitted_by, analysis FROM jobs WHERE status = 'queued'
         ORDER BY submitted_by, analysis LIMIT 1)
        UNION ALL
        SELECT next.submitted_by, next.analysis FROM pairs CROSS JOIN LATERAL (
            SELECT submitted_by, analysis FROM jobs
            WHERE status = 'queued' AND (submitted_by, analysis) > (pairs.submitted_by, pairs.analysis)
            ORDER BY submitted_by, analysis LIMIT 1
        ) next
    ), candidates AS (
        SELECT c.* FROM pairs CROSS JOIN LATERAL (
            SELECT id, submitted_by, analysis, queue_key FROM jobs
            WHERE status = 'queued' AND submitted_by = pairs.submitted_by AND analysis = pairs.analysis
              AND run_after <= now() AND cancel_requested_at IS NULL AND (start_by IS NULL OR start_by > now())
            ORDER BY queue_key LIMIT :limit
        ) c
    ), running AS (
        SELECT submitted_by, analysis, count(*) AS n FROM jobs WHERE status = 'running' GROUP BY 1, 2
    ), counting AS MATERIALIZED (
        -- With one (user, analysis) pair waiting and no limits, running
        -- counts cannot change the order, and reading them is skipped:
        -- under heavy churn the running index holds many dead entries.
        SELECT (SELECT count(*) FROM pairs) > 1 OR EXISTS (SELECT 1 FROM job_limits) AS needed
    ), users AS MATERIALIZED (
        SELECT submitted_by,
               CASE WHEN (SELECT needed FROM counting)
                    THEN COALESCE((SELECT sum(n) FROM running r WHERE r.submitted_by = u.submitted_by), 0)
                    ELSE 0 END AS user_running,
               (SELECT max_running FROM job_limits WHERE scope = 'user' AND name IN (u.submitted_by, '*')
                ORDER BY name = '*' LIMIT 1) AS user_limit
        FROM (SELECT DISTINCT submitted_by FROM pairs) u
    ), analyses AS MATERIALIZED (
        SELECT analysis,
               CASE WHEN (SELECT needed FROM counting)
                    THEN COALESCE((SELECT sum(n) FROM running r WHERE r.analysis = a.analysis), 0)
                    ELSE 0 END AS analysis_running,
               (SELECT max_running FROM job_limits WHERE scope = 'analysis' AND name IN (a.analysis, '*')
                ORDER BY name = '*' LIMIT 1) AS analysis_limit
        FROM (SELECT DISTINCT analysis FROM pairs) a
    ), pair_ranked AS (
        SELECT *, analysis_running + row_number() OVER (
                   PARTITION BY submitted_by, analysis ORDER BY queue_key, id) AS pair_load
        FROM candidates JOIN users USING (submitted_by) JOIN analyses USING (analysis)
        WHERE analysis_limit IS NULL OR analysis_running < analysis_limit
    ), user_ranked AS (
        SELECT *, user_running + row_number() OVER (
                   PARTITION BY submitted_by ORDER BY pair_load, queue_key, id) AS user_load
        FROM pair_ranked
    ), analysis_ranked AS (
        SELECT *, analysis_running + row_number() OVER (
                   PARTITION BY analysis ORDER BY user_load, queue_key, id) AS analysis_load
        FROM user_ranked WHERE user_limit IS NULL OR user_load <= user_limit
    ), fitting AS (
        SELECT * FROM analysis_ranked WHERE analysis_limit IS NULL OR analysis_load <= analysis_limit
    ), picked AS MATERIALIZED (
        SELECT array_agg(id ORDER BY user_load, analysis_load, queue_key, id) AS ids
        FROM (SELECT * FROM fitting ORDER BY user_load, analysis_load, queue_key, id LIMIT :limit) first
    ),"""
    + _CLAIMED
    + """
    SELECT claimed.*,
           (SELECT count(*) FROM analysis_ranked) > (SELECT count(*) FROM fitting) AS limited,"""
    + _NOTIFY_RUNNING
    + """
    FROM claimed ORDER BY position
    """
)

# The claim statement for the common case of one (user, analysis) pair with
# queued jobs and no limits. The full statement then picks the pair's first
# eligible jobs by queue key, as this one does, at a fraction of the cost
# (about 0.7 ms less per claim on an otherwise idle server, as measured).
# Its first column, ``applies``, is false when the case does not hold. The
# statement then claims nothing and returns that one row, and the caller
# runs the full statement. With no job to claim it also returns one row,
# with null job columns.
_CLAIM_ONE_PAIR = sa.text(
    """
    WITH first_pair AS (
        SELECT submitted_by, analysis FROM jobs WHERE status = 'queued'
        ORDER BY submitted_by, analysis LIMIT 1
    ), guard AS MATERIALIZED (
        SELECT NOT EXISTS (
                   SELECT 1 FROM jobs, first_pair
                   WHERE jobs.status = 'queued'
                     AND (jobs.submitted_by, jobs.analysis) > (first_pair.submitted_by, first_pair.analysis))
               AND NOT EXISTS (SELECT 1 FROM job_limits) AS applies
    ), picked AS MATERIALIZED (
        SELECT array_agg(c.id ORDER BY c.queue_key, c.id) AS ids
        FROM first_pair CROSS JOIN LATERAL (
            SELECT id, queue_key FROM jobs
            WHERE status = 'queued' AND submitted_by = first_pair.submitted_by
              AND analysis = first_pair.analysis
              AND run_after <= now() AND cancel_requested_at IS NULL AND (start_by IS NULL OR start_by > now())
            ORDER BY queue_key LIMIT :limit
        ) c
        WHERE (SELECT applies FROM guard)
    ),"""
    + _CLAIMED
    + """
    SELECT guard.applies, claimed.*, false AS limited,"""
    + _NOTIFY_RUNNING
    + """
    FROM guard LEFT JOIN claimed ON true ORDER BY claimed.position
    """
)

# Claims take this transaction-level advisory lock first; see claim_jobs.
CLAIM_LOCK_KEY = 0x616A_6C6D  # "ajlm"

# The claim's statements in psycopg's parameter style, for pipeline mode.
_LOCK_SQL = "SELECT pg_advisory_xact_lock(%(key)s)"
_CLAIM_SQL, _CLAIM_ONE_PAIR_SQL = (re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", statement.text)
                                  for statement in (_CLAIM, _CLAIM_ONE_PAIR))


def claim_jobs(bind: Bind | psycopg.Connection, supervisor_id: uuid.UUID, limit: int, *, lease_seconds: float,
               starting: int = 0, notify: bool = True) -> list[Job]:
    """Claim up to ``limit`` queued jobs for a supervisor and return them as running, in claim order.

    A job with a cancel request is never claimed. The first ``starting``
    jobs are recorded as started (see ``mark_started``): the caller hands
    them to idle workers right after the commit, which saves a write on the
    way.

    Concurrent claims (from several supervisors) wait for each other, so
    each counts the jobs the previous one claimed: the limits in job_limits
    and the fair order then hold across supervisors, and two claims never
    pick the same job. A claim takes a few milliseconds, so the wait is short.

    Given an engine, or a psycopg connection in autocommit mode, the claim
    is a transaction of its own, sent to the server in one round trip.
    Given a SQLAlchemy connection, it joins that connection's transaction
    and the caller commits.

    ``notify=False`` leaves out the status notifications, and the caller
    sends them later with ``notify_running``: delivering notifications
    made an otherwise idle server's commit about 0.45 ms slower, and that
    commit is on the way from submit to the job's start.
    """
    if limit <= 0:
        return []
    if isinstance(bind, sa.Engine):
        with bind.connect() as connection:
            # Autocommit lets the claim send its own BEGIN and COMMIT within
            # the pipeline: psycopg would otherwise wait for the result of
            # the BEGIN it sends before the first statement.
            connection.execution_options(isolation_level="AUTOCOMMIT")
            return _claim(_SqlAlchemyDriver(connection), supervisor_id, limit, lease_seconds, starting, notify)
    if isinstance(bind, sa.Connection):
        return _claim(_SqlAlchemyDriver(bind, in_transaction=True), supervisor_id, limit, lease_seconds, starting,
                      notify)
    return _claim(_PsycopgDriver(bind), supervisor_id, limit, lease_seconds, starting, notify)


def _claim(driver: _ClaimDriver, supervisor_id: uuid.UUID, limit: int, lease_seconds: float, starting: int,
           notify: bool) -> list[Job]:
    claimed: list[Job] = []
    batch = min(limit, MAX_CLAIM_BATCH)
    # The one-pair statement goes first. Where it does not apply, the full
    # statement follows: in a caller's transaction, which still holds the
    # lock, or in a transaction of its own, which takes the lock again.
    try_one_pair = True
    while len(claimed) < batch:
        params = {"limit": batch - len(claimed), "owner": supervisor_id, "lease": lease_seconds,
                  "sources": list(sources(Status.RUNNING)), "channel": CHANGES_CHANNEL,
                  "starting": max(0, starting - len(claimed)), "key": CLAIM_LOCK_KEY, "notify": notify}
        if try_one_pair:
            try_one_pair = False
            rows = driver.run(_CLAIM_ONE_PAIR_SQL, params)
            if rows[0]["applies"]:
                return [Job.from_mapping(row) for row in rows if row["id"] is not None]
        rows = driver.run(_CLAIM_SQL, params)
        claimed.extend(Job.from_mapping(row) for row in rows)
        # "limited": a job was left out only because another fitted first;
        # a further statement can claim it. In a transaction of its own,
        # that is a further transaction, which again takes the lock.
        if not rows or not rows[0]["limited"]:
            break
    return claimed


def notify_running(bind: Bind, job_ids: Sequence[int]) -> None:
    """Send the status notifications of claimed jobs that ``claim_jobs(notify=False)`` left out.

    Given an engine, the transaction writes nothing but the notifications,
    which are hints, so its commit does not wait for the WAL flush. Given a
    connection, they are sent when its transaction commits.
    """
    if not job_ids:
        return
    with _transaction(bind) as connection:
        if not isinstance(bind, sa.Connection):
            connection.execute(sa.text("SET LOCAL synchronous_commit = off"))
        connection.execute(
            sa.text("SELECT pg_notify(:channel, json_build_object('kind', 'status', 'job', id, "
                    "'status', 'running')::text) FROM unnest(CAST(:ids AS bigint[])) AS id"),
            {"channel": CHANGES_CHANNEL, "ids": list(job_ids)},
        )


class _ClaimDriver:
    """Runs the lock and a claim statement in pipeline mode and returns the claimed rows.

    Pipeline mode sends the statements together and waits once for all
    their results. The server still runs them one after the other, so the
    claim statement's snapshot is taken after the lock is granted and
    includes the previous holder's claims. Outside a transaction, the pipeline also
    contains BEGIN and COMMIT; a failed statement then leaves the transaction
    aborted, and it is rolled back here.
    """

    in_transaction = False

    def run(self, statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _pipeline(self, driver: psycopg.Connection, statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            with driver.pipeline():
                if not self.in_transaction:
                    driver.execute("BEGIN")
                driver.execute(_LOCK_SQL, params)
                cursor = driver.cursor(row_factory=psycopg.rows.dict_row)
                cursor.execute(statement, params)
                if not self.in_transaction:
                    driver.execute("COMMIT")
            return cursor.fetchall()
        finally:
            if (not self.in_transaction and not driver.closed
                    and driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE):
                with contextlib.suppress(psycopg.Error):
                    driver.rollback()


class _PsycopgDriver(_ClaimDriver):
    """A psycopg connection in autocommit mode."""

    def __init__(self, connection: psycopg.Connection) -> None:
        self.connection = connection

    def run(self, statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            return self._pipeline(self.connection, statement, params)
        except psycopg.Error as error:
            _raise_driver_error(error, statement, params)


class _SqlAlchemyDriver(_ClaimDriver):
    """A SQLAlchemy connection: in autocommit mode, or ``in_transaction``, joining its open transaction.

    A connection the server closed leaves the pool, as after a failed
    ``execute``.
    """

    def __init__(self, connection: sa.Connection, *, in_transaction: bool = False) -> None:
        self.connection = connection
        self.in_transaction = in_transaction

    def run(self, statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        driver = self.connection.connection.driver_connection
        try:
            return self._pipeline(driver, statement, params)
        except psycopg.Error as error:
            disconnected = driver.closed or self.connection.dialect.is_disconnect(error, driver, None)
            if disconnected:
                self.connection.invalidate(error)
            _raise_driver_error(error, statement, params, disconnected=disconnected)


def _raise_driver_error(error: psycopg.Error, statement: str, params: dict[str, Any], *,
                        disconnected: bool = False) -> NoReturn:
    """Raise what SQLAlchemy would raise for ``error``, raised by the driver outside SQLAlchemy.

    Callers handle SQLAlchemy's exception classes (OperationalError for a
    lost server) and ``PermissionDenied`` for a privilege error, as
    ``_transaction`` raises it.
    """
    wrapped = sa.exc.DBAPIError.instance(statement, params, error, psycopg.Error,
                                         connection_invalidated=disconnected)
    if access.is_permission_error(wrapped):
        raise access.permission_denied(wrapped) from wrapped
    raise wrapped from error


def leased_runs(bind: Bind, supervisor_id: uuid.UUID) -> list[tuple[int, uuid.UUID]]:
    """Return the (job id, attempt token) of every running job under a supervisor's lease."""
    with _transaction(bind) as connection:
        rows = connection.execute(
            sa.text("SELECT id, attempt_token FROM jobs WHERE status = 'running' AND lease_owner = :owner"),
            {"owner": supervisor_id},
        ).all()
    return [(row.id, row.attempt_token) for row in rows]


def mark_started(bind: Bind, started: Sequence[tuple[int, uuid.UUID]]) -> None:
    """Record that these runs (job id, attempt token) were handed to a worker.

    A claimed job may wait in a supervisor's prefetch queue before it starts.
    Lease recovery gives the attempt back to a run that never started, so a
    supervisor that dies holding prefetched jobs costs them no attempt.
    """
    if not started:
        return
    with _transaction(bind) as connection:
        connection.execute(
            sa.text(
                "UPDATE jobs SET started_at = now() FROM unnest(CAST(:ids AS bigint[]), CAST(:tokens AS uuid[])) "
                "AS t(id, token) WHERE jobs.id = t.id AND jobs.attempt_token = t.token AND jobs.status = 'running'"
            ),
            {"ids": [job_id for job_id, _ in started], "tokens": [token for _, token in started]},
        )


# Progress ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProgressUpdate:
    job_id: int
    attempt_token: uuid.UUID
    phase: str | None
    completed: int | None
    total: int | None
    message: str | None
    rate: float | None
    eta_seconds: float | None
    # Also append a "progress" event (the supervisor rate-limits these).
    record_event: bool = False


def record_progress(bind: Bind, updates: Sequence[ProgressUpdate]) -> int:
    """Write progress snapshots of current runs; return how many rows changed."""
    changed = 0
    with _transaction(bind) as connection:
        for update in updates:
            row = connection.execute(
                sa.text(
                    "UPDATE jobs SET progress_phase = :phase, progress_completed = :completed, "
                    "progress_total = :total, progress_message = :message, progress_rate = :rate, "
                    "progress_eta_seconds = :eta, progress_updated_at = now() "
                    "WHERE id = :id AND attempt_token = :token AND status = 'running' RETURNING attempt"
                ),
                {"id": update.job_id, "token": update.attempt_token, "phase": update.phase,
                 "completed": update.completed, "total": update.total, "message": update.message,
                 "rate": update.rate, "eta": update.eta_seconds},
            ).first()
            if row is None:
                continue
            changed += 1
            if update.record_event:
                add_event(connection, update.job_id, "progress",
                          {"attempt": row.attempt, "phase": update.phase, "completed": update.completed,
                           "total": update.total})
            notify(connection, CHANGES_CHANNEL, "progress", update.job_id)
    return changed


# Finish ------------------------------------------------------------------


def retry_delay_seconds(attempt: int, *, base: float = RETRY_BASE_SECONDS_DEFAULT,
                        maximum: float = RETRY_MAX_SECONDS_DEFAULT, rng: random.Random | None = None) -> float:
    """Return the backoff before retry number ``attempt``: exponential, capped, with jitter.

    The jitter draws from [delay/2, delay], so jobs that failed together do
    not all come back in the same instant.
    """
    delay = min(maximum, base * 2 ** max(0, attempt - 1))
    return delay * (0.5 + 0.5 * (rng or random).random())


def _clear_run() -> str:
    return "lease_owner = NULL, lease_expires_at = NULL, attempt_token = NULL, updated_at = now()"


@dataclasses.dataclass(frozen=True)
class Success:
    """A finished run's outcome for ``succeed_runs``."""

    job_id: int
    attempt_token: uuid.UUID
    summary: Any
    results: Sequence[dict[str, Any]] = ()
    results_ttl_seconds: float | None = None
    # True when ``summary`` already went through payloads.summary_document.
    summary_is_document: bool = False


_SUCCEED = sa.text(
    """
    WITH input AS (
        SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:tokens AS uuid[]), CAST(:documents AS jsonb[]),
                             CAST(:ttls AS double precision[]), CAST(:counts AS integer[]))
                      AS t(id, token, document, ttl, results)
    ), done AS (
        UPDATE jobs SET
            status = 'succeeded', started_at = COALESCE(jobs.started_at, now()), finished_at = now(),
            result = input.document, error = NULL,
            progress_completed = COALESCE(jobs.progress_total, jobs.progress_completed),
            progress_eta_seconds = CASE WHEN jobs.progress_phase IS NULL THEN NULL ELSE 0 END,
            results_expire_at = now() + make_interval(secs => input.ttl),
            lease_owner = NULL, lease_expires_at = NULL, attempt_token = NULL, updated_at = now(),
            event_seq = jobs.event_seq + 1
        FROM input
        WHERE jobs.id = input.id AND jobs.attempt_token = input.token AND jobs.status = ANY(:sources)
        RETURNING jobs.id, jobs.event_seq, jobs.attempt, input.results
    ), events AS (
        INSERT INTO job_events (job_id, seq, kind, payload)
        SELECT id, event_seq, 'succeeded', jsonb_build_object('attempt', attempt, 'results', results) FROM done
    )
    SELECT id, pg_notify(:channel, json_build_object('kind', 'status', 'job', id, 'status', 'succeeded')::text)
    FROM done
    """
)


def succeed_runs(bind: Bind, successes: Sequence[Success]) -> set[int]:
    """Mark runs succeeded with their summaries and result entries, in one statement.

    Returns the ids of the jobs written; a run that is no longer current is
    skipped. Raises ``payloads.PayloadError`` before writing anything when a
    summary cannot be stored; non-finite numbers are stored as described in
    ``supervisor.payloads``. A run whose start was not recorded (see
    ``mark_started``) gets this transaction's time as its start.
    """
    if not successes:
        return set()
    documents = [
        _json(success.summary if success.summary_is_document else payloads.summary_document(success.summary))
        for success in successes
    ]
    with _transaction(bind) as connection:
        written = set(connection.execute(_SUCCEED, {
            "ids": [success.job_id for success in successes],
            "tokens": [success.attempt_token for success in successes],
            "documents": documents,
            "ttls": [success.results_ttl_seconds for success in successes],
            "counts": [len(success.results) for success in successes],
            "sources": sources(Status.SUCCEEDED),
            "channel": CHANGES_CHANNEL,
        }).scalars())
        for success in successes:
            if success.job_id in written:
                for entry in success.results:
                    _insert_result(connection, success.job_id, entry)
    return written


def succeed_run(bind: Bind, job_id: int, attempt_token: uuid.UUID, summary: Any,
                results: Sequence[dict[str, Any]] = (), *, results_ttl_seconds: float | None = None) -> bool:
    """Mark one run succeeded; return False, writing nothing, when the run is no longer current."""
    success = Success(job_id, attempt_token, summary, results, results_ttl_seconds)
    return job_id in succeed_runs(bind, [success])


def _insert_result(connection: sa.Connection, job_id: int, entry: dict[str, Any]) -> None:
    value = entry.get("value")
    if entry["kind"] == "inline":
        value = payloads.summary_document(value)
    connection.execute(
        sa.text(
            "INSERT INTO job_results (job_id, name, kind, value, path, size_bytes, sha256, format) "
            "VALUES (:job_id, :name, :kind, CAST(:value AS jsonb), :path, :size, :sha256, :format)"
        ),
        {"job_id": job_id, "name": entry["name"], "kind": entry["kind"],
         "value": _json(value) if entry["kind"] == "inline" else None, "path": entry.get("path"),
         "size": entry.get("size_bytes"), "sha256": entry.get("sha256"), "format": entry.get("format")},
    )


def fail_run(bind: Bind, job_id: int, attempt_token: uuid.UUID, error: dict[str, Any], *,
             retryable: bool, retry_delay: float = 0.0, crashed: bool = False) -> str | None:
    """Record a failed run; return the job's new status, or None if the run is no longer current.

    A retryable failure with attempts left sends the job back to the queue,
    not before ``retry_delay`` seconds. A job with a cancel request ends
    ``cancelled`` instead of being retried. ``crashed`` counts the run in
    the job's ``crashes`` (its worker was killed).
    """
    with _transaction(bind) as connection:
        row = connection.execute(
            sa.text(
                "UPDATE jobs SET "
                "status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' "
                "  WHEN :retry AND attempt < max_attempts THEN 'queued' ELSE 'failed' END, "
                "finished_at = CASE WHEN cancel_requested_at IS NULL AND :retry AND attempt < max_attempts "
                "  THEN NULL ELSE now() END, "
                "run_after = now() + make_interval(secs => :delay), "
                "error = CAST(:error AS jsonb) || jsonb_build_object('attempt', attempt, 'at', now()), "
                "crashes = crashes + CASE WHEN :crashed THEN 1 ELSE 0 END, "
                f"{_clear_run()} "
                "WHERE id = :id AND attempt_token = :token AND status = 'running' "
                "RETURNING status, attempt, max_attempts, error"
            ),
            {"id": job_id, "token": attempt_token, "retry": retryable, "delay": retry_delay,
             "error": _json(error), "crashed": crashed},
        ).first()
        if row is None:
            return None
        kind = {"queued": "retried", "failed": "failed", "cancelled": "cancelled"}[row.status]
        add_event(connection, job_id, kind, {"attempt": row.attempt, "error": row.error,
                                             "retry_in_seconds": retry_delay if row.status == "queued" else None})
        if row.status == Status.QUEUED:
            notify(connection, "analysis_jobs_work", "queued", job_id)
        _notify_change(connection, job_id, row.status)
        return row.status


def cancel_run(bind: Bind, job_id: int, attempt_token: uuid.UUID, *, stage: str,
               details: dict[str, Any] | None = None) -> bool:
    """Mark a run cancelled once its process has stopped.

    ``stage`` is "cooperative" (the analysis stopped at a cancel check),
    "terminate" (SIGTERM after the grace period) or "kill" (SIGKILL).
    """
    error = {"code": "cancelled", "message": f"cancelled ({stage} stop)", "details": {"stage": stage,
                                                                                     **(details or {})}}
    with _transaction(bind) as connection:
        row = connection.execute(
            sa.text(
                "UPDATE jobs SET status = 'cancelled', finished_at = now(), "
                "error = CAST(:error AS jsonb) || jsonb_build_object('attempt', attempt, 'at', now()), "
                f"{_clear_run()} "
                "WHERE id = :id AND attempt_token = :token AND status = ANY(:sources) RETURNING attempt"
            ),
            {"id": job_id, "token": attempt_token, "error": _json(error), "sources": sources(Status.CANCELLED)},
        ).first()
        if row is None:
            return False
        add_event(connection, job_id, "cancelled", {"attempt": row.attempt, "stage": stage, **(details or {})})
        _notify_change(connection, job_id, Status.CANCELLED)
        return True


def requeue_run(bind: Bind, job_id: int, attempt_token: uuid.UUID, *, reason: str) -> str | None:
    """Put a run back in the queue without spending its attempt, as a shutdown does.

    A job with a cancel request ends ``cancelled`` instead. Returns the new
    status, or None if the run is no longer current.
    """
    with _transaction(bind) as connection:
        row = connection.execute(
            sa.text(
                "UPDATE jobs SET "
                "status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' ELSE 'queued' END, "
                "attempt = CASE WHEN cancel_requested_at IS NOT NULL THEN attempt ELSE attempt - 1 END, "
                "finished_at = CASE WHEN cancel_requested_at IS NOT NULL THEN now() END, "
                "run_after = now(), "
                # The next run starts over; progress of this one would read
                # as the queued job's.
                "progress_phase = NULL, progress_completed = NULL, progress_total = NULL, "
                "progress_message = NULL, progress_rate = NULL, progress_eta_seconds = NULL, "
                "progress_updated_at = NULL, "
                f"{_clear_run()} "
                "WHERE id = :id AND attempt_token = :token AND status = 'running' RETURNING status, attempt"
            ),
            {"id": job_id, "token": attempt_token},
        ).first()
        if row is None:
            return None
        add_event(connection, job_id, "requeued" if row.status == Status.QUEUED else "cancelled",
                  {"reason": reason, "attempt": row.attempt})
        if row.status == Status.QUEUED:
            notify(connection, "analysis_jobs_work", "queued", job_id)
        _notify_change(connection, job_id, row.status)
        return row.status
