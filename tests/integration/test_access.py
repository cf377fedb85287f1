"""Access control: what each database role may read, cancel and update, through the API, SQL and the CLI.

The tests connect as login roles made for this run (the ``logins`` fixture):
alice and bob are analysts, operator and supervisor have those roles, and
the login "nobody" has no role of the service. The ``engine`` fixture connects as the
superuser that owns the tables and can read every row.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import psycopg
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from cli.common import current_user
from cli.main import app
from supervisor import access, runs, store, sweeps
from supervisor.errors import JobNotFound, PermissionDenied
from tests.integration.store_snapshot import snapshot
from tests.integration.supervisor_harness import SupervisorProcess, wait_for_status

SUPERVISOR_ID = uuid.UUID(int=0xACCE55)


def submit(login, **params) -> store.Job:
    return store.submit(login.engine, "noop", params).job


def claim(bind, job_id: int) -> store.Job:
    """Claim the only queued job, ``job_id``, and return it as running."""
    [job] = runs.claim_jobs(bind, SUPERVISOR_ID, 50, lease_seconds=60)
    assert job.id == job_id
    return job


def ids(jobs) -> list[int]:
    return sorted(job.id for job in jobs)


def kinds(bind, job_id: int) -> list[str]:
    return [event.kind for event in store.list_events(bind, job_id)]


# Analysts --------------------------------------------------------------------------------


def test_analyst_submit_records_login(engine, logins):
    alice = logins["alice"]

    job = submit(alice, steps=1)

    assert job.submitted_by == alice.name
    assert store.get_job(engine, job.id).submitted_by == alice.name
    [event] = store.list_events(alice.engine, job.id)
    assert (event.kind, event.payload["user"]) == ("submitted", alice.name)


def test_owner_submit_without_user_records_login(engine):
    job = store.submit(engine, "noop", {}).job

    with engine.connect() as connection:
        assert job.submitted_by == connection.execute(sa.text("SELECT CAST(session_user AS text)")).scalar_one()


def test_analyst_may_name_itself(engine, logins):
    alice = logins["alice"]

    job = store.submit(alice.engine, "noop", {}, user=alice.name).job

    assert job.submitted_by == alice.name


def test_analyst_submit_for_other_user_denied(engine, logins):
    before = snapshot(engine)

    with pytest.raises(PermissionDenied) as raised:
        store.submit(logins["alice"].engine, "noop", {}, user=logins["bob"].name)

    assert "not permitted to submit as user" in raised.value.message
    assert access.OPERATOR_ROLE in raised.value.message
    assert raised.value.exit_code == 9
    assert snapshot(engine) == before


def test_analyst_sees_only_own_jobs(engine, logins):
    alice, bob = logins["alice"], logins["bob"]
    own = submit(alice).id
    other = submit(bob).id

    assert ids(store.list_jobs(alice.engine)) == [own]
    assert ids(store.list_jobs(bob.engine)) == [other]
    assert store.list_jobs(alice.engine, user=bob.name) == []
    for read in (store.get_job, store.list_events, store.list_results):
        with pytest.raises(JobNotFound):
            read(alice.engine, other)


def test_analyst_cannot_cancel_other_job(engine, logins):
    other = submit(logins["bob"]).id
    before = snapshot(engine)

    with pytest.raises(JobNotFound):
        store.request_cancel(logins["alice"].engine, other)

    assert snapshot(engine) == before
    assert store.get_job(engine, other).status == "queued"


def test_analyst_cancels_own_queued_and_running_jobs(engine, logins):
    alice = logins["alice"]
    running = claim(engine, submit(alice).id).id
    queued = submit(alice).id

    first = store.request_cancel(alice.engine, queued)
    second = store.request_cancel(alice.engine, running)

    assert (first.outcome, first.job.status, first.job.cancel_requested_by) == ("cancelled", "cancelled", alice.name)
    assert (second.outcome, second.job.cancel_requested_by) == ("requested", alice.name)
    assert kinds(alice.engine, queued) == ["submitted", "cancelled"]
    assert kinds(alice.engine, running) == ["submitted", "claimed", "cancel_requested"]


def test_analyst_cancel_as_other_user_denied(engine, logins):
    own = submit(logins["alice"]).id
    before = snapshot(engine)

    with pytest.raises(PermissionDenied):
        store.request_cancel(logins["alice"].engine, own, by=logins["bob"].name)

    assert snapshot(engine) == before


def test_analyst_reads_only_own_results(engine, logins):
    alice, bob = logins["alice"], logins["bob"]
    job = claim(engine, submit(alice).id)
    runs.succeed_run(engine, job.id, job.attempt_token, {"answer": 42},
                     [{"name": "table", "kind": "inline", "value": [1, 2]}])

    [entry] = store.list_results(alice.engine, job.id)

    assert entry["value"] == [1, 2]
    assert store.get_job(alice.engine, job.id).result == {"answer": 42}
    with pytest.raises(JobNotFound):
        store.list_results(bob.engine, job.id)


def test_analyst_cannot_do_supervisor_writes(engine, logins):
    alice = logins["alice"].engine
    running = claim(engine, submit(logins["alice"]).id)
    old = submit(logins["alice"]).id
    store.request_cancel(engine, old)
    late = store.submit(engine, "noop", {}, user=logins["alice"].name,
                        start_by=dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=200)).job.id
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET start_by = now() - interval '1 second' WHERE id = :id"),
                           {"id": late})
        connection.execute(sa.text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' "
                                   "WHERE id = :id"), {"id": running.id})
    before = snapshot(engine)
    attempts = {
        "claim": lambda: runs.claim_jobs(alice, SUPERVISOR_ID, 5, lease_seconds=30),
        "register": lambda: runs.register_supervisor(alice, uuid.uuid4(), host="h", pid=1, version="v", slots=1),
        "heartbeat": lambda: runs.heartbeat(alice, SUPERVISOR_ID, [running.attempt_token], lease_seconds=30),
        "succeed": lambda: runs.succeed_run(alice, running.id, running.attempt_token, {"forged": True}),
        "fail": lambda: runs.fail_run(alice, running.id, running.attempt_token, {"code": "x"}, retryable=False),
        "cancel_run": lambda: runs.cancel_run(alice, running.id, running.attempt_token, stage="cooperative"),
        "requeue": lambda: runs.requeue_run(alice, running.id, running.attempt_token, reason="shutdown"),
        "recover": lambda: sweeps.recover_expired_leases(alice),
        "expire": lambda: sweeps.expire_jobs(alice),
        "prune": lambda: sweeps.prune_jobs(alice, older_than_seconds=0),
    }

    for name, attempt in attempts.items():
        with pytest.raises(PermissionDenied, match="not permitted"):
            attempt()
        assert snapshot(engine) == before, name


# What an analyst can do with direct SQL ---------------------------------------------------

INSUFFICIENT_PRIVILEGE = "42501"
CHECK_VIOLATION = "23514"

DIRECT_SQL = [
    ("UPDATE jobs SET priority = 1000 WHERE id = :own", INSUFFICIENT_PRIVILEGE),
    ("UPDATE jobs SET lease_owner = gen_random_uuid() WHERE id = :own", INSUFFICIENT_PRIVILEGE),
    ("UPDATE jobs SET submitted_by = :bob WHERE id = :own", INSUFFICIENT_PRIVILEGE),
    ("UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = :own", INSUFFICIENT_PRIVILEGE),
    ("UPDATE jobs SET cancel_requested_at = now(), cancel_requested_by = :bob WHERE id = :own",
     INSUFFICIENT_PRIVILEGE),
    ("UPDATE jobs SET event_seq = event_seq - 1 WHERE id = :own", CHECK_VIOLATION),
    ("UPDATE jobs SET event_seq = 2147483647 WHERE id = :own", CHECK_VIOLATION),
    ("INSERT INTO jobs (analysis, params, submitted_by, key_scope, max_attempts) "
     "VALUES ('noop', '{}', :bob, :bob, 1)", INSUFFICIENT_PRIVILEGE),
    ("INSERT INTO jobs (analysis, params, submitted_by, key_scope, max_attempts) "
     "VALUES ('noop', '{}', :alice, '', 1)", INSUFFICIENT_PRIVILEGE),
    ("INSERT INTO jobs (analysis, params, submitted_by, key_scope, max_attempts, queue_key) "
     "VALUES ('noop', '{}', :alice, :alice, 1, -1e300)", INSUFFICIENT_PRIVILEGE),
    ("INSERT INTO jobs (analysis, params, submitted_by, key_scope, max_attempts, status) "
     "VALUES ('noop', '{}', :alice, :alice, 1, 'succeeded')", INSUFFICIENT_PRIVILEGE),
    ("INSERT INTO jobs (analysis, params, submitted_by, key_scope, max_attempts) "
     "VALUES ('noop', '[1]', :alice, :alice, 1)", CHECK_VIOLATION),
    ("INSERT INTO job_events (job_id, seq, kind) VALUES (:other, 99, 'cancelled')", INSUFFICIENT_PRIVILEGE),
    ("INSERT INTO job_events (job_id, seq, kind) "
     "SELECT id, event_seq + 1, 'submitted' FROM jobs WHERE id = :own", INSUFFICIENT_PRIVILEGE),
    ("INSERT INTO job_events (job_id, seq, kind) "
     "SELECT id, event_seq, 'succeeded' FROM jobs WHERE id = :own", INSUFFICIENT_PRIVILEGE),
    ("INSERT INTO job_results (job_id, name, kind, value) VALUES (:own, 'x', 'inline', '1')",
     INSUFFICIENT_PRIVILEGE),
    ("DELETE FROM jobs WHERE id = :own", INSUFFICIENT_PRIVILEGE),
    ("DELETE FROM job_events WHERE job_id = :own", INSUFFICIENT_PRIVILEGE),
    ("UPDATE supervisors SET stopped_at = now()", INSUFFICIENT_PRIVILEGE),
    ("INSERT INTO job_limits (scope, name, max_running) VALUES ('user', :bob, 0)", INSUFFICIENT_PRIVILEGE),
    ("INSERT INTO readings VALUES ('s', now(), 1)", INSUFFICIENT_PRIVILEGE),
    ("TRUNCATE jobs", INSUFFICIENT_PRIVILEGE),
    ("ALTER TABLE jobs DISABLE ROW LEVEL SECURITY", INSUFFICIENT_PRIVILEGE),
    ("DROP TABLE jobs", INSUFFICIENT_PRIVILEGE),
    ("UPDATE alembic_version SET version_num = '0001'", INSUFFICIENT_PRIVILEGE),
]


@pytest.mark.parametrize(("statement", "sqlstate"), DIRECT_SQL, ids=[row[0][:60] for row in DIRECT_SQL])
def test_analyst_direct_sql_rejected(engine, logins, statement, sqlstate):
    alice, bob = logins["alice"], logins["bob"]
    own = submit(alice).id
    other = submit(bob).id
    before = snapshot(engine)

    with pytest.raises(sa.exc.DBAPIError) as raised, alice.engine.begin() as connection:
        connection.execute(sa.text(statement), {"own": own, "other": other, "alice": alice.name, "bob": bob.name})

    assert raised.value.orig.sqlstate == sqlstate, raised.value.orig
    assert snapshot(engine) == before


def test_analyst_sql_sees_no_other_rows(engine, logins):
    alice = logins["alice"]
    other = submit(logins["bob"])
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO readings VALUES ('shared.sensor', now(), 1.5)"))
    before = snapshot(engine)

    with alice.engine.begin() as connection:
        seen = connection.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
        events = connection.execute(sa.text("SELECT count(*) FROM job_events")).scalar_one()
        changed = connection.execute(sa.text(
            "UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id = :id"), {"id": other.id}).rowcount
        readings = connection.execute(sa.text("SELECT count(*) FROM readings")).scalar_one()

    assert (seen, events, changed) == (0, 0, 0)
    assert readings == 1
    assert snapshot(engine) == before
    with pytest.raises(sa.exc.DBAPIError) as raised, alice.engine.begin() as connection:
        connection.execute(sa.text("SET LOCAL row_security = off"))
        connection.execute(sa.text("SELECT count(*) FROM jobs"))
    assert raised.value.orig.sqlstate == INSUFFICIENT_PRIVILEGE


# Operators -------------------------------------------------------------------------------


def test_operator_reads_and_cancels_every_job(engine, logins):
    operator = logins["operator"]
    second = claim(engine, submit(logins["bob"]).id)
    first = submit(logins["alice"]).id
    runs.succeed_run(engine, second.id, second.attempt_token, {"ok": 1}, [{"name": "n", "kind": "inline", "value": 1}])

    assert ids(store.list_jobs(operator.engine)) == [second.id, first]
    assert kinds(operator.engine, second.id) == ["submitted", "claimed", "succeeded"]
    assert len(store.list_results(operator.engine, second.id)) == 1
    cancelled = store.request_cancel(operator.engine, first)
    assert (cancelled.outcome, cancelled.job.cancel_requested_by) == ("cancelled", operator.name)


def test_operator_submits_for_another_user(engine, logins):
    operator, alice, bob = logins["operator"], logins["alice"], logins["bob"]

    job = store.submit(operator.engine, "noop", {}, user=alice.name).job

    assert job.submitted_by == alice.name
    assert store.get_job(alice.engine, job.id).id == job.id
    with pytest.raises(JobNotFound):
        store.get_job(bob.engine, job.id)
    assert store.request_cancel(alice.engine, job.id).outcome == "cancelled"


def test_operator_cannot_do_supervisor_writes(engine, logins):
    operator = logins["operator"].engine
    claim(engine, submit(logins["alice"]).id)
    finished = submit(logins["alice"]).id
    store.request_cancel(engine, finished)
    before = snapshot(engine)

    for attempt in (lambda: runs.claim_jobs(operator, SUPERVISOR_ID, 5, lease_seconds=30),
                    lambda: sweeps.prune_jobs(operator, older_than_seconds=0)):
        with pytest.raises(PermissionDenied):
            attempt()
    assert snapshot(engine) == before


# Supervisors -----------------------------------------------------------------------------


def test_supervisor_role_runs_every_job(engine, logins):
    supervisor = logins["supervisor"].engine
    jobs = [submit(logins["alice"], steps=1).id, submit(logins["bob"]).id, submit(logins["alice"]).id,
            submit(logins["bob"]).id]
    runs.register_supervisor(supervisor, SUPERVISOR_ID, host="test", pid=1, version="test", slots=4)

    claimed = {job.id: job for job in runs.claim_jobs(supervisor, SUPERVISOR_ID, 10, lease_seconds=30)}
    runs.mark_started(supervisor, [(job.id, job.attempt_token) for job in claimed.values()])
    assert sorted(claimed) == jobs
    assert runs.heartbeat(supervisor, SUPERVISOR_ID, [job.attempt_token for job in claimed.values()],
                          lease_seconds=30, throttle={"state": "running"}) == {
        job.attempt_token for job in claimed.values()}
    first, second, third, fourth = (claimed[job_id] for job_id in jobs)
    assert runs.record_progress(supervisor, [runs.ProgressUpdate(
        first.id, first.attempt_token, "steps", 1, 1, None, 1.0, 0.0, record_event=True)]) == 1
    assert runs.succeed_run(supervisor, first.id, first.attempt_token, {"steps": 1},
                            [{"name": "grid", "kind": "file", "path": "/results/1/1/grid.npy", "size_bytes": 8,
                              "sha256": "0" * 64, "format": "npy"}])
    assert runs.fail_run(supervisor, second.id, second.attempt_token, {"code": "analysis_error", "message": "x"},
                         retryable=True) == "queued"
    store.request_cancel(logins["alice"].engine, third.id)
    assert store.cancel_requests(supervisor, SUPERVISOR_ID) == [(third.id, third.attempt_token)]
    assert runs.cancel_run(supervisor, third.id, third.attempt_token, stage="cooperative")
    assert runs.requeue_run(supervisor, fourth.id, fourth.attempt_token, reason="shutdown") == "queued"
    runs.stop_supervisor(supervisor, SUPERVISOR_ID)

    assert [row["id"] for row in runs.list_supervisors(supervisor, include_stopped=True)] == [SUPERVISOR_ID]
    assert store.get_job(engine, first.id).status == "succeeded"
    assert store.list_results(logins["alice"].engine, first.id)[0]["name"] == "grid"
    assert store.get_job(engine, third.id).status == "cancelled"


def test_supervisor_role_sweeps(engine, logins):
    supervisor = logins["supervisor"].engine
    expired_lease = claim(engine, submit(logins["alice"]).id)
    late = store.submit(engine, "noop", {}, user=logins["bob"].name,
                        start_by=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).job.id
    old = submit(logins["alice"]).id
    store.request_cancel(engine, old)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                           {"id": expired_lease.id})
        connection.execute(sa.text("UPDATE jobs SET start_by = now() - interval '1 second' WHERE id = :id"),
                           {"id": late})
        connection.execute(sa.text("UPDATE jobs SET finished_at = now() - interval '2 days' WHERE id = :id"),
                           {"id": old})

    recovered = sweeps.recover_expired_leases(supervisor)
    expired = sweeps.expire_jobs(supervisor)
    pruned = sweeps.prune_jobs(supervisor, older_than_seconds=86_400)

    assert [item.job_id for item in recovered] == [expired_lease.id]
    assert expired["start_by"] == [late]
    assert pruned["deleted"] == 1
    with pytest.raises(JobNotFound):
        store.get_job(engine, old)


def test_supervisor_role_cannot_submit(engine, logins):
    before = snapshot(engine)

    with pytest.raises(PermissionDenied, match="permission denied for table jobs"):
        store.submit(logins["supervisor"].engine, "noop", {})

    assert snapshot(engine) == before


def test_login_without_role_denied(engine, logins):
    job = store.submit(engine, "noop", {}, user="alice").job

    with pytest.raises(PermissionDenied):
        store.get_job(logins["nobody"].engine, job.id)
    with pytest.raises(PermissionDenied):
        store.submit(logins["nobody"].engine, "noop", {})


# Job keys --------------------------------------------------------------------------------


def test_analyst_keys_never_meet_other_users(engine, logins):
    alice, bob = logins["alice"], logins["bob"]
    params = {"sensors": ["vlinder01.temp", "vlinder02.temp"]}

    first = store.submit(alice.engine, "relationship-matrix", params)
    other = store.submit(bob.engine, "relationship-matrix", params)
    again = store.submit(alice.engine, "relationship-matrix", params)
    keyed = [store.submit(login.engine, "noop", {}, key="nightly") for login in (alice, bob, alice)]

    assert not other.deduplicated
    assert other.job.id != first.job.id
    assert (again.deduplicated, again.job.id) == (True, first.job.id)
    assert [result.deduplicated for result in keyed] == [False, False, True]
    assert keyed[2].job.id == keyed[0].job.id


def test_shared_key_scope_for_operators_and_owner(engine, logins):
    operator = logins["operator"].engine

    for_alice = store.submit(operator, "noop", {}, key="K", user=logins["alice"].name)
    for_bob = store.submit(operator, "noop", {}, key="K", user=logins["bob"].name)
    by_owner = store.submit(engine, "noop", {}, key="K", user="carol")

    assert for_bob.deduplicated and by_owner.deduplicated
    assert for_bob.job.id == by_owner.job.id == for_alice.job.id


# The CLI under each role -----------------------------------------------------------------


@pytest.fixture
def cli_as(engine, logins, database_url, tmp_path):
    """Run analysisctl in this process as one login (a key of ``logins``, or "owner" for the superuser)."""
    def invoke(login: str, *args: str):
        url = database_url if login == "owner" else logins[login].url
        runner = CliRunner(env={"ANALYSIS_DATABASE_URL": url, "ANALYSIS_DATA_DIR": str(tmp_path / "data"),
                                "ANALYSIS_CONFIG": None, "COLUMNS": "400"})
        return runner.invoke(app, list(args))

    return invoke


def test_cli_analyst_works_on_own_jobs_only(cli_as, engine, logins):
    alice, bob = logins["alice"].name, logins["bob"].name
    submitted = cli_as("alice", "submit", "noop", "-p", "steps=1")
    other = submit(logins["bob"]).id

    assert submitted.exit_code == 0, submitted.output
    own = int(submitted.stdout)
    assert store.get_job(engine, own).submitted_by == alice
    assert cli_as("alice", "status", str(own)).exit_code == 0
    assert cli_as("alice", "events", str(own), "--json").exit_code == 0
    listed = cli_as("alice", "list", "--json")
    assert [document["id"] for document in strict_json(listed.stdout)] == [own]
    for command in ("status", "events", "cancel", "watch", "result"):
        result = cli_as("alice", command, str(other))
        assert result.exit_code == 3, (command, result.output)
        assert "not found" in result.output
    cancelled = cli_as("alice", "cancel", str(own))
    assert cancelled.exit_code == 0, cancelled.output
    assert store.get_job(engine, own).cancel_requested_by == alice
    assert store.get_job(engine, other).status == "queued"
    assert bob not in listed.stdout


def test_cli_analyst_not_permitted_exits_9(cli_as, engine, logins, tmp_path):
    own = submit(logins["alice"]).id
    store.request_cancel(engine, own)
    before = snapshot(engine)

    csv = tmp_path / "readings.csv"
    csv.write_text("sensor_id,ts,value\ns,2022-09-01T00:00:00Z,1\n")
    for args in (["submit", "noop", "--user", logins["bob"].name], ["prune", "--older-than", "0"],
                 ["data", "load", str(csv)]):
        result = cli_as("alice", *args)
        assert result.exit_code == 9, (args, result.output)
        assert "not permitted" in result.output
        assert "Traceback" not in result.output
    assert snapshot(engine) == before


def test_cli_analyst_queue_position_counts_own_jobs(cli_as, engine, logins):
    for login in ("bob", "alice", "bob"):
        submit(logins[login])
    waiting = submit(logins["alice"]).id

    analyst = cli_as("alice", "status", str(waiting), "--json")
    text = cli_as("alice", "status", str(waiting))
    operator = cli_as("operator", "status", str(waiting), "--json")

    assert analyst.exit_code == 0, analyst.output
    assert (strict_json(analyst.stdout)["queue"]["jobs_ahead"], strict_json(analyst.stdout)["queue"]["own_jobs_ahead"]
            ) == (None, 1)
    assert "other users' jobs are not visible" in text.stdout
    assert strict_json(operator.stdout)["queue"]["jobs_ahead"] == 3


def test_cli_operator_acts_for_users(cli_as, engine, logins):
    alice = logins["alice"].name
    own = submit(logins["alice"]).id

    submitted = cli_as("operator", "submit", "noop", "--user", alice)
    cancelled = cli_as("operator", "cancel", str(own))
    listed = cli_as("operator", "list", "--json")

    assert submitted.exit_code == 0, submitted.output
    assert store.get_job(engine, int(submitted.stdout)).submitted_by == alice
    assert cancelled.exit_code == 0, cancelled.output
    assert store.get_job(engine, own).cancel_requested_by == logins["operator"].name
    assert sorted(document["id"] for document in strict_json(listed.stdout)) == [own, int(submitted.stdout)]


def test_cli_supervisor_and_nobody(cli_as, engine, logins):
    submit(logins["alice"])

    listed = cli_as("supervisor", "list", "--json")
    submitted = cli_as("supervisor", "submit", "noop")
    denied = cli_as("nobody", "list")

    assert listed.exit_code == 0, listed.output
    assert len(strict_json(listed.stdout)) == 1
    assert submitted.exit_code == 9, submitted.output
    assert denied.exit_code == 9, denied.output
    assert "not permitted" in denied.output


def test_cli_owner_records_os_user(cli_as, engine):
    result = cli_as("owner", "submit", "noop")

    assert result.exit_code == 0, result.output
    assert store.get_job(engine, int(result.stdout)).submitted_by == current_user()


def strict_json(text: str):
    def reject(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


# A real supervisor process connected as the supervisor role --------------------------------


@pytest.mark.slow
def test_supervisor_process_as_supervisor_role(engine, logins, tmp_path):
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO readings (sensor_id, ts, value) "
            "SELECT 'sensor.' || s, timestamptz '2022-09-01 00:00Z' + i * interval '5 minutes', "
            "sin(i / 10.0 + s) FROM generate_series(1, 3) s, generate_series(0, 287) i"))
    process = SupervisorProcess(logins["supervisor"].url, tmp_path / "data", 2, tmp_path / "supervisor.log")
    try:
        process.wait_ready(engine)
        alice = logins["alice"].engine
        quick = store.submit(alice, "noop", {"steps": 3, "step_seconds": 0.01}).job.id
        from_table = store.submit(alice, "relationship-matrix", {
            "source": "table", "sensors": ["sensor.1", "sensor.2", "sensor.3"]}).job.id
        retried = store.submit(logins["bob"].engine, "noop", {"steps": 2, "fail_at": 1, "fail_kind": "retryable"},
                               max_attempts=2).job.id
        slow = store.submit(alice, "noop", {"steps": 600, "step_seconds": 0.05}).job.id
        wait_for_status(engine, slow, "running", timeout=30)
        store.request_cancel(alice, slow)

        assert wait_for_status(engine, quick, "succeeded", timeout=60).attempt == 1
        assert wait_for_status(engine, from_table, {"succeeded", "failed"}, timeout=120).status == "succeeded", \
            store.get_job(engine, from_table).error
        assert wait_for_status(engine, retried, "failed", timeout=60).attempt == 2
        assert wait_for_status(engine, slow, "cancelled", timeout=30).error["details"]["stage"] == "cooperative"
        files = [entry for entry in store.list_results(alice, from_table) if entry["kind"] == "file"]
        assert files
        assert store.get_job(alice, from_table).result["data"]["n_times"] == 288
    finally:
        assert process.stop() == 0, process.log()
    log = process.log_path.read_text(errors="replace")
    assert "permission denied" not in log
    assert "Traceback" not in log


def test_permission_error_keeps_driver_error_as_cause(engine, logins):
    with pytest.raises(PermissionDenied) as raised:
        runs.claim_jobs(logins["alice"].engine, SUPERVISOR_ID, 1, lease_seconds=30)

    assert isinstance(raised.value.__cause__.orig, psycopg.errors.InsufficientPrivilege)


@pytest.mark.slow
def test_supervisor_survives_unknown_analysis_row(engine, logins, start_supervisor):
    # A client with INSERT on jobs can skip store.submit and its checks.
    alice = logins["alice"]
    with alice.engine.begin() as connection:
        bad = connection.execute(sa.text(
            "INSERT INTO jobs (analysis, params, submitted_by, key_scope, max_attempts) "
            "VALUES ('no-such-analysis', '{}', :alice, :alice, 3) RETURNING id"), {"alice": alice.name}).scalar_one()
    supervisor = start_supervisor(workers=1)

    failed = wait_for_status(engine, bad, {"failed", "succeeded"}, timeout=30)
    later = store.submit(alice.engine, "noop", {"steps": 1}).job.id

    assert (failed.status, failed.error["code"], failed.attempt) == ("failed", "invalid_params", 1)
    assert wait_for_status(engine, later, "succeeded", timeout=30).attempt == 1
    assert supervisor.process.poll() is None, supervisor.log()
