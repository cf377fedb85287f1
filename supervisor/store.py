"""The job store: every read and write of jobs, events, results and supervisors.

Each state change is one conditional statement whose WHERE clause checks the
current status against ``supervisor.transitions``, so two actors racing (a
cancel and a completion, two supervisors claiming) can never both win.
Writes about a run also name its attempt token: after a lease expired and the
job was recovered, a late write from the old run matches no row.

Functions take an ``Engine`` (they run in a transaction of their own) or a
``Connection`` (they run in the caller's transaction, and the caller commits).
Events and notifications are written in the same transaction as the change,
so a listener never hears of a change that was rolled back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import sqlalchemy as sa

from analyses import registry
from analyses.errors import InvalidParams
from supervisor import access, payloads
from supervisor.config import MAX_PARAMS_BYTES_DEFAULT
from supervisor.errors import InvalidRequest, JobNotFound, shorten
from supervisor.transitions import Status

logger = logging.getLogger(__name__)

# Supervisors LISTEN here for new work and cancel requests.
WORK_CHANNEL = "analysis_jobs_work"
# Clients LISTEN here to follow jobs: every status change and progress write.
CHANGES_CHANNEL = "analysis_jobs_changes"

# Claim order: each point of priority counts as this many seconds of waiting.
# A job of priority p thus goes before jobs of priority p + 1 submitted more
# than a minute after it, and its wait behind higher priorities is bounded
# by the priority difference times this step (aging without a cap).
PRIORITY_STEP_SECONDS = 60
# Largest memory limit a job may ask for (1 TiB); a limit is in MiB.
MAX_MEMORY_LIMIT_MIB = 1024 * 1024

MAX_KEY_LENGTH = 200
MAX_USER_LENGTH = 100
# Upper bound of jobs one claim statement takes. A supervisor with more free
# slots claims again in the next pass.
MAX_CLAIM_BATCH = 500
# Rows handled per statement by the sweeps, so no sweep holds many row locks.
SWEEP_BATCH = 500

Bind = sa.Engine | sa.Connection


@dataclasses.dataclass(frozen=True)
class Job:
    """A row of the jobs table; field names are the column names."""

    id: int
    analysis: str
    params: dict[str, Any]
    job_key: str | None
    status: str
    priority: int
    submitted_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    attempt: int
    max_attempts: int
    run_after: dt.datetime
    start_by: dt.datetime | None
    timeout_seconds: float | None
    lease_owner: uuid.UUID | None
    lease_expires_at: dt.datetime | None
    attempt_token: uuid.UUID | None
    cancel_requested_at: dt.datetime | None
    cancel_requested_by: str | None
    progress_phase: str | None
    progress_completed: int | None
    progress_total: int | None
    progress_message: str | None
    progress_rate: float | None
    progress_eta_seconds: float | None
    progress_updated_at: dt.datetime | None
    error: dict[str, Any] | None
    result: Any
    results_expire_at: dt.datetime | None
    event_seq: int
    queue_key: float
    crashes: int
    memory_limit_mib: int | None

    @classmethod
    def from_row(cls, row: sa.Row) -> "Job":
        return cls.from_mapping(row._mapping)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "Job":
        return cls(**{field.name: mapping[field.name] for field in dataclasses.fields(cls)})

    @property
    def is_terminal(self) -> bool:
        return self.status not in (Status.QUEUED, Status.RUNNING)


@dataclasses.dataclass(frozen=True)
class SubmitResult:
    job: Job
    # True when a queued or running job with the same key was returned.
    deduplicated: bool


@dataclasses.dataclass(frozen=True)
class CancelResult:
    job: Job
    # "cancelled": it was queued and is now cancelled; "requested": it is
    # running and will stop; "finished": it had already ended.
    outcome: str


@dataclasses.dataclass(frozen=True)
class Event:
    job_id: int
    seq: int
    kind: str
    payload: dict[str, Any]
    created_at: dt.datetime


@contextlib.contextmanager
def _transaction(bind: Bind) -> Iterator[sa.Connection]:
    """Yield a connection in a transaction; raise ``PermissionDenied`` for the server's privilege errors."""
    try:
        if isinstance(bind, sa.Connection):
            yield bind
        else:
            with bind.begin() as connection:
                yield connection
    except sa.exc.DBAPIError as error:
        if access.is_permission_error(error):
            raise access.permission_denied(error) from error
        raise


def _json(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"), allow_nan=False, default=str)


def add_event(connection: sa.Connection, job_id: int, kind: str, payload: dict[str, Any] | None = None) -> int:
    """Append an event to a job's history and return its sequence number.

    Call inside the transaction that changed the job: the job's row is then
    locked, so sequence numbers stay gap-free and in order. The number is
    reserved and used in two statements, because the row-level security
    policy for clients' events checks it against the reserved ``event_seq``,
    which a single statement's insert could not yet see.
    """
    seq = connection.execute(
        sa.text("UPDATE jobs SET event_seq = event_seq + 1 WHERE id = :id RETURNING event_seq"), {"id": job_id}
    ).scalar_one()
    connection.execute(
        sa.text("INSERT INTO job_events (job_id, seq, kind, payload) "
                "VALUES (:id, :seq, :kind, CAST(:payload AS jsonb))"),
        {"id": job_id, "seq": seq, "kind": kind, "payload": _json(payload or {})},
    )
    return seq


def notify(connection: sa.Connection, channel: str, kind: str, job_id: int, **extra: Any) -> None:
    """Send a NOTIFY that is delivered when the transaction commits.

    Payloads carry ids and kinds only: Postgres caps a payload at 8000 bytes,
    so parameters or rows must never travel this way.
    """
    payload = _json({"kind": kind, "job": job_id, **extra})
    connection.execute(sa.text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload})


def _notify_change(connection: sa.Connection, job_id: int, status: str) -> None:
    notify(connection, CHANGES_CHANNEL, "status", job_id, status=status)


# Submit ------------------------------------------------------------------


def _validate_submission(
    analysis_name: str, params: Any, user: str, key: str | None, priority: int,
    max_attempts: int | None, max_params_bytes: int,
) -> tuple[registry.Analysis, str, str | None, int]:
    try:
        analysis = registry.get(analysis_name)
    except InvalidParams as error:
        raise InvalidRequest(error.message, field="analysis") from None
    try:
        validated = analysis.validate_params(params)
    except InvalidParams as error:
        raise InvalidRequest(error.message, field=error.field) from None
    try:
        params_json = payloads.canonical(validated)
    except payloads.PayloadError as error:
        raise InvalidRequest(_payload_message(error), field="params") from None
    except (ValueError, RecursionError) as error:  # e.g. an integer of more than 4300 digits
        raise InvalidRequest(f"invalid parameters: {error}", field="params") from None
    size = len(params_json.encode())
    if size > max_params_bytes:
        raise InvalidRequest(
            f"parameters are {size} bytes as JSON, over the limit of {max_params_bytes} bytes; "
            "pass large inputs by reference (a file path or a table) instead",
            field="params",
        )
    for field, value, limit in (("user", user, MAX_USER_LENGTH), ("key", key, MAX_KEY_LENGTH)):
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip() or len(value) > limit or not value.isprintable():
            length = f" (it has {len(value)})" if isinstance(value, str) and len(value) > limit else ""
            raise InvalidRequest(
                f"invalid {field} {shorten(value)}: must be 1 to {limit} printable characters{length}, "
                "without control, invisible formatting or unpaired surrogate characters",
                field=field,
            )
    if isinstance(priority, bool) or not isinstance(priority, int) or not -1000 <= priority <= 1000:
        raise InvalidRequest(f"invalid priority {priority!r}: must be an integer from -1000 to 1000",
                             field="priority")
    attempts = analysis.max_attempts if max_attempts is None else max_attempts
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
        raise InvalidRequest(f"invalid max_attempts {attempts!r}: must be an integer from 1 to 100",
                             field="max_attempts")
    if key is None and analysis.deduplicate:
        key = payloads.job_key(analysis.name, params_json)
    return analysis, params_json, key, attempts


def _payload_message(error: payloads.PayloadError) -> str:
    """Return the message for parameters that cannot be stored, naming the top-level parameter."""
    parameter = error.path.split("/")[1].replace("~1", "/").replace("~0", "~") if error.path != "/" else "params"
    where = error.path if len(error.path) <= 80 else error.path[:77] + "..."
    message = f"invalid parameter {shorten(parameter)} at {where}: {error.reason}"
    if error.reason.startswith("nested deeper"):
        message += "; flatten the structure, or pass the data by reference (a file path or a table)"
    return message


def submit(
    bind: Bind,
    analysis_name: str,
    params: dict[str, Any] | None = None,
    *,
    user: str | None = None,
    key: str | None = None,
    priority: int = 0,
    max_attempts: int | None = None,
    start_by: dt.datetime | None = None,
    timeout_seconds: float | None = None,
    memory_limit_mib: int | None = None,
    max_params_bytes: int = MAX_PARAMS_BYTES_DEFAULT,
) -> SubmitResult:
    """Create a job, or return the queued or running job that has the same key.

    Raises ``InvalidRequest`` naming the field, before anything is written,
    when the analysis is unknown or an argument is invalid. The unique partial
    index ``uq_jobs_active_key`` makes deduplication hold under concurrent
    submits: an insert that meets an uncommitted job with the same key waits
    for that transaction, then either returns the committed job or, if it
    rolled back, inserts its own.

    ``timeout_seconds`` and ``memory_limit_mib`` default to the analysis's
    own, and without ``start_by`` a job of an analysis with a
    ``start_within_seconds`` expires if not started that long after submit.

    ``user`` is recorded as ``submitted_by``; None records the database
    login (``session_user``). A session that row-level security restricts
    may name only itself unless it is an operator: anything else raises
    ``PermissionDenied`` before anything is written. Keys deduplicate within
    the session's ``access.Session.key_scope``.
    """
    analysis, params_json, key, attempts = _validate_submission(
        analysis_name, params if params is not None else {}, user, key, priority, max_attempts, max_params_bytes
    )
    timeout = timeout_seconds if timeout_seconds is not None else analysis.timeout_seconds
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= 7 * 24 * 3600):
        raise InvalidRequest(f"invalid timeout_seconds {timeout!r} (--timeout): must be more than 0 and at most "
                             "604800 seconds (7 days)",
                             field="timeout_seconds")

    memory_limit = memory_limit_mib if memory_limit_mib is not None else analysis.memory_limit_mib
    if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, int)
                                     or not 1 <= memory_limit <= MAX_MEMORY_LIMIT_MIB):
        raise InvalidRequest(f"invalid memory_limit_mib {memory_limit!r} (--memory-limit): must be a whole number "
                             "of MiB from 1 to "
                             f"{MAX_MEMORY_LIMIT_MIB}", field="memory_limit_mib")
    if start_by is not None and (not isinstance(start_by, dt.datetime) or start_by.tzinfo is None):
        raise InvalidRequest(f"invalid start_by {start_by!r}: must be a timezone-aware datetime",
                             field="start_by")
    if start_by is not None and start_by.year > 9000:
        raise InvalidRequest(f"invalid start_by {start_by.isoformat()}: must be before the year 9000",
                             field="start_by")

    with _transaction(bind) as connection:
        session = access.current_session(connection)
        user = access.acting_user(session, user, action="submit")
        # A job with the key can finish between the failed insert and the
        # lookup; then the next insert succeeds, so this loop ends quickly.
        for _ in range(10):
            row = connection.execute(
                sa.text(
                    "INSERT INTO jobs (analysis, params, job_key, key_scope, priority, submitted_by, "
                    "max_attempts, start_by, timeout_seconds, memory_limit_mib, queue_key) "
                    "VALUES (:analysis, CAST(:params AS jsonb), :key, :scope, :priority, :user, :attempts, "
                    "COALESCE(:start_by, now() + make_interval(secs => :start_within)), :timeout, :memory, "
                    "EXTRACT(EPOCH FROM now()) - :priority * :step) "
                    "ON CONFLICT (job_key, key_scope) "
                    "WHERE job_key IS NOT NULL AND status IN ('queued', 'running') DO NOTHING RETURNING id"
                ),
                {"analysis": analysis.name, "params": params_json, "key": key, "scope": session.key_scope,
                 "priority": priority, "user": user, "attempts": attempts, "start_by": start_by,
                 "timeout": timeout, "start_within": analysis.start_within_seconds, "memory": memory_limit,
                 "step": PRIORITY_STEP_SECONDS},
            ).first()
            if row is not None:
                add_event(connection, row.id, "submitted", {"user": user, "key": key, "priority": priority})
                notify(connection, WORK_CHANNEL, "queued", row.id)
                _notify_change(connection, row.id, Status.QUEUED)
                return SubmitResult(_get(connection, row.id), deduplicated=False)
            existing = connection.execute(
                sa.text("SELECT * FROM jobs WHERE job_key = :key AND key_scope = :scope "
                        "AND status IN ('queued', 'running')"),
                {"key": key, "scope": session.key_scope},
            ).first()
            if existing is not None:
                return SubmitResult(Job.from_row(existing), deduplicated=True)
    raise RuntimeError(f"could not insert or find a job with key {key!r} after 10 tries")


# Reads -------------------------------------------------------------------


def _get(connection: sa.Connection, job_id: int) -> Job:
    row = connection.execute(sa.text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).first()
    if row is None:
        raise JobNotFound(job_id)
    return Job.from_row(row)


def get_job(bind: Bind, job_id: int) -> Job:
    """Return the job with ``job_id``, or raise ``JobNotFound``."""
    with _transaction(bind) as connection:
        return _get(connection, job_id)


def list_jobs(
    bind: Bind,
    *,
    status: str | None = None,
    analysis: str | None = None,
    user: str | None = None,
    limit: int = 50,
    before_id: int | None = None,
) -> list[Job]:
    """Return jobs newest first, filtered by status, analysis and submitting user."""
    if status is not None and status not in {str(s) for s in Status}:
        raise InvalidRequest(f"invalid status {status!r}: must be one of {', '.join(Status)}", field="status")
    if not 1 <= limit <= 10_000:
        raise InvalidRequest(f"invalid limit {limit}: must be from 1 to 10000", field="limit")
    query = sa.text(
        "SELECT * FROM jobs WHERE (CAST(:status AS text) IS NULL OR status = :status) "
        "AND (CAST(:analysis AS text) IS NULL OR analysis = :analysis) "
        "AND (CAST(:user AS text) IS NULL OR submitted_by = :user) "
        "AND (CAST(:before AS bigint) IS NULL OR id < :before) "
        "ORDER BY id DESC LIMIT :limit"
    )
    with _transaction(bind) as connection:
        rows = connection.execute(
            query, {"status": status, "analysis": analysis, "user": user, "before": before_id, "limit": limit}
        )
        return [Job.from_row(row) for row in rows]


def list_events(bind: Bind, job_id: int, after_seq: int = 0) -> list[Event]:
    """Return a job's events in order, those after ``after_seq`` only."""
    with _transaction(bind) as connection:
        _get(connection, job_id)
        rows = connection.execute(
            sa.text("SELECT * FROM job_events WHERE job_id = :id AND seq > :after ORDER BY seq"),
            {"id": job_id, "after": after_seq},
        )
        return [Event(row.job_id, row.seq, row.kind, row.payload, row.created_at) for row in rows]


def list_results(bind: Bind, job_id: int) -> list[dict[str, Any]]:
    """Return a job's result index entries in name order."""
    with _transaction(bind) as connection:
        _get(connection, job_id)
        rows = connection.execute(
            sa.text(
                "SELECT name, kind, value, path, size_bytes, sha256, format, created_at "
                "FROM job_results WHERE job_id = :id ORDER BY name"
            ),
            {"id": job_id},
        )
        return [dict(row._mapping) for row in rows]


# Cancel ------------------------------------------------------------------


def request_cancel(bind: Bind, job_id: int, *, by: str | None = None) -> CancelResult:
    """Cancel a queued job at once, or record a cancel request on a running one.

    A running job ends as ``cancelled`` only when its process has stopped;
    until then its status stays ``running``. A finished job is left as it is.
    ``by`` is recorded as ``cancel_requested_by`` under the same rule as the
    ``user`` of ``submit``. A job this session cannot see raises ``JobNotFound``.
    """
    with _transaction(bind) as connection:
        by = access.acting_user(access.current_session(connection), by, action="cancel")
        row = connection.execute(
            sa.text(
                "UPDATE jobs SET status = 'cancelled', cancel_requested_at = now(), "
                "cancel_requested_by = :by, finished_at = now(), updated_at = now(), "
                "error = jsonb_build_object('code', 'cancelled', 'message', 'cancelled while queued', "
                "'details', jsonb_build_object('stage', 'queued')) "
                "WHERE id = :id AND status = ANY(:sources) RETURNING id"
            ),
            {"id": job_id, "by": by, "sources": [Status.QUEUED]},
        ).first()
        if row is not None:
            add_event(connection, job_id, "cancelled", {"by": by, "stage": "queued"})
            _notify_change(connection, job_id, Status.CANCELLED)
            return CancelResult(_get(connection, job_id), "cancelled")

        row = connection.execute(
            sa.text(
                "UPDATE jobs SET cancel_requested_at = now(), cancel_requested_by = :by, updated_at = now() "
                "WHERE id = :id AND status = 'running' AND cancel_requested_at IS NULL RETURNING lease_owner"
            ),
            {"id": job_id, "by": by},
        ).first()
        if row is not None:
            add_event(connection, job_id, "cancel_requested", {"by": by})
            notify(connection, WORK_CHANNEL, "cancel", job_id, supervisor=str(row.lease_owner))
            _notify_change(connection, job_id, Status.RUNNING)
            return CancelResult(_get(connection, job_id), "requested")

        job = _get(connection, job_id)
        if job.status == Status.RUNNING:
            return CancelResult(job, "requested")
        return CancelResult(job, "finished")


def cancel_requests(bind: Bind, supervisor_id: uuid.UUID) -> list[tuple[int, uuid.UUID]]:
    """Return (job id, attempt token) of this supervisor's running jobs that were asked to stop."""
    with _transaction(bind) as connection:
        rows = connection.execute(
            sa.text(
                "SELECT id, attempt_token FROM jobs WHERE status = 'running' AND lease_owner = :owner "
                "AND cancel_requested_at IS NOT NULL"
            ),
            {"owner": supervisor_id},
        )
        return [(row.id, row.attempt_token) for row in rows]


# Concurrency limits ----------------------------------------------------------

LIMIT_SCOPES = ("user", "analysis")
# The name of the limit that applies to every user or analysis without one of its own.
ANY = "*"
MAX_LIMIT = 10_000


@dataclasses.dataclass(frozen=True)
class Limit:
    scope: str
    name: str
    max_running: int
    updated_at: dt.datetime


def _check_limit_target(scope: str, name: str) -> None:
    if scope not in LIMIT_SCOPES:
        raise InvalidRequest(f"invalid limit scope {scope!r}: must be one of {', '.join(LIMIT_SCOPES)}",
                             field="scope")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_USER_LENGTH or not name.isprintable():
        raise InvalidRequest(f"invalid {scope} name {name!r}: must be 1 to {MAX_USER_LENGTH} printable "
                             f"characters, or {ANY!r} for every {scope}", field="name")
    if scope == "analysis" and name != ANY:
        try:
            registry.get(name)
        except InvalidParams as error:
            raise InvalidRequest(error.message, field="name") from None


def set_limit(bind: Bind, scope: str, name: str, max_running: int) -> Limit:
    """Allow at most ``max_running`` running jobs of one user or analysis (``ANY``: each one without its own).

    Running means claimed: jobs a supervisor has prefetched count too. The
    limit applies from the next claim of every supervisor on the database.
    A limit of 0 keeps that user's or analysis's jobs in the queue.
    """
    _check_limit_target(scope, name)
    if isinstance(max_running, bool) or not isinstance(max_running, int) or not 0 <= max_running <= MAX_LIMIT:
        raise InvalidRequest(f"invalid limit {max_running!r}: must be an integer from 0 to {MAX_LIMIT}",
                             field="max_running")
    with _transaction(bind) as connection:
        row = connection.execute(
            sa.text(
                "INSERT INTO job_limits (scope, name, max_running) VALUES (:scope, :name, :max) "
                "ON CONFLICT (scope, name) DO UPDATE SET max_running = EXCLUDED.max_running, updated_at = now() "
                "RETURNING *"
            ),
            {"scope": scope, "name": name, "max": max_running},
        ).one()
        _notify_limits(connection)
        return Limit(**row._mapping)


def clear_limit(bind: Bind, scope: str, name: str) -> bool:
    """Remove a limit; return whether there was one."""
    if scope not in LIMIT_SCOPES:
        _check_limit_target(scope, name)
    with _transaction(bind) as connection:
        removed = connection.execute(
            sa.text("DELETE FROM job_limits WHERE scope = :scope AND name = :name"), {"scope": scope, "name": name}
        ).rowcount
        if removed:
            _notify_limits(connection)
        return bool(removed)


def list_limits(bind: Bind) -> list[Limit]:
    with _transaction(bind) as connection:
        rows = connection.execute(sa.text("SELECT * FROM job_limits ORDER BY scope, name = '*' DESC, name"))
        return [Limit(**row._mapping) for row in rows]


def _notify_limits(connection: sa.Connection) -> None:
    # Supervisors claim at once, since a raised limit may let queued jobs start.
    connection.execute(sa.text("SELECT pg_notify(:channel, :payload)"),
                       {"channel": WORK_CHANNEL, "payload": _json({"kind": "limits"})})
