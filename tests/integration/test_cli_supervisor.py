"""The installed ``analysisctl`` script against a real ``analysisctl supervisor run`` process.

These tests start real processes and wait for real jobs, so they take
seconds each. The supervisor pauses claims while other programs keep the CPU
busy (supervisor.throttle). The timeouts leave room for such pauses on a
loaded machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from supervisor import runs

pytestmark = pytest.mark.slow

ANALYSISCTL = Path(sys.executable).parent / "analysisctl"
TABLES = ("job_results", "job_events", "jobs", "supervisors")
# Waits for one job, generous for a machine where claims may pause.
JOB_TIMEOUT_SECONDS = 180
SUPERVISOR_START_TIMEOUT_SECONDS = 60


def run_cli(env: dict[str, str], *args: str, timeout: float = JOB_TIMEOUT_SECONDS) -> subprocess.CompletedProcess:
    return subprocess.run([str(ANALYSISCTL), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def status_of(env: dict[str, str], job_id: int) -> dict:
    result = run_cli(env, "status", str(job_id), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def cli_env(database_url, tmp_path_factory) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANALYSIS_")}
    env.update(ANALYSIS_DATABASE_URL=database_url,
               ANALYSIS_DATA_DIR=str(tmp_path_factory.mktemp("cli-supervisor")),
               ANALYSIS_POLL_SECONDS="0.5")
    return env


@pytest.fixture(scope="module")
def supervisor_process(cli_env, session_engine, tmp_path_factory):
    """A supervisor with two workers, started through the CLI and stopped with SIGTERM."""
    with session_engine.begin() as connection:
        connection.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    log_path = tmp_path_factory.mktemp("supervisor-log") / "supervisor.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(ANALYSISCTL), "supervisor", "run", "--workers", "2"], env=cli_env,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT_SECONDS
        while not any(row["pid"] == process.pid for row in runs.list_supervisors(session_engine)):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the supervisor did not start (exit code {process.poll()}):\n{log_path.read_text()}")
            time.sleep(0.2)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_submit_wait_noop(cli_env, supervisor_process):
    result = run_cli(cli_env, "submit", "noop", "--param", "steps=5", "--param", "step_seconds=0.05", "--wait")

    assert result.returncode == 0, result.stdout + result.stderr
    job_id = int(result.stdout.splitlines()[0])
    assert result.stdout.splitlines()[-1].startswith(f"job {job_id} noop succeeded")
    assert status_of(cli_env, job_id)["status"] == "succeeded"


def test_submit_wait_failing_noop_exits_1(cli_env, supervisor_process):
    result = run_cli(cli_env, "submit", "noop", "--param", "fail_at=1", "--max-attempts", "1", "--wait")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "analysis_error" in result.stdout


def test_watch_until_end(cli_env, supervisor_process):
    submitted = run_cli(cli_env, "submit", "noop", "--param", "steps=20", "--param", "step_seconds=0.05")
    job_id = int(submitted.stdout)

    result = run_cli(cli_env, "watch", str(job_id))

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith(f"job {job_id} noop succeeded")
    assert all(line.startswith(f"job {job_id} noop") for line in lines)


def test_cancel_running_noop(cli_env, supervisor_process):
    submitted = run_cli(cli_env, "submit", "noop", "--param", "steps=1000", "--param", "step_seconds=0.01")
    job_id = int(submitted.stdout)
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    while status_of(cli_env, job_id)["status"] != "running":
        assert time.monotonic() < deadline, "the job was never claimed"
        time.sleep(0.2)

    cancel = run_cli(cli_env, "cancel", str(job_id))
    watch = run_cli(cli_env, "watch", str(job_id))
    final = status_of(cli_env, job_id)

    assert cancel.returncode == 0
    assert "cancel requested" in cancel.stdout
    assert watch.returncode == 1
    assert f"job {job_id} noop cancelled" in watch.stdout.splitlines()[-1]
    assert final["status"] == "cancelled"
    assert final["progress"]["completed"] < 1000
    assert final["cancel"]["requested_by"]


def test_list_json_shows_jobs(cli_env, supervisor_process):
    submitted = run_cli(cli_env, "submit", "noop", "--param", "steps=1", "--wait", "--json")
    job_id = json.loads(submitted.stdout)["id"]

    listed = run_cli(cli_env, "list", "--json", "--type", "noop", "--limit", "100")
    succeeded = run_cli(cli_env, "list", "--json", "--status", "succeeded")

    jobs = {job["id"]: job for job in json.loads(listed.stdout)}
    assert jobs[job_id]["status"] == "succeeded"
    assert job_id in {job["id"] for job in json.loads(succeeded.stdout)}
    assert all(job["status"] == "succeeded" for job in json.loads(succeeded.stdout))


def test_supervisors_and_doctor_see_the_supervisor(cli_env, supervisor_process):
    listed = json.loads(run_cli(cli_env, "supervisors", "--json").stdout)
    doctor = run_cli(cli_env, "doctor")

    assert [row["pid"] for row in listed if row["state"] == "alive"] == [supervisor_process.pid]
    assert doctor.returncode == 0, doctor.stdout
    assert "1 alive with 2 worker slot(s)" in doctor.stdout


def test_demo_with_noop(cli_env, supervisor_process):
    result = run_cli(cli_env, "demo", "--only", "noop", "--workers", "1", timeout=JOB_TIMEOUT_SECONDS + 60)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "schema: at revision" in result.stdout
    assert "succeeded" in result.stdout
    assert "supervisor: stopped (exit code 0)" in result.stdout
