"""Job store against a real Postgres: submit, claim, finish, cancel, sweeps."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from supervisor import runs, store, sweeps
from supervisor.errors import InvalidRequest, JobNotFound

OWNER = uuid.UUID(int=1)
OTHER = uuid.UUID(int=2)


def count_jobs(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()


def event_kinds(engine, job_id) -> list[str]:
    return [event.kind for event in store.list_events(engine, job_id)]


def expire_lease(engine, job_id) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"), {"id": job_id}
        )


def test_submit_creates_queued_job(engine):
    result = store.submit(engine, "noop", {"steps": 3}, user="alice")

    assert not result.deduplicated
    assert result.job.status == "queued"
    assert result.job.params["steps"] == 3
    assert result.job.params["step_seconds"] == 0.0
    assert result.job.attempt == 0
    assert event_kinds(engine, result.job.id) == ["submitted"]


@pytest.mark.parametrize(
    ("analysis", "params", "field"),
    [
        ("no-such-analysis", {}, "analysis"),
        ("noop", {"steps": -1}, "steps"),
        ("noop", {"steps": "many"}, "steps"),
        ("noop", {"threshold": 1}, "threshold"),
        ("noop", {"step_seconds": float("nan")}, "step_seconds"),
        ("noop", {"step_seconds": float("inf")}, "step_seconds"),
        ("noop", {"result": {"x": float("nan")}}, "params"),
        ("noop", {"run_log": "a\x00b"}, "run_log"),
        ("noop", {"result": {"ids": ["sensor-%06d" % i for i in range(30000)]}}, "params"),
    ],
)
def test_submit_rejects_bad_input_and_writes_nothing(engine, analysis, params, field):
    with pytest.raises(InvalidRequest) as caught:
        store.submit(engine, analysis, params, user="alice")

    assert caught.value.field == field
    assert count_jobs(engine) == 0


@pytest.mark.parametrize(
    "arguments",
    [{"user": ""}, {"user": "a\nb"}, {"user": "x" * 101}, {"user": "alice", "key": ""},
     {"user": "alice", "priority": 5000}, {"user": "alice", "max_attempts": 0}],
)
def test_submit_rejects_bad_arguments(engine, arguments):
    with pytest.raises(InvalidRequest):
        store.submit(engine, "noop", {}, **arguments)

    assert count_jobs(engine) == 0


def test_submit_same_key_returns_existing_job(engine):
    first = store.submit(engine, "noop", {"steps": 1}, user="alice", key="k1")
    second = store.submit(engine, "noop", {"steps": 2}, user="bob", key="k1")

    assert second.deduplicated
    assert second.job.id == first.job.id
    assert count_jobs(engine) == 1


def test_submit_same_key_after_finish_creates_new_job(engine):
    first = store.submit(engine, "noop", {}, user="alice", key="k1").job
    store.request_cancel(engine, first.id, by="alice")

    second = store.submit(engine, "noop", {}, user="alice", key="k1")

    assert not second.deduplicated
    assert second.job.id != first.id


def test_submit_concurrent_same_key_creates_one_job(engine):
    ids, errors = [], []
    barrier = threading.Barrier(50)

    def submit_one():
        barrier.wait()
        try:
            ids.append(store.submit(engine, "noop", {"steps": 50}, user="alice", key="K").job.id)
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=submit_one) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert len(ids) == 50
    assert len(set(ids)) == 1
    assert count_jobs(engine) == 1


def test_submit_waits_for_rolled_back_holder_of_key(engine):
    holder = engine.connect()
    transaction = holder.begin()
    phantom = store.submit(holder, "noop", {}, user="alice", key="K2").job.id
    outcome = {}

    def submit_concurrently():
        outcome["result"] = store.submit(engine, "noop", {}, user="bob", key="K2")

    thread = threading.Thread(target=submit_concurrently)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive(), "the second submit must wait for the uncommitted one"
    transaction.rollback()
    holder.close()
    thread.join(timeout=10)

    result = outcome["result"]
    assert not result.deduplicated
    assert result.job.id != phantom
    assert store.get_job(engine, result.job.id).job_key == "K2"


def test_get_job_unknown_raises(engine):
    with pytest.raises(JobNotFound):
        store.get_job(engine, 12345)


def test_claim_sets_lease_attempt_and_token(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id

    [claimed] = runs.claim_jobs(engine, OWNER, 5, lease_seconds=30)

    assert claimed.id == job_id
    assert claimed.status == "running"
    assert claimed.attempt == 1
    assert claimed.lease_owner == OWNER
    assert claimed.attempt_token is not None
    assert event_kinds(engine, job_id) == ["submitted", "claimed"]


def test_claim_orders_by_priority_then_age(engine):
    low = store.submit(engine, "noop", {}, user="a", priority=-1).job.id
    first = store.submit(engine, "noop", {}, user="a").job.id
    second = store.submit(engine, "noop", {}, user="a").job.id
    high = store.submit(engine, "noop", {}, user="a", priority=5).job.id

    claimed = [job.id for job in runs.claim_jobs(engine, OWNER, 10, lease_seconds=30)]

    assert claimed == [high, first, second, low]


def test_claim_concurrent_claimers_never_share_a_job(engine):
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO jobs (analysis, params, submitted_by, max_attempts) "
            "SELECT 'noop', '{}'::jsonb, 'load', 1 FROM generate_series(1, 1000)"
        ))
    claimed: dict[uuid.UUID, list[int]] = {OWNER: [], OTHER: []}

    def drain(owner):
        while True:
            batch = runs.claim_jobs(engine, owner, 7, lease_seconds=30)
            if not batch:
                return
            claimed[owner].extend(job.id for job in batch)

    threads = [threading.Thread(target=drain, args=(owner,)) for owner in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    everything = claimed[OWNER] + claimed[OTHER]
    assert len(everything) == 1000
    assert len(set(everything)) == 1000


def test_cancel_queued_job_ends_it_at_once(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id

    result = store.request_cancel(engine, job_id, by="alice")

    assert result.outcome == "cancelled"
    assert result.job.status == "cancelled"
    assert runs.claim_jobs(engine, OWNER, 5, lease_seconds=30) == []


def test_cancel_running_job_records_request(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)

    result = store.request_cancel(engine, job_id, by="bob")
    again = store.request_cancel(engine, job_id, by="bob")

    assert result.outcome == "requested"
    assert result.job.status == "running"
    assert again.outcome == "requested"
    assert store.cancel_requests(engine, OWNER) == [(job_id, run.attempt_token)]
    assert runs.cancel_run(engine, job_id, run.attempt_token, stage="cooperative")
    assert store.get_job(engine, job_id).status == "cancelled"
    assert event_kinds(engine, job_id) == ["submitted", "claimed", "cancel_requested", "cancelled"]


def test_success_records_missing_start(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
    assert run.started_at is None

    runs.succeed_run(engine, job_id, run.attempt_token, {"ok": True})

    job = store.get_job(engine, job_id)
    assert job.started_at is not None
    assert job.started_at <= job.finished_at


def test_success_keeps_recorded_start(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30, starting=1)
    time.sleep(0.01)

    runs.succeed_run(engine, job_id, run.attempt_token, {"ok": True})

    job = store.get_job(engine, job_id)
    assert job.started_at == run.started_at
    assert job.started_at < job.finished_at


def test_cancel_finished_job_changes_nothing(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
    runs.succeed_run(engine, job_id, run.attempt_token, {"ok": True})

    result = store.request_cancel(engine, job_id, by="alice")

    assert result.outcome == "finished"
    assert result.job.status == "succeeded"


def test_succeed_stores_summary_results_and_full_progress(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
    runs.record_progress(engine, [runs.ProgressUpdate(job_id, run.attempt_token, "steps", 7, 10, None, 2.0, 1.5)])
    entries = [{"name": "table", "kind": "inline", "value": {"rows": [1, 2]}},
               {"name": "matrix", "kind": "file", "path": "/tmp/m.npy", "size_bytes": 80, "sha256": "ab",
                "format": "npy"}]

    assert runs.succeed_run(engine, job_id, run.attempt_token, {"r": 0.5}, entries, results_ttl_seconds=60)

    job = store.get_job(engine, job_id)
    assert job.status == "succeeded"
    assert job.result == {"r": 0.5}
    assert job.progress_completed == 10
    assert job.progress_eta_seconds == 0
    assert job.lease_owner is None
    assert [entry["name"] for entry in store.list_results(engine, job_id)] == ["matrix", "table"]


def test_succeed_replaces_non_finite_numbers_with_null(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)

    runs.succeed_run(engine, job_id, run.attempt_token, {"values": [1.0, [float("nan"), float("inf")]]})

    job = store.get_job(engine, job_id)
    assert job.result["values"] == [1.0, [None, None]]
    assert job.result["_non_finite"] == ["/values/1/0", "/values/1/1"]


def test_fail_retryable_requeues_with_backoff(engine):
    job_id = store.submit(engine, "noop", {}, user="alice", max_attempts=2).job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)

    status = runs.fail_run(engine, job_id, run.attempt_token, {"code": "worker_died", "message": "x"},
                           retryable=True, retry_delay=60)

    job = store.get_job(engine, job_id)
    assert status == "queued"
    assert job.error["code"] == "worker_died"
    assert job.error["attempt"] == 1
    assert runs.claim_jobs(engine, OWNER, 1, lease_seconds=30) == [], "backoff must delay the next claim"


def test_fail_last_attempt_ends_failed(engine):
    job_id = store.submit(engine, "noop", {}, user="alice", max_attempts=1).job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)

    status = runs.fail_run(engine, job_id, run.attempt_token, {"code": "worker_died", "message": "x"},
                           retryable=True)

    assert status == "failed"
    assert store.get_job(engine, job_id).finished_at is not None


def test_fail_with_cancel_request_ends_cancelled(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
    store.request_cancel(engine, job_id, by="alice")

    status = runs.fail_run(engine, job_id, run.attempt_token, {"code": "worker_died", "message": "x"},
                           retryable=True)

    assert status == "cancelled"


def test_heartbeat_reports_lost_leases(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    runs.register_supervisor(engine, OWNER, host="h", pid=1, version="t", slots=1)
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)

    assert runs.heartbeat(engine, OWNER, [run.attempt_token], lease_seconds=30) == {run.attempt_token}
    expire_lease(engine, job_id)
    sweeps.recover_expired_leases(engine)
    assert runs.heartbeat(engine, OWNER, [run.attempt_token], lease_seconds=30) == set()


def test_recover_expired_lease_requeues_then_fails(engine):
    job_id = store.submit(engine, "noop", {}, user="alice", max_attempts=2).job.id
    for expected in ("queued", "failed"):
        [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
        runs.mark_started(engine, [(job_id, run.attempt_token)])
        expire_lease(engine, job_id)

        [recovered] = sweeps.recover_expired_leases(engine)

        assert recovered.status == expected
    job = store.get_job(engine, job_id)
    assert job.error["code"] == "lease_expired"
    assert job.attempt == 2


def test_stale_run_writes_change_nothing(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    [old] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
    expire_lease(engine, job_id)
    sweeps.recover_expired_leases(engine)
    [new] = runs.claim_jobs(engine, OTHER, 1, lease_seconds=30)

    assert not runs.succeed_run(engine, job_id, old.attempt_token, {"stale": True})
    assert runs.fail_run(engine, job_id, old.attempt_token, {"code": "x", "message": "y"}, retryable=False) is None
    assert not runs.cancel_run(engine, job_id, old.attempt_token, stage="kill")
    assert runs.requeue_run(engine, job_id, old.attempt_token, reason="shutdown") is None
    update = runs.ProgressUpdate(job_id, old.attempt_token, "p", 1, 2, None, None, None)
    assert runs.record_progress(engine, [update]) == 0

    job = store.get_job(engine, job_id)
    assert job.status == "running"
    assert job.attempt_token == new.attempt_token


def test_requeue_gives_attempt_back(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
    runs.record_progress(engine, [runs.ProgressUpdate(job_id, run.attempt_token, "steps", 35, 300, None,
                                                      1.0, 265.0, False)])

    assert runs.requeue_run(engine, job_id, run.attempt_token, reason="shutdown") == "queued"

    job = store.get_job(engine, job_id)
    assert job.attempt == 0
    assert job.lease_owner is None
    assert job.progress_completed is None, "a queued job shows no progress of an earlier run"
    assert event_kinds(engine, job_id)[-1] == "requeued"


def test_expire_start_by_deadline(engine):
    job_id = store.submit(engine, "noop", {}, user="alice", start_by=dt.datetime.now(dt.timezone.utc)).job.id
    time.sleep(0.05)

    expired = sweeps.expire_jobs(engine)

    assert expired["start_by"] == [job_id]
    assert store.get_job(engine, job_id).status == "expired"


def test_expire_results_keeps_summary(engine):
    job_id = store.submit(engine, "noop", {}, user="alice").job.id
    [run] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
    entry = {"name": "m", "kind": "file", "path": "/tmp/x.npy", "size_bytes": 1, "sha256": "00", "format": "npy"}
    runs.succeed_run(engine, job_id, run.attempt_token, {"n": 1}, [entry], results_ttl_seconds=0.01)
    time.sleep(0.05)

    expired = sweeps.expire_jobs(engine)

    job = store.get_job(engine, job_id)
    assert expired["results"] == [job_id]
    assert expired["files"] == ["/tmp/x.npy"]
    assert job.status == "expired"
    assert job.result == {"n": 1}
    assert store.list_results(engine, job_id) == []


def test_prune_deletes_old_finished_jobs_only(engine):
    old = store.submit(engine, "noop", {}, user="alice").job.id
    store.request_cancel(engine, old, by="alice")
    queued = store.submit(engine, "noop", {}, user="alice").job.id
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET finished_at = now() - interval '2 days' WHERE id = :id"),
                           {"id": old})

    pruned = sweeps.prune_jobs(engine, older_than_seconds=86400, batch_size=1)

    assert pruned["deleted"] == 1
    assert store.get_job(engine, queued).status == "queued"
    with pytest.raises(JobNotFound):
        store.get_job(engine, old)


def test_list_jobs_filters(engine):
    store.submit(engine, "noop", {}, user="alice")
    bob = store.submit(engine, "noop", {}, user="bob").job.id
    store.request_cancel(engine, bob, by="bob")

    assert [job.id for job in store.list_jobs(engine, user="bob")] == [bob]
    assert [job.id for job in store.list_jobs(engine, status="cancelled")] == [bob]
    assert len(store.list_jobs(engine, analysis="noop")) == 2
    with pytest.raises(InvalidRequest):
        store.list_jobs(engine, status="sleeping")


def test_recover_unstarted_run_gives_attempt_back(engine):
    job_id = store.submit(engine, "noop", {}, user="alice", max_attempts=1).job.id
    runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
    expire_lease(engine, job_id)

    [recovered] = sweeps.recover_expired_leases(engine)

    job = store.get_job(engine, job_id)
    assert recovered.status == "queued"
    assert job.attempt == 0
    assert job.error["details"]["started"] is False
