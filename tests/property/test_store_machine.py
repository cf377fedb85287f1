"""The job store against a model of each job, driven by a Hypothesis state machine.

Every rule calls the real functions in ``supervisor.store``, ``supervisor.runs``
and ``supervisor.sweeps`` on a real Postgres and applies the documented effect
to a dict of ``ModelJob``. After every step the invariants compare the
database with the model and check the rules the store promises: allowed
transitions only, one active job per key, leases only on running jobs,
gap-free event sequences.

The rules the model encodes come from the docstrings:

- a submit with the key of a queued or running job returns that job;
- a claim takes one user's queued jobs by queue key, where a point of
  priority counts as a minute of waiting (each example runs well within a
  minute, so this is priority, then id), and skips jobs whose start-by
  deadline passed;
- ``succeed_run`` wins over a pending cancel request;
- ``fail_run``, ``requeue_run`` and lease recovery end a job with a cancel
  request as ``cancelled``;
- a retryable failure or an expired lease re-queues while attempts remain;
- ``requeue_run`` gives the attempt back;
- a write that names the token of an earlier attempt changes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from supervisor import runs, schema, store, sweeps, transitions
from supervisor.transitions import Status

SUPERVISORS = (uuid.UUID("6f1d0c6e-0000-4000-8000-000000000001"), uuid.UUID("6f1d0c6e-0000-4000-8000-000000000002"))
# Few keys, so that submits with a key often meet an active job with that key.
KEYS = ("k1", "k2", "k3")
# Long enough that no lease runs out during an example unless a rule expires it.
LEASE_SECONDS = 3600
# Submits stop at this many queued and running jobs, so steps go to the
# other rules rather than to a growing queue.
MAX_ACTIVE_JOBS = 6
STALE_OPERATIONS = ("succeed", "fail", "cancel", "requeue", "progress", "heartbeat")
TRUNCATE = sa.text(
    f"TRUNCATE {', '.join(table.name for table in schema.metadata.sorted_tables)} RESTART IDENTITY CASCADE"
)

# 25 to 45 s on a 2-core machine with Postgres on the same machine.
MACHINE_SETTINGS = settings(
    max_examples=120,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclasses.dataclass
class ModelJob:
    """What the store should hold for one job."""

    id: int
    key: str | None
    priority: int
    max_attempts: int
    status: str = Status.QUEUED
    attempt: int = 0
    token: uuid.UUID | None = None
    owner: uuid.UUID | None = None
    cancel_requested: bool = False
    # Whether the current run reached a worker (runs.mark_started).
    started: bool = False
    # Set by rules that move a deadline into the past with SQL.
    start_by_passed: bool = False
    results_due: bool = False
    # (token, owner) of every earlier run of this job.
    old_runs: list[tuple[uuid.UUID, uuid.UUID]] = dataclasses.field(default_factory=list)
    # Expected event kinds, in order.
    events: list[str] = dataclasses.field(default_factory=lambda: ["submitted"])

    def end_run(self, status: str) -> None:
        """Move a running job to ``status`` and keep its token as a stale one."""
        assert self.token is not None and self.owner is not None
        self.old_runs.append((self.token, self.owner))
        self.token = None
        self.owner = None
        self.status = status


class StoreMachine(RuleBasedStateMachine):
    """Rules call the store; invariants compare the database with ``self.jobs``."""

    # Set by the test function before the machine runs.
    engine: sa.Engine

    def __init__(self):
        super().__init__()
        with self.engine.begin() as connection:
            connection.execute(TRUNCATE)
        self.jobs: dict[int, ModelJob] = {}
        # Status of each job in the database at the previous check.
        self.seen_status: dict[int, str] = {}

    # Helpers -------------------------------------------------------------

    def jobs_in(self, *statuses: str) -> list[ModelJob]:
        return [job for job in self.jobs.values() if job.status in statuses]

    def has_running(self) -> bool:
        return bool(self.jobs_in(Status.RUNNING))

    def has_queued(self) -> bool:
        return bool(self.jobs_in(Status.QUEUED))

    def has_past_runs(self) -> bool:
        return any(job.old_runs for job in self.jobs.values())

    def has_passed_deadline(self) -> bool:
        """Return whether a sweep could expire a job now or after a later re-queue."""
        return any(
            (job.start_by_passed and job.status in transitions.ACTIVE)
            or (job.results_due and job.status == Status.SUCCEEDED)
            for job in self.jobs.values()
        )

    def draw_job(self, data, statuses: tuple[str, ...] | None = None) -> ModelJob:
        candidates = self.jobs_in(*statuses) if statuses is not None else list(self.jobs.values())
        job_id = data.draw(st.sampled_from(sorted(job.id for job in candidates)), label="job id")
        return self.jobs[job_id]

    def read_row(self, job_id: int) -> dict:
        with self.engine.connect() as connection:
            row = connection.execute(sa.text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).one()
            events = connection.execute(
                sa.text("SELECT count(*) FROM job_events WHERE job_id = :id"), {"id": job_id}
            ).scalar_one()
        return {**row._mapping, "event_count": events}

    def set_in_past(self, job_id: int, column: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                sa.text(f"UPDATE jobs SET {column} = now() - interval '1 second' WHERE id = :id"), {"id": job_id}
            )

    # Submit and claim ----------------------------------------------------

    @precondition(lambda self: len(self.jobs_in(*transitions.ACTIVE)) < MAX_ACTIVE_JOBS)
    @rule(
        key=st.sampled_from((None, *KEYS)),
        priority=st.integers(0, 1),
        max_attempts=st.integers(1, 3),
        with_start_by=st.booleans(),
    )
    def submit(self, key, priority, max_attempts, with_start_by):
        start_by = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1) if with_start_by else None
        active = [job for job in self.jobs_in(*transitions.ACTIVE) if key is not None and job.key == key]

        result = store.submit(self.engine, "noop", {}, user="alice", key=key, priority=priority,
                              max_attempts=max_attempts, start_by=start_by)

        if active:
            assert result.deduplicated
            assert result.job.id == active[0].id
            return
        assert not result.deduplicated
        assert result.job.id not in self.jobs
        self.jobs[result.job.id] = ModelJob(result.job.id, key, priority, max_attempts)

    @precondition(has_queued)
    @rule(supervisor=st.sampled_from(SUPERVISORS), limit=st.integers(1, 4), started=st.booleans())
    def claim(self, supervisor, limit, started):
        claimable = [
            job for job in self.jobs_in(Status.QUEUED)
            if not job.cancel_requested and not job.start_by_passed
        ]
        expected = sorted(claimable, key=lambda job: (-job.priority, job.id))[:limit]

        claimed = runs.claim_jobs(self.engine, supervisor, limit, lease_seconds=LEASE_SECONDS)

        assert [job.id for job in claimed] == [job.id for job in expected]
        for row in claimed:
            job = self.jobs[row.id]
            assert row.attempt_token is not None
            assert row.attempt_token not in {token for token, _ in job.old_runs}
            job.status = Status.RUNNING
            job.attempt += 1
            job.token = row.attempt_token
            job.owner = supervisor
            job.started = started
            job.events.append("claimed")
        if started:
            runs.mark_started(self.engine, [(row.id, row.attempt_token) for row in claimed])

    # Writes of a current run ---------------------------------------------

    @precondition(has_running)
    @rule(data=st.data(), record_event=st.booleans())
    def record_progress(self, data, record_event):
        job = self.draw_job(data, (Status.RUNNING,))
        update = runs.ProgressUpdate(job.id, job.token, "steps", 3, 10, "working", 1.5, 4.0,
                                     record_event=record_event)

        assert runs.record_progress(self.engine, [update]) == 1

        if record_event:
            job.events.append("progress")

    @precondition(lambda self: self.has_running() or self.has_past_runs())
    @rule(supervisor=st.sampled_from(SUPERVISORS))
    def heartbeat(self, supervisor):
        stale_tokens = [token for job in self.jobs.values() for token, owner in job.old_runs if owner == supervisor]
        current_tokens = {job.token for job in self.jobs_in(Status.RUNNING) if job.owner == supervisor}

        renewed = runs.heartbeat(self.engine, supervisor, stale_tokens + sorted(current_tokens),
                                 lease_seconds=LEASE_SECONDS)

        assert renewed == current_tokens

    @precondition(has_running)
    @rule(data=st.data(), ttl=st.sampled_from((None, 3600.0)))
    def succeed(self, data, ttl):
        job = self.draw_job(data, (Status.RUNNING,))

        assert runs.succeed_run(self.engine, job.id, job.token, {"ok": True}, results_ttl_seconds=ttl)

        job.end_run(Status.SUCCEEDED)
        job.events.append("succeeded")

    @precondition(has_running)
    @rule(data=st.data(), stage=st.sampled_from(("cooperative", "terminate", "kill")))
    def cancel_stopped_run(self, data, stage):
        job = self.draw_job(data, (Status.RUNNING,))

        assert runs.cancel_run(self.engine, job.id, job.token, stage=stage)

        job.end_run(Status.CANCELLED)
        job.events.append("cancelled")

    @precondition(has_running)
    @rule(data=st.data(), retryable=st.booleans())
    def fail(self, data, retryable):
        job = self.draw_job(data, (Status.RUNNING,))
        if job.cancel_requested:
            expected = Status.CANCELLED
        elif retryable and job.attempt < job.max_attempts:
            expected = Status.QUEUED
        else:
            expected = Status.FAILED

        status = runs.fail_run(self.engine, job.id, job.token, {"code": "worker_died", "message": "exit 1"},
                               retryable=retryable, retry_delay=0)

        assert status == expected
        job.end_run(expected)
        job.events.append({"queued": "retried", "failed": "failed", "cancelled": "cancelled"}[expected])

    @precondition(has_running)
    @rule(data=st.data())
    def requeue(self, data):
        job = self.draw_job(data, (Status.RUNNING,))
        expected = Status.CANCELLED if job.cancel_requested else Status.QUEUED

        status = runs.requeue_run(self.engine, job.id, job.token, reason="shutdown")

        assert status == expected
        job.end_run(expected)
        if expected == Status.QUEUED:
            job.attempt -= 1
            job.events.append("requeued")
        else:
            job.events.append("cancelled")

    # Cancel requests -----------------------------------------------------

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def request_cancel(self, data):
        job = self.draw_job(data)
        status_before = job.status

        result = store.request_cancel(self.engine, job.id, by="bob")

        if status_before == Status.QUEUED:
            assert result.outcome == "cancelled"
            job.status = Status.CANCELLED
            job.cancel_requested = True
            job.events.append("cancelled")
        elif status_before == Status.RUNNING:
            assert result.outcome == "requested"
            if not job.cancel_requested:
                job.events.append("cancel_requested")
            job.cancel_requested = True
        else:
            assert result.outcome == "finished"
        assert result.job.status == job.status

    @precondition(has_running)
    @rule(data=st.data())
    def request_cancel_of_running(self, data):
        # The rule above picks among all jobs, most of them finished; this one
        # makes the paths that end a run with a cancel request common.
        job = self.draw_job(data, (Status.RUNNING,))

        result = store.request_cancel(self.engine, job.id, by="carol")

        assert result.outcome == "requested"
        assert result.job.status == Status.RUNNING
        if not job.cancel_requested:
            job.events.append("cancel_requested")
        job.cancel_requested = True

    # Sweeps --------------------------------------------------------------

    @precondition(has_running)
    @rule(data=st.data())
    def expire_lease(self, data):
        job = self.draw_job(data, (Status.RUNNING,))
        self.set_in_past(job.id, "lease_expires_at")
        if job.cancel_requested:
            expected = Status.CANCELLED
        elif job.attempt < job.max_attempts or not job.started:
            expected = Status.QUEUED
        else:
            expected = Status.FAILED
        if not job.started and not job.cancel_requested:
            job.attempt -= 1  # a run that never reached a worker gives its attempt back
        owner = job.owner

        recovered = sweeps.recover_expired_leases(self.engine)

        assert [item.job_id for item in recovered] == [job.id]
        assert recovered[0].status == expected
        assert recovered[0].attempt == job.attempt
        assert recovered[0].previous_owner == str(owner)
        job.end_run(expected)
        job.events.append("lease_expired")

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def pass_start_by(self, data):
        # Any status: a running job whose deadline passed is still re-queued,
        # then neither claimed again nor kept once the sweep runs.
        job = self.draw_job(data)

        self.set_in_past(job.id, "start_by")

        job.start_by_passed = True

    @precondition(lambda self: self.jobs_in(Status.SUCCEEDED))
    @rule(data=st.data())
    def pass_results_expiry(self, data):
        job = self.draw_job(data, (Status.SUCCEEDED,))

        self.set_in_past(job.id, "results_expire_at")

        job.results_due = True

    @precondition(has_passed_deadline)
    @rule()
    def expire_sweep(self):
        late = [job for job in self.jobs_in(Status.QUEUED) if job.start_by_passed]
        due = [job for job in self.jobs_in(Status.SUCCEEDED) if job.results_due]

        expired = sweeps.expire_jobs(self.engine)

        assert sorted(expired["start_by"]) == sorted(job.id for job in late)
        assert sorted(expired["results"]) == sorted(job.id for job in due)
        assert expired["files"] == []
        for job in [*late, *due]:
            job.status = Status.EXPIRED
            job.events.append("expired")

    # Stale runs ----------------------------------------------------------

    @precondition(has_past_runs)
    @rule(data=st.data(), operation=st.sampled_from(STALE_OPERATIONS), retryable=st.booleans())
    def write_with_stale_token(self, data, operation, retryable):
        job_id = data.draw(
            st.sampled_from(sorted(job.id for job in self.jobs.values() if job.old_runs)), label="job id"
        )
        job = self.jobs[job_id]
        token, owner = data.draw(st.sampled_from(job.old_runs), label="stale run")
        before = self.read_row(job.id)

        if operation == "succeed":
            assert not runs.succeed_run(self.engine, job.id, token, {"stale": True}, results_ttl_seconds=60)
        elif operation == "fail":
            outcome = runs.fail_run(self.engine, job.id, token, {"code": "x", "message": "stale"},
                                    retryable=retryable, retry_delay=0)
            assert outcome is None
        elif operation == "cancel":
            assert not runs.cancel_run(self.engine, job.id, token, stage="kill")
        elif operation == "requeue":
            assert runs.requeue_run(self.engine, job.id, token, reason="shutdown") is None
        elif operation == "progress":
            update = runs.ProgressUpdate(job.id, token, "stale", 1, 1, None, None, None, record_event=True)
            assert runs.record_progress(self.engine, [update]) == 0
        else:
            assert runs.heartbeat(self.engine, owner, [token], lease_seconds=LEASE_SECONDS) == set()

        assert self.read_row(job.id) == before

    # Invariants ----------------------------------------------------------

    @invariant()
    def database_matches_model(self):
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT id, status, attempt, max_attempts, job_key, attempt_token, lease_owner, "
                    "cancel_requested_at IS NOT NULL AS cancel_requested FROM jobs ORDER BY id"
                )
            ).all()

        assert [row.id for row in rows] == sorted(self.jobs)
        for row in rows:
            job = self.jobs[row.id]
            assert row.status == job.status, f"job {row.id}"
            assert row.attempt == job.attempt, f"job {row.id}"
            assert row.max_attempts == job.max_attempts, f"job {row.id}"
            assert row.job_key == job.key, f"job {row.id}"
            assert row.attempt_token == job.token, f"job {row.id}"
            assert row.lease_owner == job.owner, f"job {row.id}"
            assert row.cancel_requested == job.cancel_requested, f"job {row.id}"

    @invariant()
    def status_changes_follow_table(self):
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT id, status FROM jobs")).all()

        for row in rows:
            previous = self.seen_status.get(row.id)
            if previous is None:
                assert row.status == Status.QUEUED, f"new job {row.id} is {row.status}"
            elif previous != row.status:
                assert transitions.is_allowed(previous, row.status), f"job {row.id}: {previous} -> {row.status}"
                if transitions.is_terminal(previous):
                    assert (previous, row.status) == (Status.SUCCEEDED, Status.EXPIRED), f"job {row.id}"
            self.seen_status[row.id] = row.status

    @invariant()
    def one_active_job_per_key(self):
        with self.engine.connect() as connection:
            duplicates = connection.execute(
                sa.text(
                    "SELECT job_key, count(*) FROM jobs WHERE job_key IS NOT NULL "
                    "AND status IN ('queued', 'running') GROUP BY job_key HAVING count(*) > 1"
                )
            ).all()

        assert duplicates == []

    @invariant()
    def attempts_within_limit(self):
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT id, status, attempt, max_attempts FROM jobs")).all()

        for row in rows:
            assert 0 <= row.attempt <= row.max_attempts, f"job {row.id}"
            if row.status == Status.QUEUED:
                assert row.attempt < row.max_attempts, f"queued job {row.id} has no attempt left"

    @invariant()
    def lease_only_while_running(self):
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT id, status, lease_owner, lease_expires_at, attempt_token, finished_at FROM jobs")
            ).all()

        for row in rows:
            running = row.status == Status.RUNNING
            assert (row.lease_owner is not None) == running, f"job {row.id}"
            assert (row.lease_expires_at is not None) == running, f"job {row.id}"
            assert (row.attempt_token is not None) == running, f"job {row.id}"
            assert (row.finished_at is None) == (row.status in transitions.ACTIVE), f"job {row.id}"

    @invariant()
    def events_gap_free_and_expected(self):
        with self.engine.connect() as connection:
            counters = dict(connection.execute(sa.text("SELECT id, event_seq FROM jobs")).all())
            events = connection.execute(
                sa.text("SELECT job_id, seq, kind, created_at FROM job_events ORDER BY job_id, seq")
            ).all()

        by_job: dict[int, list] = {job_id: [] for job_id in counters}
        for event in events:
            by_job[event.job_id].append(event)
        for job_id, job_events in by_job.items():
            assert [event.seq for event in job_events] == list(range(1, len(job_events) + 1)), f"job {job_id}"
            assert counters[job_id] == len(job_events), f"job {job_id}"
            times = [event.created_at for event in job_events]
            assert times == sorted(times), f"job {job_id}"
            assert [event.kind for event in job_events] == self.jobs[job_id].events, f"job {job_id}"


def test_store_matches_model(engine):
    machine = type("BoundStoreMachine", (StoreMachine,), {"engine": engine})

    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
