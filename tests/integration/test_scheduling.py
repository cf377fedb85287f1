"""Claim order and concurrency limits: fairness between users, aging priority, limits.

The claim statement is tested directly here, without supervisors: each test
inserts jobs, claims and checks which jobs were taken. The end-to-end flood
and limit scenarios with real supervisors are in test_supervisor_policies.py.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import threading
import uuid

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import db, runs, store
from supervisor.errors import InvalidRequest

OWNER = uuid.UUID(int=1)
OTHER = uuid.UUID(int=2)


def submit(engine, user="alice", analysis="noop", priority=0) -> int:
    return store.submit(engine, analysis, {}, user=user, priority=priority).job.id


def claim(engine, limit, owner=OWNER) -> list[store.Job]:
    return runs.claim_jobs(engine, owner, limit, lease_seconds=30)


def running_by(engine, column: str) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            f"SELECT {column}, count(*) FROM jobs WHERE status = 'running' GROUP BY 1")).all()
    return dict(rows)


# Fairness and order --------------------------------------------------------------


def test_second_user_is_not_queued_behind_a_flood(engine):
    flood = [submit(engine, "alice") for _ in range(50)]
    late = [submit(engine, "bob") for _ in range(3)]

    claimed = [job.id for job in claim(engine, 4)]

    # Users alternate, each user's own jobs in submit order.
    assert claimed == [flood[0], late[0], flood[1], late[1]]


def test_user_with_fewest_running_jobs_goes_first(engine):
    for _ in range(3):
        submit(engine, "alice")
    claim(engine, 3)
    bob = [submit(engine, "bob") for _ in range(3)]
    submit(engine, "alice")

    claimed = [job.id for job in claim(engine, 3)]

    assert claimed == bob, "bob has nothing running, alice three"


def test_analysis_with_fewest_running_jobs_goes_first(engine):
    noop_jobs = [store.submit(engine, "noop", {"steps": n}, user="alice").job.id for n in range(3)]
    claim(engine, 1)
    other = store.submit(engine, "noop", {"steps": 99}, user="alice").job.id

    # Same user and analysis: plain queue order; the analysis split is
    # checked with a second analysis name inserted directly.
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET analysis = 'matrix-profile' WHERE id = :id"), {"id": other})

    claimed = [job.id for job in claim(engine, 2)]

    assert claimed == [other, noop_jobs[1]]


def test_priority_wins_within_a_user_and_ages(engine):
    low = submit(engine, priority=0)
    high = submit(engine, priority=5)
    assert [job.id for job in claim(engine, 1)] == [high]

    store.request_cancel(engine, low, by="test")
    old_low = submit(engine, priority=0)
    new_high = submit(engine, priority=5)
    # Six minutes of waiting are worth more than five points of priority.
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET queue_key = queue_key - 6 * :step WHERE id = :id"),
                           {"id": old_low, "step": store.PRIORITY_STEP_SECONDS})

    assert [job.id for job in claim(engine, 1)] == [old_low]
    assert [job.id for job in claim(engine, 1)] == [new_high]


def test_queue_key_is_submit_time_less_priority_steps(engine):
    job = store.submit(engine, "noop", {}, user="alice", priority=-3).job

    assert job.queue_key == pytest.approx(job.created_at.timestamp() + 3 * store.PRIORITY_STEP_SECONDS, abs=1e-3)


# Limits ------------------------------------------------------------------------


def test_user_limit_holds_and_leaves_room_for_others(engine):
    store.set_limit(engine, "user", "alice", 2)
    for _ in range(5):
        submit(engine, "alice")
    bob = submit(engine, "bob")

    claimed = claim(engine, 10)

    assert sorted(job.submitted_by for job in claimed) == ["alice", "alice", "bob"]
    assert bob in [job.id for job in claimed]
    assert claim(engine, 10) == [], "alice is at her limit"


def test_default_user_limit_applies_to_others(engine):
    store.set_limit(engine, "user", store.ANY, 1)
    store.set_limit(engine, "user", "alice", 3)
    for user in ("alice", "bob", "carol"):
        for _ in range(4):
            submit(engine, user)

    claim(engine, 20)

    assert running_by(engine, "submitted_by") == {"alice": 3, "bob": 1, "carol": 1}


def test_analysis_limit_and_zero_hold_jobs(engine):
    store.set_limit(engine, "analysis", "noop", 0)
    submit(engine)

    assert claim(engine, 5) == []

    store.set_limit(engine, "analysis", "noop", 1)
    assert len(claim(engine, 5)) == 1
    assert store.clear_limit(engine, "analysis", "noop") is True
    assert store.clear_limit(engine, "analysis", "noop") is False


def test_analysis_blocked_job_keeps_user_room(engine):
    # alice may run 2; matrix-profile may run 1 and already does. Her queue
    # starts with a second matrix-profile job, which must not keep her other
    # jobs from her two places.
    store.set_limit(engine, "user", "alice", 2)
    store.set_limit(engine, "analysis", "matrix-profile", 1)
    blocker = submit(engine, "bob")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET analysis = 'matrix-profile' WHERE id = :id"), {"id": blocker})
    claim(engine, 1)
    first = submit(engine, "alice")
    others = [submit(engine, "alice") for _ in range(2)]
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET analysis = 'matrix-profile' WHERE id = :id"), {"id": first})

    claimed = [job.id for job in claim(engine, 5)]

    assert claimed == others


def test_claim_repeats_after_analysis_limit_drop(engine):
    # matrix-profile may run 1; bob may run 1. bob's first job competes with
    # ann's older matrix-profile job and loses; his next job, of another
    # analysis, must still start in the same claim.
    store.set_limit(engine, "analysis", "matrix-profile", 1)
    store.set_limit(engine, "user", "bob", 1)
    ann = submit(engine, "ann")
    bob_first = submit(engine, "bob")
    bob_next = submit(engine, "bob")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET analysis = 'matrix-profile' WHERE id IN (:a, :b)"),
                           {"a": ann, "b": bob_first})

    claimed = sorted(job.id for job in claim(engine, 5))

    assert claimed == [ann, bob_next]


def test_limits_hold_under_concurrent_claimers(engine):
    store.set_limit(engine, "user", store.ANY, 2)
    store.set_limit(engine, "analysis", "noop", 5)
    for index in range(60):
        submit(engine, f"user{index % 4}")
    worst = collections.Counter()
    errors = []

    def claimer(owner):
        try:
            for _ in range(10):
                claim(engine, 3, owner=owner)
                counts = running_by(engine, "submitted_by")
                worst["user"] = max(worst["user"], *counts.values(), 0)
                worst["total"] = max(worst["total"], sum(counts.values()))
                # Finish one job of ours, so there is room to claim again.
                with engine.connect() as connection:
                    row = connection.execute(sa.text(
                        "SELECT id, attempt_token FROM jobs WHERE status = 'running' AND lease_owner = :owner "
                        "LIMIT 1"), {"owner": owner}).first()
                if row is not None:
                    runs.succeed_run(engine, row.id, row.attempt_token, {})
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=claimer, args=(uuid.uuid4(),)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert worst["user"] <= 2
    assert worst["total"] <= 5


@pytest.mark.parametrize(("scope", "name", "value", "field"), [
    ("group", "x", 1, "scope"),
    ("user", "", 1, "name"),
    ("user", "a\x00b", 1, "name"),
    ("user", "x" * 101, 1, "name"),
    ("analysis", "no-such-analysis", 1, "name"),
    ("user", "alice", -1, "max_running"),
    ("user", "alice", 10_001, "max_running"),
    ("user", "alice", True, "max_running"),
    ("user", "alice", 1.5, "max_running"),
])
def test_set_limit_rejects_bad_input_and_writes_nothing(engine, scope, name, value, field):
    with pytest.raises(InvalidRequest) as raised:
        store.set_limit(engine, scope, name, value)

    assert raised.value.field == field
    assert store.list_limits(engine) == []


# Property: maximal and fair claims under any mix -------------------------------

USERS = ("ann", "ben", "cat")
ANALYSES = ("noop", "matrix-profile", "co-occurrence")

job_specs = st.lists(st.tuples(st.sampled_from(USERS), st.sampled_from(ANALYSES), st.integers(-2, 2),
                               st.booleans()), min_size=1, max_size=25)
limit_specs = st.dictionaries(
    st.tuples(st.sampled_from(("user", "analysis")), st.sampled_from((*USERS, *ANALYSES, store.ANY))),
    st.integers(0, 4), max_size=4,
).map(lambda limits: {(scope, name): value for (scope, name), value in limits.items()
                      if name == store.ANY or (name in USERS) == (scope == "user")})


def limit_of(limits, scope, name):
    if (scope, name) in limits:
        return limits[(scope, name)]
    return limits.get((scope, store.ANY))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=job_specs, limits=limit_specs, free=st.integers(1, 8))
def test_claims_are_maximal_within_limits_and_fair(engine, specs, limits, free):
    """No eligible job waits while a slot is free and its limits allow it; limits hold; users share fairly."""
    with engine.begin() as connection:
        connection.execute(sa.text("TRUNCATE jobs, job_events, job_limits RESTART IDENTITY CASCADE"))
        for index, (user, analysis, priority, running) in enumerate(specs):
            connection.execute(sa.text(
                "INSERT INTO jobs (analysis, params, submitted_by, max_attempts, priority, queue_key, status, "
                "attempt, lease_owner, lease_expires_at, attempt_token) VALUES (:analysis, '{}', :user, 3, "
                ":priority, :key, :status, :attempt, :owner, :expires, :token)"),
                {"analysis": analysis, "user": user, "priority": priority,
                 "key": 1000 + index - priority * store.PRIORITY_STEP_SECONDS,
                 "status": "running" if running else "queued", "attempt": 1 if running else 0,
                 "owner": OTHER if running else None, "expires": "2999-01-01" if running else None,
                 "token": uuid.uuid4() if running else None})
    for (scope, name), value in limits.items():
        store.set_limit(engine, scope, name, value)
    with engine.connect() as connection:
        before = {row.id: row for row in connection.execute(sa.text("SELECT * FROM jobs"))}

    claimed = claim(engine, free)

    running = collections.Counter()
    for job in before.values():
        if job.status == "running":
            running[("user", job.submitted_by)] += 1
            running[("analysis", job.analysis)] += 1
    claimed_ids = {job.id for job in claimed}
    for job in claimed:
        running[("user", job.submitted_by)] += 1
        running[("analysis", job.analysis)] += 1
        # Limits hold for every claimed job.
        for scope, name in (("user", job.submitted_by), ("analysis", job.analysis)):
            cap = limit_of(limits, scope, name)
            assert cap is None or running[(scope, name)] <= cap, (scope, name, cap)

    waiting = [job for job in before.values() if job.status == "queued" and job.id not in claimed_ids]
    for job in waiting:
        # Each (user, analysis) pair is claimed in queue-key order.
        for other in claimed:
            if (other.submitted_by, other.analysis) == (job.submitted_by, job.analysis):
                assert before[other.id].queue_key <= job.queue_key
        if len(claimed) < free:
            user_cap = limit_of(limits, "user", job.submitted_by)
            analysis_cap = limit_of(limits, "analysis", job.analysis)
            blocked = (user_cap is not None and running[("user", job.submitted_by)] >= user_cap) or (
                analysis_cap is not None and running[("analysis", job.analysis)] >= analysis_cap)
            assert blocked, f"job {job.id} waits with a free slot and room under its limits"

    if not limits and waiting:
        # Water filling: a user left waiting ends with at most one running
        # job fewer than any user who was given a job in this claim.
        given_users = {job.submitted_by for job in claimed}
        for job in waiting:
            for user in given_users:
                assert running[("user", job.submitted_by)] >= running[("user", user)] - 1


# Property: the one-pair claim statement picks what the full one picks --------

# (user, analysis, queue key, state) of one job; "late" is not yet due,
# "cancelling" has a cancel request, "expired" is past its start-by time.
# Most jobs share one pair, so that many examples have one pair waiting.
PAIRS = [(USERS[0], ANALYSES[0])] * 6 + [(USERS[1], ANALYSES[0]), (USERS[0], ANALYSES[1])]
pair_job_specs = st.lists(
    st.tuples(st.sampled_from(PAIRS), st.integers(0, 6),
              st.sampled_from(("queued", "queued", "queued", "running", "late", "cancelling", "expired"))
              ).map(lambda spec: (*spec[0], *spec[1:])),
    max_size=12)


def run_claim_statement(engine, statement, limit, starting) -> tuple[bool | None, list[int]]:
    """Run one claim statement in a transaction that is rolled back; return ``applies`` and the claimed ids."""
    params = {"limit": limit, "owner": OWNER, "lease": 30.0, "sources": ["queued"], "starting": starting,
              "channel": store.CHANGES_CHANNEL, "notify": False}
    with engine.connect() as connection:
        rows = connection.execute(statement, params).mappings().all()
        connection.rollback()
    applies = rows[0]["applies"] if rows and "applies" in rows[0] else None
    return applies, [row["id"] for row in rows if row["id"] is not None]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=pair_job_specs, limited=st.booleans(), limit=st.integers(1, 5), starting=st.integers(0, 3))
def test_one_pair_claim_matches_full_claim(engine, specs, limited, limit, starting):
    """Where the one-pair statement applies, it claims the same jobs in the same order as the full one."""
    with engine.begin() as connection:
        connection.execute(sa.text("TRUNCATE jobs, job_events, job_limits RESTART IDENTITY CASCADE"))
        for user, analysis, key, state in specs:
            running = state == "running"
            connection.execute(sa.text(
                "INSERT INTO jobs (analysis, params, submitted_by, max_attempts, queue_key, status, attempt, "
                "lease_owner, lease_expires_at, attempt_token, run_after, cancel_requested_at, start_by) "
                "VALUES (:analysis, '{}', :user, 3, :key, :status, :attempt, :owner, :expires, :token, "
                "now() + make_interval(secs => :delay), :cancel, :start_by)"),
                {"analysis": analysis, "user": user, "key": 1000 + key,
                 "status": "running" if running else "queued", "attempt": 1 if running else 0,
                 "owner": OTHER if running else None, "expires": "2999-01-01" if running else None,
                 "token": uuid.uuid4() if running else None, "delay": 3600 if state == "late" else -1,
                 "cancel": dt.datetime.now(dt.timezone.utc) if state == "cancelling" else None,
                 "start_by": "2000-01-01" if state == "expired" else None})
    if limited:
        store.set_limit(engine, "user", "nobody", 1)
    waiting_pairs = {(user, analysis) for user, analysis, _, state in specs if state != "running"}

    applies, one_pair = run_claim_statement(engine, runs._CLAIM_ONE_PAIR, limit, starting)
    _, full = run_claim_statement(engine, runs._CLAIM, limit, starting)

    expected = len(waiting_pairs) <= 1 and not limited
    assert applies == expected
    if applies:
        assert one_pair == full
    else:
        assert one_pair == []


def test_claim_two_pairs_uses_full_statement(engine):
    alice = [submit(engine, "alice") for _ in range(2)]
    bob = submit(engine, "bob")

    # Standalone claims try the one-pair statement first; two users wait.
    claimed = [job.id for job in claim(engine, 3)]

    assert claimed == [alice[0], bob, alice[1]]


# Run policy defaults of an analysis ------------------------------------------


@pytest.fixture
def strict_analysis(monkeypatch):
    """An analysis with its own deadlines, memory limit and backoff, registered for one test."""
    from analyses import noop, registry

    analysis = dataclasses.replace(noop.NOOP, name="strict-noop", start_within_seconds=120.0,
                                   memory_limit_mib=256, timeout_seconds=30.0, retry_base_seconds=7.0,
                                   retry_max_seconds=20.0)
    monkeypatch.setitem(registry._registry, analysis.name, analysis)
    return analysis


def test_analysis_defaults_set_start_by_memory_and_timeout(engine, strict_analysis):
    job = store.submit(engine, strict_analysis.name, {}, user="alice").job

    assert (job.start_by - job.created_at).total_seconds() == pytest.approx(120.0, abs=0.01)
    assert job.memory_limit_mib == 256
    assert job.timeout_seconds == 30.0


def test_submit_arguments_override_analysis_defaults(engine, strict_analysis):
    start_by = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)

    job = store.submit(engine, strict_analysis.name, {}, user="alice", start_by=start_by, memory_limit_mib=64,
                       timeout_seconds=5.0).job

    assert job.start_by == start_by
    assert job.memory_limit_mib == 64
    assert job.timeout_seconds == 5.0


def test_retry_delay_uses_analysis_backoff_before_settings(settings, strict_analysis):
    from analyses import noop
    from supervisor.loop import retry_delay

    own = [retry_delay(strict_analysis, settings, attempt) for attempt in (1, 2, 5)]
    default = retry_delay(noop.NOOP, settings.replace(retry_base_seconds=0.5, retry_max_seconds=1.0), 5)

    assert 3.5 <= own[0] <= 7.0
    assert 7.0 <= own[1] <= 14.0
    assert 10.0 <= own[2] <= 20.0
    assert 0.5 <= default <= 1.0


@pytest.mark.parametrize("value", [0, -5, True, 2.5, store.MAX_MEMORY_LIMIT_MIB + 1, "512"])
def test_submit_rejects_bad_memory_limit(engine, value):
    with pytest.raises(InvalidRequest) as raised:
        store.submit(engine, "noop", {}, user="alice", memory_limit_mib=value)

    assert raised.value.field == "memory_limit_mib"
    assert store.list_jobs(engine) == []


def test_claim_lost_connection_raises_operational_error(engine, database_url):
    submit(engine)
    connection = db.connect_driver(database_url)
    with engine.begin() as admin:
        admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": connection.info.backend_pid})

    # The supervisor's loop retries on OperationalError and opens a new connection once this one is closed.
    with connection:
        with pytest.raises(sa.exc.OperationalError):
            runs.claim_jobs(connection, OWNER, 1, lease_seconds=30)
        assert connection.closed

    with db.connect_driver(database_url) as fresh:
        claimed = runs.claim_jobs(fresh, OWNER, 1, lease_seconds=30)
    assert len(claimed) == 1
