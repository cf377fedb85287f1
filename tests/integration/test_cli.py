"""analysisctl commands against the test database, run in-process with typer's CliRunner.

No supervisor runs here: tests that need a job to progress drive it through
``supervisor.runs`` directly, from a thread when a command is following it.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from analyses import load
from supervisor.db import libpq_url
from supervisor import db, runs, store

OWNER = uuid.UUID(int=0xC11)

GOOD_CSV = """sensor_id,ts,value
s1,2022-09-01T00:00:00Z,1.5
s1,2022-09-01T00:05:00Z,2.5
s2,2022-09-01T00:00:00Z,3.5
"""


def strict_loads(text: str):
    """Parse JSON the way a strict client does: NaN and Infinity are errors."""

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def count(engine, table: str = "jobs") -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def execute(engine, statement: str, **params) -> None:
    with engine.begin() as connection:
        connection.execute(sa.text(statement), params)


def submit(engine, **params) -> store.Job:
    return store.submit(engine, "noop", params, user="alice").job


def claim(engine) -> store.Job:
    """Claim one job and record its start, as a supervisor does when it hands the job to a worker."""
    (job,) = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
    runs.mark_started(engine, [(job.id, job.attempt_token)])
    return job


def progress(engine, job: store.Job, completed, total, rate=5.0) -> None:
    runs.record_progress(engine, [runs.ProgressUpdate(job.id, job.attempt_token, "steps", completed, total,
                                                      None, rate, None)])


def run_in_thread(steps) -> threading.Thread:
    """Run ``steps`` (callables) one after another with short pauses, in a thread."""

    def body():
        for step in steps:
            time.sleep(0.3)
            step()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


# submit --------------------------------------------------------------------------


def test_submit_prints_id_and_stores_params(cli, engine):
    result = cli("submit", "noop", "--param", "steps=4", "-p", "step_seconds=0.5", "-p", "run_log=/tmp/x.log")

    assert result.exit_code == 0, result.output
    job = store.get_job(engine, int(result.stdout.strip()))
    assert job.params["steps"] == 4
    assert job.params["step_seconds"] == 0.5
    assert job.params["run_log"] == "/tmp/x.log"
    assert job.submitted_by == getpass.getuser()


def test_submit_options_stored(cli, engine):
    result = cli("submit", "noop", "--params", '{"steps": 2}', "--user", "bob", "--priority", "7",
                 "--max-attempts", "5", "--timeout", "90", "--start-by", "2099-01-01T00:00:00Z", "--key", "k-1")

    job = store.get_job(engine, int(result.stdout))
    assert (job.submitted_by, job.priority, job.max_attempts, job.timeout_seconds) == ("bob", 7, 5, 90.0)
    assert job.job_key == "k-1"
    assert job.start_by.year == 2099


def test_submit_params_file(cli, engine, tmp_path):
    params_file = tmp_path / "params.json"
    params_file.write_text('{"steps": 6, "cpu": false}')

    result = cli("submit", "noop", "--params-file", str(params_file), "-p", "steps=8")

    assert store.get_job(engine, int(result.stdout)).params["steps"] == 8


def test_submit_json_reports_deduplication(cli, engine):
    first = strict_loads(cli("submit", "noop", "--key", "same", "--json").stdout)
    second = cli("submit", "noop", "--key", "same", "--json")

    assert first == {"id": first["id"], "status": "queued", "deduplicated": False}
    assert strict_loads(second.stdout) == {"id": first["id"], "status": "queued", "deduplicated": True}
    assert count(engine) == 1


def test_submit_text_reports_reuse(cli, engine):
    first = cli("submit", "noop", "--key", "same")
    second = cli("submit", "noop", "--key", "same")

    assert second.stdout == first.stdout
    assert "reused job" in second.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["noop", "-p", "step_seconds=NaN"], "NaN"),
        (["noop", "-p", "step_seconds=Infinity"], "Infinity"),
        (["noop", "-p", "step_seconds=1e400"], "1e400"),
        (["noop", "--params", '{"step_seconds": NaN}'], "NaN"),
        (["no-such-analysis"], "unknown analysis"),
        (["noop", "-p", "threshold=1"], "unknown parameter"),
        (["noop", "-p", "steps=many"], "must be an integer"),
        (["noop", "--priority", "5000"], "priority"),
        (["noop", "--max-attempts", "0"], "max_attempts"),
        (["noop", "--timeout", "-1"], "timeout"),
        (["noop", "--start-by", "2099-01-01T00:00:00"], "time zone"),
        (["noop", "--params-file", "/nonexistent/params.json"], "/nonexistent/params.json"),
        (["noop", "--params", "{}", "--params-file", "x.json"], "cannot be used together"),
    ],
)
def test_submit_invalid_exits_4_and_writes_nothing(cli, engine, args, fragment):
    result = cli("submit", *args)

    assert result.exit_code == 4, result.output
    assert fragment in result.stderr
    assert "Traceback" not in result.output
    assert count(engine) == 0
    assert count(engine, "job_events") == 0


def test_submit_wait_succeeds(cli, engine):
    def finish():
        job = claim(engine)
        progress(engine, job, 3, 3)
        runs.succeed_run(engine, job.id, job.attempt_token, {"steps": 3})

    thread = run_in_thread([finish])
    result = cli("submit", "noop", "--wait")
    thread.join()

    assert result.exit_code == 0, result.output
    assert "succeeded" in result.stdout


def test_submit_wait_json_failed_exits_1(cli, engine):
    def fail():
        job = claim(engine)
        runs.fail_run(engine, job.id, job.attempt_token, {"code": "analysis_error", "message": "boom"},
                      retryable=False)

    thread = run_in_thread([fail])
    result = cli("submit", "noop", "--wait", "--json")
    thread.join()

    assert result.exit_code == 1
    assert strict_loads(result.stdout)["status"] == "failed"


# status --------------------------------------------------------------------------------


def test_status_unknown_job_exits_3(cli):
    result = cli("status", "999")

    assert result.exit_code == 3
    assert "job 999 not found" in result.stderr


def test_status_running_text(cli, engine):
    submit(engine)
    job = claim(engine)
    progress(engine, job, 4, 10, rate=2.0)

    result = cli("status", str(job.id))

    assert result.exit_code == 0
    assert "running" in result.stdout
    assert "4/10 (40%)" in result.stdout
    assert "attempt    1/3" in result.stdout


def test_status_json_with_odd_values_is_strict(cli, engine):
    submit(engine)
    job = claim(engine)
    execute(engine, "UPDATE jobs SET progress_rate = 'NaN', progress_eta_seconds = '-Infinity', "
                    "progress_total = NULL, progress_completed = 7, timeout_seconds = 'Infinity', "
                    "cancel_requested_at = now(), cancel_requested_by = 'bob' WHERE id = :id", id=job.id)

    document = strict_loads(cli("status", str(job.id), "--json").stdout)

    assert document["status"] == "running"
    assert document["progress"] == {**document["progress"], "completed": 7, "total": None, "percent": None,
                                    "rate": None, "eta_seconds": None}
    assert document["timeout_seconds"] is None
    assert document["cancel"]["requested_by"] == "bob"
    assert document["lease"]["supervisor"] == str(OWNER)


def test_status_json_completed_above_total(cli, engine):
    submit(engine)
    job = claim(engine)
    progress(engine, job, 50, 10, rate=3.0)

    document = strict_loads(cli("status", str(job.id), "--json").stdout)

    assert document["progress"]["completed"] == 10
    assert document["progress"]["percent"] == 100.0
    assert document["progress"]["eta_seconds"] == 0.0


def test_status_succeeded_has_zero_eta(cli, engine):
    submit(engine)
    job = claim(engine)
    progress(engine, job, 5, 10)
    runs.succeed_run(engine, job.id, job.attempt_token, {"ok": True})

    document = strict_loads(cli("status", str(job.id), "--json").stdout)

    assert document["progress"]["percent"] == 100.0
    assert document["progress"]["eta_seconds"] == 0.0
    assert document["run_seconds"] >= 0


def test_status_waiting_for_retry(cli, engine):
    submit(engine)
    job = claim(engine)
    runs.fail_run(engine, job.id, job.attempt_token, {"code": "worker_died", "message": "killed"},
                  retryable=True, retry_delay=120)

    text = cli("status", str(job.id)).stdout
    document = strict_loads(cli("status", str(job.id), "--json").stdout)

    assert "waiting for retry" in text
    assert "worker_died: killed" in text
    assert document["queue"]["waiting_for_retry"] is True
    assert 0 < document["queue"]["retry_in_seconds"] <= 120
    assert document["queue"]["live_supervisors"] == 0


def test_status_queue_position(cli, engine):
    submit(engine)
    submit(engine)
    last = submit(engine)

    document = strict_loads(cli("status", str(last.id), "--json").stdout)

    assert document["queue"]["jobs_ahead"] == 2
    assert "no supervisor is running" in cli("status", str(last.id)).stdout


# watch ----------------------------------------------------------------------------------


def test_watch_finished_job_exits_at_once(cli, engine):
    submit(engine)
    job = claim(engine)
    runs.succeed_run(engine, job.id, job.attempt_token, {})

    result = cli("watch", str(job.id))

    assert result.exit_code == 0
    assert f"job {job.id} noop succeeded" in result.stdout


def test_watch_unknown_job_exits_3(cli):
    assert cli("watch", "12345").exit_code == 3


def test_watch_follows_retry_to_success(cli, engine):
    queued = submit(engine)
    state = {}

    def first_attempt():
        state["job"] = claim(engine)
        progress(engine, state["job"], 5, None)

    def overshoot():
        progress(engine, state["job"], 50, 10)

    def retry():
        job = state["job"]
        runs.fail_run(engine, job.id, job.attempt_token, {"code": "worker_died", "message": "killed"},
                      retryable=True, retry_delay=0)

    def second_attempt():
        state["job"] = claim(engine)
        progress(engine, state["job"], 0, 10)

    def finish():
        progress(engine, state["job"], 10, 10)
        runs.succeed_run(engine, queued.id, state["job"].attempt_token, {"steps": 10})

    thread = run_in_thread([first_attempt, overshoot, retry, second_attempt, finish])
    result = cli("watch", str(queued.id))
    thread.join()

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("attempt 1/3" in line and "5/?" in line for line in lines)
    assert any("attempt 2/3" in line and "0/10 (0%)" in line for line in lines)
    assert not any("50/10" in line for line in lines)
    assert lines[-1].startswith(f"job {queued.id} noop succeeded")


def test_watch_failed_job_exits_1(cli, engine):
    submit(engine)
    job = claim(engine)
    runs.fail_run(engine, job.id, job.attempt_token, {"code": "analysis_error", "message": "boom"}, retryable=False)

    result = cli("watch", str(job.id))

    assert result.exit_code == 1
    assert "analysis_error: boom" in result.stdout


def test_watch_wakes_on_notification(cli, engine):
    queued = submit(engine)

    def finish():
        job = claim(engine)
        runs.succeed_run(engine, job.id, job.attempt_token, {})

    thread = run_in_thread([finish])
    started = time.monotonic()
    result = cli("watch", str(queued.id), env={"ANALYSIS_POLL_SECONDS": "30"})
    elapsed = time.monotonic() - started
    thread.join()

    assert result.exit_code == 0
    # Only a notification can end the watch this early: the poll is 30 s.
    assert elapsed < 10


def test_watch_survives_lost_listen_connection(cli, engine, database_url):
    queued = submit(engine)

    def kill_listener():
        with psycopg.connect(libpq_url(database_url), autocommit=True) as connection:
            connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = 'analysisctl-watch'")

    def finish():
        job = claim(engine)
        runs.succeed_run(engine, job.id, job.attempt_token, {})

    thread = run_in_thread([kill_listener, finish])
    result = cli("watch", str(queued.id), env={"ANALYSIS_POLL_SECONDS": "0.5"})
    thread.join()

    assert result.exit_code == 0, result.output
    assert "succeeded" in result.stdout


# list ----------------------------------------------------------------------------------


def test_list_json_filters(cli, engine):
    first = store.submit(engine, "noop", {"steps": 1}, user="alice").job
    second = store.submit(engine, "noop", {"steps": 2}, user="bob").job
    third = store.submit(engine, "noop", {"steps": 3}, user="bob").job
    store.request_cancel(engine, second.id, by="bob")

    def ids(*args):
        result = cli("list", "--json", *args)
        assert result.exit_code == 0, result.output
        return [job["id"] for job in strict_loads(result.stdout)]

    assert ids() == [third.id, second.id, first.id]
    assert ids("--status", "cancelled") == [second.id]
    assert ids("--status", "queued", "--user", "bob") == [third.id]
    assert ids("--user", "alice") == [first.id]
    assert ids("--type", "noop", "--limit", "1") == [third.id]
    assert ids("--type", "other") == []


def test_list_text_and_bad_status(cli, engine):
    submit(engine)

    text = cli("list")
    bad = cli("list", "--status", "sleeping")

    assert "noop" in text.stdout
    assert "queued" in text.stdout
    assert bad.exit_code == 2


# cancel ---------------------------------------------------------------------------------


def test_cancel_queued_job(cli, engine):
    job = submit(engine)

    result = cli("cancel", str(job.id))
    again = cli("cancel", str(job.id))

    assert result.stdout.strip().endswith("cancelled while queued (before its first run)")
    assert store.get_job(engine, job.id).status == "cancelled"
    assert again.stdout.strip().endswith("already finished: cancelled")


def test_cancel_running_job(cli, engine):
    submit(engine)
    job = claim(engine)

    result = cli("cancel", str(job.id))

    assert "cancel requested" in result.stdout
    assert store.get_job(engine, job.id).cancel_requested_at is not None


def test_cancel_wait_queued_job(cli, engine):
    job = submit(engine)

    result = cli("cancel", str(job.id), "--wait")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith("cancelled while queued (before its first run)")


def test_cancel_wait_running_job(cli, engine):
    submit(engine)
    running = claim(engine)

    def stop():
        runs.cancel_run(engine, running.id, running.attempt_token, stage="cooperative")

    thread = run_in_thread([stop])
    result = cli("cancel", str(running.id), "--wait")
    thread.join()

    assert result.exit_code == 0, result.output
    assert "cancel requested" in result.stdout.splitlines()[0]
    assert "cancelled" in result.stdout.splitlines()[-1]


def test_cancel_wait_on_succeeded_exits_1(cli, engine):
    submit(engine)
    job = claim(engine)
    runs.succeed_run(engine, job.id, job.attempt_token, {})

    result = cli("cancel", str(job.id), "--wait")

    assert result.stdout.strip().endswith("already finished: succeeded")
    assert result.exit_code == 1


def test_cancel_unknown_job_exits_3(cli):
    assert cli("cancel", "4242").exit_code == 3


# retry -----------------------------------------------------------------------------------


def test_retry_failed_job(cli, engine):
    original = store.submit(engine, "noop", {"steps": 9}, user="carol", priority=3, max_attempts=2).job
    job = claim(engine)
    runs.fail_run(engine, job.id, job.attempt_token, {"code": "analysis_error", "message": "x"}, retryable=False)

    result = cli("retry", str(original.id))

    assert result.exit_code == 0, result.output
    new = store.get_job(engine, int(result.stdout))
    assert new.id != original.id
    assert (new.analysis, new.params, new.submitted_by, new.priority, new.max_attempts) == (
        "noop", original.params, "carol", 3, 2)
    assert new.status == "queued"
    assert new.attempt == 0


@pytest.mark.parametrize("status", ["queued", "running", "succeeded"])
def test_retry_rejects_unfinished_or_succeeded(cli, engine, status):
    job = submit(engine)
    if status != "queued":
        job = claim(engine)
    if status == "succeeded":
        runs.succeed_run(engine, job.id, job.attempt_token, {})

    result = cli("retry", str(job.id))

    assert result.exit_code == 4
    assert f"it is {status}" in result.stderr
    assert count(engine) == 1


# events -----------------------------------------------------------------------------------


def test_events_json(cli, engine):
    job = submit(engine)
    store.request_cancel(engine, job.id, by="alice")

    events = strict_loads(cli("events", str(job.id), "--json").stdout)
    text = cli("events", str(job.id)).stdout

    assert [event["kind"] for event in events] == ["submitted", "cancelled"]
    assert events[1]["payload"] == {"by": "alice", "stage": "queued"}
    assert "submitted" in text


def test_events_unknown_job_exits_3(cli):
    assert cli("events", "77").exit_code == 3


# result ------------------------------------------------------------------------------------


def finished_with_file(engine, folder: Path) -> tuple[store.Job, Path]:
    submit(engine)
    job = claim(engine)
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "matrix.npy"
    data_file.write_bytes(b"\x93NUMPY fake array bytes")
    entries = [
        {"name": "matrix", "kind": "file", "path": str(data_file), "size_bytes": data_file.stat().st_size,
         "sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(), "format": "npy"},
        {"name": "top", "kind": "inline", "value": {"pairs": [["a", "b", 0.9]]}},
    ]
    runs.succeed_run(engine, job.id, job.attempt_token, {"sensors": 2, "best": 0.9}, entries)
    return job, data_file


def test_result_json_and_text(cli, engine, tmp_path):
    job, data_file = finished_with_file(engine, tmp_path / "results" / "1")

    document = strict_loads(cli("result", str(job.id), "--json").stdout)
    text = cli("result", str(job.id)).stdout

    assert document["summary"] == {"sensors": 2, "best": 0.9}
    assert {entry["name"] for entry in document["results"]} == {"matrix", "top"}
    assert '"best": 0.9' in text
    assert str(data_file) in text


def test_result_output_copies_and_verifies(cli, engine, tmp_path):
    job, data_file = finished_with_file(engine, tmp_path / "results" / "1")
    target = tmp_path / "copy"

    result = cli("result", str(job.id), "--output", str(target))

    assert result.exit_code == 0, result.output
    assert (target / "matrix.npy").read_bytes() == data_file.read_bytes()
    assert "SHA-256 verified" in result.stdout


def test_result_output_rejects_changed_file(cli, engine, tmp_path):
    job, data_file = finished_with_file(engine, tmp_path / "results" / "1")
    data_file.write_bytes(b"tampered")
    target = tmp_path / "copy"

    result = cli("result", str(job.id), "--output", str(target))

    assert result.exit_code == 1
    assert "SHA-256" in result.stderr
    assert not (target / "matrix.npy").exists()


def test_result_of_running_job_exits_1(cli, engine):
    submit(engine)
    job = claim(engine)

    result = cli("result", str(job.id))

    assert result.exit_code == 1
    assert "it is running" in result.stderr


# db ---------------------------------------------------------------------------------------------


def test_schema_behind_then_upgrade(cli, scratch_databases):
    url = scratch_databases.create("analysis_cli_fresh")
    env = {"ANALYSIS_DATABASE_URL": url}

    behind = cli("status", "1", env=env)
    check = cli("db", "check", env=env)
    upgrade = cli("db", "upgrade", env=env)
    again = cli("db", "upgrade", env=env)
    check_after = cli("db", "check", env=env)

    assert behind.exit_code == 6
    assert "analysisctl db upgrade" in behind.stderr
    assert check.exit_code == 6
    assert "analysisctl db upgrade" in check.stderr
    assert upgrade.exit_code == 0, upgrade.output
    assert f"from revision none (empty) to {db.head_revision()}" in upgrade.stdout
    assert "already at head" in again.stdout
    assert check_after.exit_code == 0


def test_db_upgrade_rejects_unknown_revision(cli, scratch_databases):
    url = scratch_databases.create("analysis_cli_newer")
    db.upgrade(url)
    engine = db.create_engine(url)
    execute(engine, "UPDATE alembic_version SET version_num = '9999'")
    engine.dispose()

    upgrade = cli("db", "upgrade", env={"ANALYSIS_DATABASE_URL": url})
    status = cli("status", "1", env={"ANALYSIS_DATABASE_URL": url})
    doctor = cli("doctor", env={"ANALYSIS_DATABASE_URL": url})

    assert upgrade.exit_code == 6
    assert "9999" in upgrade.stderr
    assert status.exit_code == 6
    assert "upgrade analysis-jobs" in status.stderr
    assert doctor.exit_code == 1
    assert "upgrade analysis-jobs" in doctor.stdout


def test_db_url_is_redacted(cli, database_url):
    url = make_url(database_url).set(password="hunter2").render_as_string(hide_password=False)

    result = cli("db", "url", env={"ANALYSIS_DATABASE_URL": url})

    assert result.exit_code == 0
    assert result.stdout.startswith("postgresql://")
    assert "hunter2" not in result.stdout


# data load ---------------------------------------------------------------------------------------


def write_csv(tmp_path: Path, text: str, name: str = "readings.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def readings(engine, table: str = "readings") -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(
            sa.text(f"SELECT sensor_id, extract(epoch FROM ts), value FROM {table} ORDER BY 1, 2"))]


def test_data_load_good_file(cli, engine, tmp_path):
    result = cli("data", "load", str(write_csv(tmp_path, GOOD_CSV)))

    assert result.exit_code == 0, result.output
    assert "loaded 3 reading(s) of 2 sensor(s)" in result.stdout
    assert [(sensor, value) for sensor, _, value in readings(engine)] == [("s1", 1.5), ("s1", 2.5), ("s2", 3.5)]


def test_data_load_bundled_readings(cli, engine):
    result = cli("data", "load", str(load.BUNDLED_READINGS))

    assert result.exit_code == 0, result.output
    assert count(engine, "readings") > 100_000
    assert "of 31 sensor(s)" in result.stdout


def test_data_load_bad_file_loads_nothing(cli, engine, tmp_path):
    bad = GOOD_CSV + "s3,2022-09-01T00:00:00,1\ns3,2022-09-01T00:10:00Z,NaN\ns1,2022-09-01T00:00:00Z,9\n"

    result = cli("data", "load", str(write_csv(tmp_path, bad)))

    assert result.exit_code == 4
    for fragment in ("line 5: ", "no time zone", "line 6: ", "invalid value 'NaN'", "line 7: duplicate",
                     "nothing was loaded"):
        assert fragment in result.stderr
    assert count(engine, "readings") == 0


def test_data_load_existing_readings_rejected(cli, engine, tmp_path):
    path = write_csv(tmp_path, GOOD_CSV)
    cli("data", "load", str(path))

    result = cli("data", "load", str(path))

    assert result.exit_code == 4
    assert "3 reading(s) already exist" in result.stderr
    assert "line 2: 's1'" in result.stderr
    assert "--replace" in result.stderr
    assert count(engine, "readings") == 3


def test_data_load_replace_keeps_other_sensors(cli, engine, tmp_path):
    cli("data", "load", str(write_csv(tmp_path, GOOD_CSV)))
    update = write_csv(tmp_path, "sensor_id,ts,value\ns1,2022-09-01T01:00:00Z,7\n", "update.csv")

    result = cli("data", "load", str(update), "--replace")

    assert result.exit_code == 0, result.output
    assert "replacing 2 earlier reading(s)" in result.stdout
    assert [(sensor, value) for sensor, _, value in readings(engine)] == [("s1", 7.0), ("s2", 3.5)]


def test_data_load_missing_table(cli, engine, tmp_path):
    result = cli("data", "load", str(write_csv(tmp_path, GOOD_CSV)), "--table", "no_such_table")

    assert result.exit_code == 4
    assert "table 'no_such_table' does not exist" in result.stderr


def test_data_load_custom_table(cli, engine, tmp_path):
    execute(engine, "DROP TABLE IF EXISTS readings_cli_test")
    execute(engine, "CREATE TABLE readings_cli_test (sensor_id text, ts timestamptz, value double precision)")
    try:
        result = cli("data", "load", str(write_csv(tmp_path, GOOD_CSV)), "--table", "readings_cli_test")

        assert result.exit_code == 0, result.output
        assert len(readings(engine, "readings_cli_test")) == 3
        assert count(engine, "readings") == 0
    finally:
        execute(engine, "DROP TABLE readings_cli_test")


# prune ----------------------------------------------------------------------------------------------


def test_prune_old_jobs_and_files(cli, engine, tmp_path):
    old = submit(engine)
    recent = submit(engine)
    store.request_cancel(engine, old.id, by="alice")
    store.request_cancel(engine, recent.id, by="alice")
    execute(engine, "UPDATE jobs SET finished_at = now() - interval '40 days' WHERE id = :id", id=old.id)
    inside = tmp_path / "data" / "results" / str(old.id) / "1" / "a.npy"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"x")
    outside = tmp_path / "elsewhere.npy"
    outside.write_bytes(b"y")
    for name, path in (("a", inside), ("b", outside), ("c", tmp_path / "data" / "results" / "gone.npy")):
        execute(engine, "INSERT INTO job_results (job_id, name, kind, path, size_bytes, sha256) "
                        "VALUES (:id, :name, 'file', :path, 1, 'x')", id=old.id, name=name, path=str(path))

    result = cli("prune", "--older-than", "30")

    assert result.exit_code == 0, result.output
    assert "deleted 1 job(s)" in result.stdout
    assert "deleted 1 result file(s); 1 were already gone" in result.stdout
    assert not inside.exists()
    assert not (tmp_path / "data" / "results" / str(old.id)).exists()
    assert outside.exists()
    assert "outside the results folder" in result.stderr
    assert [job.id for job in store.list_jobs(engine)] == [recent.id]


def test_prune_expires_overdue_queued_jobs(cli, engine):
    job = submit(engine)
    execute(engine, "UPDATE jobs SET start_by = now() - interval '1 minute' WHERE id = :id", id=job.id)

    result = cli("prune")

    assert "expired 1 queued job(s)" in result.stdout
    assert store.get_job(engine, job.id).status == "expired"


# supervisors and doctor ------------------------------------------------------------------------------


def register(engine, *, host: str | None = None, pid: int | None = None, age_seconds: float = 0.0) -> uuid.UUID:
    supervisor_id = uuid.uuid4()
    runs.register_supervisor(engine, supervisor_id, host=host or socket.gethostname(), pid=pid or os.getpid(),
                             version="test", slots=2)
    if age_seconds:
        execute(engine, "UPDATE supervisors SET heartbeat_at = now() - make_interval(secs => :age) WHERE id = :id",
                age=age_seconds, id=supervisor_id)
    return supervisor_id


def test_supervisors_lists_live_and_stopped(cli, engine):
    live = register(engine)
    stopped = register(engine, host="other-host")
    runs.stop_supervisor(engine, stopped)

    default = strict_loads(cli("supervisors", "--json").stdout)
    everything = strict_loads(cli("supervisors", "--all", "--json").stdout)
    text = cli("supervisors").stdout

    assert [row["id"] for row in default] == [str(live)]
    assert default[0]["state"] == "alive"
    assert {row["state"] for row in everything} == {"alive", "stopped"}
    assert socket.gethostname() in text
    assert "running" in text


def test_doctor_queued_jobs_without_supervisor(cli, engine):
    submit(engine)

    result = cli("doctor")

    assert result.exit_code == 1
    assert "PROBLEM  queue: 1 job(s) are queued but no supervisor is running" in result.stdout
    assert "analysisctl supervisor run" in result.stdout


def test_doctor_healthy(cli, engine):
    register(engine)
    submit(engine)

    result = cli("doctor", "--json")

    assert result.exit_code == 0, result.output
    findings = strict_loads(result.stdout)
    assert {finding["level"] for finding in findings} == {"ok"}


def test_doctor_stale_supervisor_on_other_host(cli, engine):
    register(engine)
    register(engine, host="far-away", pid=1234, age_seconds=300)

    result = cli("doctor")

    assert result.exit_code == 1
    assert "far-away" in result.stdout
    assert "has not renewed its heartbeat" in result.stdout


def test_doctor_dead_local_supervisor_is_warning(cli, engine):
    process = os.fork() if hasattr(os, "fork") else None
    if process == 0:
        os._exit(0)
    os.waitpid(process, 0)
    register(engine, pid=process, age_seconds=300)

    result = cli("doctor")

    assert result.exit_code == 0, result.output
    assert "ended without a clean shutdown" in result.stdout


def test_doctor_expired_lease(cli, engine):
    submit(engine)
    job = claim(engine)
    execute(engine, "UPDATE jobs SET lease_expires_at = now() - interval '5 minutes' WHERE id = :id", id=job.id)

    result = cli("doctor")

    assert result.exit_code == 1
    assert "expired lease" in result.stdout
    assert str(job.id) in result.stdout


def test_doctor_unreachable_database(cli):
    result = cli("doctor", env={"ANALYSIS_DATABASE_URL": "postgresql://postgres:hunter2@127.0.0.1:1/x"})

    assert result.exit_code == 1
    assert "PROBLEM  database" in result.stdout
    assert "hunter2" not in result.output


def test_doctor_schema_behind(cli, scratch_databases):
    url = scratch_databases.create("analysis_cli_doctor")

    result = cli("doctor", env={"ANALYSIS_DATABASE_URL": url})

    assert result.exit_code == 1
    assert "analysisctl db upgrade" in result.stdout


def test_db_stop_refuses_configured_url(cli):
    result = cli("db", "stop")

    assert result.exit_code == 2
    assert "only the embedded server" in result.stderr


def test_db_stop_embedded_not_running(cli, tmp_path):
    result = cli("db", "stop", env={"ANALYSIS_DATABASE_URL": None, "ANALYSIS_DATA_DIR": str(tmp_path / "empty")})

    assert result.exit_code == 0
    assert "is not running" in result.stdout
