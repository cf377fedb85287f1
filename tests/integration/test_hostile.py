"""Hostile input, crashes, signals and races against a real database and real supervisors.

Each test reproduces one attack. A test marked ``xfail(strict=True)`` fails
today because of the bug that its reason names. Once that bug is fixed the
test passes, and strict mode then fails the run until the mark is removed.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from analyses import registry
from supervisor import runs, store, sweeps
from supervisor.errors import InvalidRequest
from supervisor.db import libpq_url
from supervisor.progress import ProgressRecords, SlotWriter
from supervisor.worker import ParentDeathSignal, run_task
from tests.integration.supervisor_harness import (
    pid_exists,
    read_run_log,
    wait_for,
    wait_for_status,
)

OWNER = uuid.UUID(int=0xBAD)
TERMINAL_EVENTS = ("succeeded", "failed", "cancelled")


def count(engine, table: str = "jobs") -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def submit(engine, **params) -> int:
    options = {name: params.pop(name) for name in ("user", "key", "max_attempts", "timeout_seconds", "priority",
                                                    "max_params_bytes") if name in params}
    options.setdefault("user", "mallory")
    return store.submit(engine, "noop", params, **options).job.id


def event_kinds(engine, job_id: int) -> list[str]:
    return [event.kind for event in store.list_events(engine, job_id)]


def starts(run_log: Path) -> list[tuple[int, int, int, str]]:
    return [line for line in read_run_log(run_log) if line[3] == "start"]


# Bad input through the CLI -------------------------------------------------------------

INJECTION = "x'); DROP TABLE jobs; --"


@pytest.mark.parametrize(
    ("args", "exit_code", "fragment"),
    [
        (["submit", "noop", "-p", "steps=NaN"], 4, "NaN is not valid JSON"),
        (["submit", "noop", "-p", "steps=-Infinity"], 4, "-Infinity is not valid JSON"),
        (["submit", "noop", "-p", "steps=1e400"], 4, "1e400 is out of range"),
        (["submit", "noop", "--params", '{"result": [1, -1e400]}'], 4, "-1e400 is out of range"),
        (["submit", "noop", "-p", "result=" + "1" * 5000], 4, "4300 digits"),
        (["submit", "noop", "-p", f"steps={INJECTION}"], 4, "must be an integer"),
        (["submit", f"noop{INJECTION}"], 4, "unknown analysis"),
        (["submit", ""], 4, "unknown analysis"),
        (["submit", "noop", "--user", "bob\x1b[31m"], 4, "invalid user"),
        (["submit", "noop", "--user", "bob\udcff"], 4, "invalid user"),
        (["submit", "noop", "--user", "u" * 101], 4, "1 to 100 printable characters"),
        (["submit", "noop", "--key", ""], 4, "invalid key"),
        (["submit", "noop", "--key", "tab\there"], 4, "invalid key"),
        (["submit", "noop", "--key", "k" * 201], 4, "1 to 200 printable characters"),
        (["submit", "noop", "-p", 'result="a\\u0000b"'], 4, "NUL character"),
        (["submit", "noop", "-p", 'result={"\\u0000": 1}'], 4, "NUL character"),
        (["submit", "noop", "-p", 'result="\\ud800"'], 4, "lone surrogate"),
        (["submit", "noop", "-p", "run_log=/tmp/a\udcff"], 4, "lone surrogate"),
        (["submit", "noop", "-p", "steps=-1"], 4, "must be >= 0"),
        (["submit", "noop", "-p", "steps=10000001"], 4, "must be <= 10000000"),
        (["submit", "noop", "-p", "steps=1e308"], 4, "must be <= 10000000"),
        (["submit", "noop", "-p", "steps=1.5"], 4, "must be an integer"),
        (["submit", "noop", "-p", "alloc_mib=65537"], 4, "must be <= 65536"),
        (["submit", "noop", "-p", "=5"], 4, "expected NAME=VALUE"),
        (["submit", "noop", "--params", "[]"], 4, "must be a JSON object"),
        (["submit", "noop", "--params", "{"], 4, "not valid JSON"),
        (["submit", "noop", "--priority", "100000000000000000000"], 4, "invalid priority"),
        (["submit", "noop", "--max-attempts", "-1"], 4, "invalid max_attempts"),
        (["submit", "noop", "--timeout", "nan"], 4, "invalid timeout_seconds"),
        (["submit", "noop", "--timeout", "1e400"], 4, "invalid timeout_seconds"),
        (["submit", "noop", "--timeout", "0"], 4, "invalid timeout_seconds"),
        (["submit", "noop", "--start-by", "2026-13-01T00:00:00Z"], 4, "expected an ISO-8601 time"),
        (["submit", "noop", "--start-by", ""], 4, "expected an ISO-8601 time"),
        (["submit", "noop", "--start-by", "yesterday"], 4, "expected an ISO-8601 time"),
        (["submit", "relationship-matrix", "-p", "source=table", "-p", "table=jobs; DROP TABLE jobs"], 4,
         "must be a table name"),
        (["submit", "relationship-matrix", "-p", "source=table", "-p", 'table=jobs"--'], 4, "must be a table name"),
        (["submit", "relationship-matrix", "-p", "source=csv", "-p", "csv_path=../../etc/passwd"], 4,
         "must be an absolute path"),
        (["submit", "relationship-matrix", "-p", "csv_path=/etc/passwd"], 4, "is used only with source 'csv'"),
        (["submit", "relationship-matrix", "-p", "start=2022-02-30T00:00:00Z"], 4, "not an ISO-8601 timestamp"),
        (["submit", "relationship-matrix", "-p", "start="], 4, "not an ISO-8601 timestamp"),
        (["submit", "relationship-matrix", "-p", "start=9999-12-31T23:59:59-14:00"], 4,
         "outside the supported years"),
        (["submit", "relationship-matrix", "-p", 'sensors=[""]'], 4, "must not contain empty sensor ids"),
        (["status", "-1"], 2, "No such option"),
        (["status", "0"], 2, "greater than or equal to 1"),
        (["status", "abc"], 2, "valid integer"),
        (["cancel", "9223372036854775808"], 2, "less than or equal to 9223372036854775807"),
        (["events", "0x10"], 2, "valid integer"),
        (["result", "1.5"], 2, "valid integer"),
        (["status", "9223372036854775807"], 3, "not found"),
        (["list", "--limit", "100000000000000000000"], 2, "less than or equal to 10000"),
        (["list", "--limit", "0"], 2, "greater than or equal to 1"),
        (["list", "--status", INJECTION], 2, "is not one of"),
    ],
)
def test_cli_hostile_input_rejected(cli, engine, args, exit_code, fragment):
    result = cli(*args)

    assert result.exit_code == exit_code, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert count(engine) == 0
    assert count(engine, "job_events") == 0


def test_cli_params_file_attacks_rejected(cli, engine, tmp_path):
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes(b'\xff\xfe{"steps": 1}')
    non_finite = tmp_path / "nan.json"
    non_finite.write_text('{"steps": NaN}')
    array = tmp_path / "list.json"
    array.write_text("[1]")
    cases = [
        (not_utf8, 4, "utf-8"),
        (non_finite, 4, "NaN is not valid JSON"),
        (array, 4, "must be a JSON object"),
        (tmp_path / "missing.json", 4, "not found"),
        (tmp_path, 2, "is a directory"),
        (Path("../" * 12 + "etc/passwd"), 4, "is not valid JSON"),
    ]

    for path, exit_code, fragment in cases:
        result = cli("submit", "noop", "--params-file", str(path))
        assert result.exit_code == exit_code, (path, result.output)
        assert fragment in result.output, (path, result.output)
    assert count(engine) == 0


def test_cli_injection_text_stored_verbatim(cli, engine):
    result = cli("submit", "noop", "--user", INJECTION, "--key", INJECTION, "-p", f"result={INJECTION}")

    assert result.exit_code == 0, result.output
    job = store.get_job(engine, int(result.stdout))
    assert job.submitted_by == INJECTION
    assert job.job_key == INJECTION
    assert job.params["result"] == INJECTION
    assert count(engine) == 1
    listed = cli("list", "--user", INJECTION, "--json")
    assert listed.exit_code == 0
    assert f'"id": {job.id}' in listed.stdout


@pytest.mark.parametrize("option", ["--params", "--param", "--params-file"])
def test_cli_deeply_nested_json_exits_4(cli, engine, tmp_path, option):
    nested = "[" * 5000 + "]" * 5000
    if option == "--params-file":
        path = tmp_path / "deep.json"
        path.write_text(f'{{"result": {nested}}}')
        value = str(path)
    else:
        value = f'{{"result": {nested}}}' if option == "--params" else f"result={nested}"

    result = cli("submit", "noop", option, value)

    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output
    assert count(engine) == 0


def test_cli_start_by_after_year_9999_exits_4(cli, engine):
    result = cli("submit", "noop", "--start-by", "9999-12-31T23:59:59-14:00")

    assert result.exit_code == 4, result.output
    assert "start_by" in result.output or "--start-by" in result.output
    assert count(engine) == 0


def test_cli_empty_user_rejected(cli, engine):
    result = cli("submit", "noop", "--user", "")

    assert result.exit_code == 4, result.output
    assert "invalid user" in result.output
    assert count(engine) == 0


# Bad input through the Python API -------------------------------------------------------

def nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("analysis", "params", "options", "field"),
    [
        ("noop", {"result": nested_list(40)}, {}, "params"),
        ("noop", {"result": {"a": float("nan")}}, {}, "params"),
        ("noop", {"result": {1: 2}}, {}, "params"),
        ("noop", {"result": b"bytes"}, {}, "params"),
        ("noop", {"result": "x" * 300_000}, {}, "params"),
        ("noop", {"steps": float("inf")}, {}, "steps"),
        ("noop", {"step_seconds": float("nan")}, {}, "step_seconds"),
        ("noop", {"run_log": 5}, {}, "run_log"),
        ("noop", [1, 2], {}, "params"),
        ("noop", {}, {"user": " "}, "user"),
        ("noop", {}, {"key": 5}, "key"),
        ("noop", {}, {"priority": 10**30}, "priority"),
        ("noop", {}, {"priority": True}, "priority"),
        ("noop", {}, {"max_attempts": 0}, "max_attempts"),
        ("noop", {}, {"timeout_seconds": float("inf")}, "timeout_seconds"),
        ("noop", {}, {"start_by": dt.datetime(2030, 1, 1)}, "start_by"),
        (None, {}, {}, "analysis"),
        ("noop\x00", {}, {}, "analysis"),
        ("relationship-matrix", {"source": "table", "table": "a.b.c"}, {}, "table"),
        ("relationship-matrix", {"sensors": ["a"] * 1001}, {}, "sensors"),
        ("relationship-matrix", {"start": "2022-09-02T00:00:00Z", "end": "2022-09-01T00:00:00Z"}, {}, "end"),
    ],
)
def test_api_hostile_submit_rejected(engine, analysis, params, options, field):
    with pytest.raises(InvalidRequest) as raised:
        store.submit(engine, analysis, params, **{"user": "mallory", **options})

    assert raised.value.field == field
    assert count(engine) == 0
    assert count(engine, "job_events") == 0


def test_api_boolean_timeout_is_invalid_request(engine):
    with pytest.raises(InvalidRequest) as raised:
        store.submit(engine, "noop", {}, user="mallory", timeout_seconds=True)

    assert raised.value.field == "timeout_seconds"


def test_api_huge_integer_is_invalid_request(engine):
    with pytest.raises(InvalidRequest) as raised:
        store.submit(engine, "noop", {"result": 10**5000}, user="mallory")

    assert raised.value.field == "params"
    assert count(engine) == 0


def test_early_start_survives_worker_validation(engine):
    job = store.submit(engine, "relationship-matrix", {"start": "0999-01-01T00:00:00Z"}, user="mallory").job

    # run_task validates the stored parameters again before the body runs.
    revalidated = registry.get(job.analysis).validate_params(job.params)

    assert revalidated["start"] == job.params["start"]


@pytest.fixture
def run_in_process(tmp_path):
    """Run a stored job's parameters through the worker's run_task, in this process."""
    records = ProgressRecords(1)
    writer = SlotWriter(records.array, 0)

    def run(job: store.Job) -> dict:
        task = {"job_id": job.id, "attempt": 1, "attempt_token": "token", "analysis": job.analysis,
                "params": job.params, "results_dir": str(tmp_path / "results"), "database_url": None}
        return run_task(task, writer, ParentDeathSignal(enabled=False), 0)

    return run


def test_csv_error_hides_file_content(engine, run_in_process, tmp_path):
    secret = tmp_path / "secret.conf"
    secret.write_text("db_password=hunter2\n")
    job = store.submit(engine, "relationship-matrix", {"source": "csv", "csv_path": str(secret)},
                       user="mallory").job

    outcome = run_in_process(job)

    assert outcome["status"] == "failed"
    assert "hunter2" not in outcome["error"]["message"]


def test_status_text_escapes_control_characters(cli, engine, run_in_process, tmp_path):
    # OSC 0 sets the terminal title. Off a terminal click strips CSI sequences, but not OSC ones.
    path = tmp_path / "x\x1b]0;owned\x07.csv"
    path.write_text("a,b\n")
    job = store.submit(engine, "relationship-matrix", {"source": "csv", "csv_path": str(path)},
                       user="mallory").job
    error = run_in_process(job)["error"]
    [claimed] = runs.claim_jobs(engine, OWNER, 1, lease_seconds=30)
    runs.fail_run(engine, claimed.id, claimed.attempt_token,
                  {name: error[name] for name in ("code", "message", "details")}, retryable=False)

    result = cli("status", str(job.id))

    assert result.exit_code == 0, result.output
    assert "owned" in result.output
    assert "\x1b" not in result.output
    assert "\x07" not in result.output


@pytest.mark.slow
def test_parallel_cli_submits_share_one_job(engine, database_url, tmp_path):
    environ = {**os.environ, "ANALYSIS_DATABASE_URL": database_url, "ANALYSIS_DATA_DIR": str(tmp_path / "data")}
    script = Path(sys.executable).with_name("analysisctl")
    program = [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]
    command = [*program, "submit", "noop", "-p", "steps=1", "--key", "K", "--json"]
    processes = [subprocess.Popen(command, env=environ, cwd=Path(__file__).parents[2], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(32)]

    outputs = [process.communicate(timeout=120) for process in processes]

    assert [process.returncode for process in processes] == [0] * 32, [error for _, error in outputs if error]
    documents = [json.loads(output) for output, _ in outputs]
    assert len({document["id"] for document in documents}) == 1
    assert sorted(document["deduplicated"] for document in documents) == [False] + [True] * 31
    assert count(engine) == 1
    assert count(engine, "job_events") == 1


# Kills and signals ----------------------------------------------------------------------


@pytest.mark.slow
def test_prefetched_job_keeps_attempt_on_kill(engine, start_supervisor, tmp_path):
    supervisor = start_supervisor(workers=1)
    # Short runs make the supervisor prefetch while its one slot is busy.
    for job_id in [submit(engine, steps=1) for _ in range(20)]:
        wait_for_status(engine, job_id, "succeeded")
    blocker = submit(engine, steps=1, step_seconds=3)
    wait_for_status(engine, blocker, "running")
    run_log = tmp_path / "victims.log"
    victims = [submit(engine, steps=1, max_attempts=1, run_log=str(run_log)) for _ in range(5)]
    wait_for(lambda: all(store.get_job(engine, job_id).status == "running" for job_id in victims), 5,
             "the victims to be prefetched")

    supervisor.kill()
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' "
                                   "WHERE status = 'running'"))
    sweeps.recover_expired_leases(engine)

    assert read_run_log(run_log) == [], "no victim body ran"
    for job_id in victims:
        job = store.get_job(engine, job_id)
        assert (job.status, job.attempt) == ("queued", 0), job.error


@pytest.mark.slow
def test_double_sigterm_forced_exit_recovers(engine, start_supervisor, tmp_path):
    supervisor = start_supervisor(workers=2)
    run_log = tmp_path / "runs.log"
    # The jobs ignore cancel: a cooperative stop could otherwise re-queue one
    # before the second signal arrives, and the outcome would depend on timing.
    jobs = [submit(engine, steps=60, step_seconds=0.05, run_log=str(run_log), ignore_cancel=True)
            for _ in range(2)]
    for job_id in jobs:
        wait_for_status(engine, job_id, "running")
    workers = supervisor.worker_pids()

    supervisor.process.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    supervisor.process.send_signal(signal.SIGTERM)

    assert supervisor.process.wait(20) == 4
    for pid in workers:
        wait_for(lambda pid=pid: not pid_exists(pid), 10, f"worker {pid} to exit")
    for job_id in jobs:
        assert store.get_job(engine, job_id).status == "running", "a forced exit leaves the lease to expire"
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' "
                                   "WHERE status = 'running'"))
    start_supervisor(workers=2)
    for job_id in jobs:
        job = wait_for_status(engine, job_id, "succeeded", timeout=60)
        assert job.attempt == 2
        ends = [line for line in read_run_log(run_log) if line[0] == job_id and line[3] == "end"]
        assert len(ends) == 1


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_stopped_mid_send_keeps_leases(engine, start_supervisor, tmp_path):
    first = start_supervisor(workers=2)
    neighbour_log = tmp_path / "neighbour.log"
    submit(engine, steps=150, step_seconds=0.1, run_log=str(neighbour_log))
    wait_for(lambda: starts(neighbour_log), 10, "the neighbour to start")
    sender_log = tmp_path / "sender.log"
    # 4 MiB: far more than a Unix socket buffer, so the send blocks until the supervisor reads.
    submit(engine, steps=1, step_seconds=0.5, run_log=str(sender_log), result={"blob": "y" * 4 * 2**20},
           max_params_bytes=2**23)
    [(_, _, sender_pid, _)] = wait_for(lambda: starts(sender_log), 10, "the sender to start")

    # With the supervisor stopped, the sender fills the socket and blocks in the send.
    os.kill(first.pid, signal.SIGSTOP)
    wait_for(lambda: len(read_run_log(sender_log)) == 2, 10, "the sender's body to return")
    time.sleep(1.0)
    os.kill(sender_pid, signal.SIGSTOP)
    os.kill(first.pid, signal.SIGCONT)
    start_supervisor(workers=2)

    deadline = time.monotonic() + 12
    while time.monotonic() < deadline and len(starts(neighbour_log)) == 1:
        time.sleep(0.1)
    assert len(starts(neighbour_log)) == 1, f"the neighbour started again: {starts(neighbour_log)}"


@pytest.mark.slow
def test_stopped_supervisor_run_is_fenced(engine, start_supervisor, tmp_path):
    first = start_supervisor(workers=1)
    run_log = tmp_path / "runs.log"
    job_id = submit(engine, steps=150, step_seconds=0.1, run_log=str(run_log))
    [(_, _, first_pid, _)] = wait_for(lambda: starts(run_log), 10, "the first run to start")

    os.kill(first.pid, signal.SIGSTOP)
    start_supervisor(workers=1)
    wait_for(lambda: len(starts(run_log)) == 2, 20, "the recovered run to start")

    assert not pid_exists(first_pid), "the first run still executes next to the recovered one"
    assert store.get_job(engine, job_id).attempt == 2


@pytest.mark.slow
def test_kill_restart_cycles_leak_nothing(engine, start_supervisor, database_url, tmp_path):
    data_dir = str(tmp_path / "data")

    def own_processes() -> list[int]:
        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if "multiprocessing" in " ".join(process.info["cmdline"] or []) and \
                        process.environ().get("ANALYSIS_DATA_DIR") == data_dir:
                    found.append(process.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    def shared_memory() -> set[str]:
        return {name for name in os.listdir("/dev/shm") if name.startswith(("pym-", "psm_", "mp-", "sem.mp"))} \
            if os.path.isdir("/dev/shm") else set()

    def connections() -> int:
        name = make_url(database_url).database
        with psycopg.connect(libpq_url(database_url), autocommit=True) as connection:
            return connection.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                      "AND pid <> pg_backend_pid()", (name,)).fetchone()[0]

    engine.dispose()
    shared_before = shared_memory()
    connections_before = connections()
    # A child in its own process group makes the worker disarm PDEATHSIG, so the lifeline must kill it.
    marker = f"600.{random.randrange(10**6):06d}"
    jobs = [submit(engine, steps=100_000, step_seconds=0.01, max_attempts=100, spawn_child=f"sleep {marker}")
            for _ in range(2)]

    def sleepers() -> list[int]:
        return [process.pid for process in psutil.process_iter(["cmdline"])
                if process.info["cmdline"] == ["sleep", marker]]

    for cycle in range(1, 11):
        supervisor = start_supervisor(workers=2)
        wait_for(lambda cycle=cycle: all(store.get_job(engine, job_id).attempt == cycle for job_id in jobs),
                 20, f"cycle {cycle} to claim both jobs")
        wait_for(lambda: len(sleepers()) >= 2, 10, f"cycle {cycle} to start both children")
        assert own_processes(), "the process filter finds this test's workers"
        supervisor.kill()
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' "
                                       "WHERE status = 'running'"))
    engine.dispose()

    wait_for(lambda: not own_processes(), 10, "orphaned workers to exit")
    wait_for(lambda: not sleepers(), 10, "the jobs' children to be killed")
    assert shared_memory() - shared_before == set()
    wait_for(lambda: connections() <= connections_before, 10, "the killed supervisors' connections to close")


# Races ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cancel_around_claim_is_final(engine, start_supervisor, tmp_path):
    start_supervisor(workers=1)
    rng = random.Random(1)
    rounds = []
    for number in range(100):
        for _ in range(2):
            submit(engine, steps=1, step_seconds=rng.choice([0.0, 0.005]))
        run_log = tmp_path / f"racer-{number}.log"
        racer = submit(engine, steps=rng.choice([1, 3]), step_seconds=rng.choice([0.0, 0.01]), run_log=str(run_log))
        time.sleep(rng.uniform(0, 0.05))
        rounds.append((racer, store.request_cancel(engine, racer, by="tester").outcome, run_log))

    seen = collections.Counter()
    for racer, outcome, run_log in rounds:
        job = wait_for_status(engine, racer, {"succeeded", "failed", "cancelled"}, timeout=60)
        seen[outcome] += 1
        kinds = event_kinds(engine, racer)
        assert len([kind for kind in kinds if kind in TERMINAL_EVENTS]) == 1, kinds
        assert job.status != "failed", job.error
        if outcome == "cancelled":
            assert job.status == "cancelled"
            assert read_run_log(run_log) == [], "a job cancelled while queued never starts"
    assert seen["requested"] > 0


@pytest.mark.slow
def test_cancel_racing_completion_has_one_end(engine, start_supervisor, tmp_path):
    start_supervisor(workers=2, cancel_grace_seconds=0.5)
    rng = random.Random(5)

    def race(number: int) -> None:
        run_log = tmp_path / f"race-{number}.log"
        stubborn = number % 2 == 0
        # A stubborn body ends near the grace deadline, when terminate() fires.
        seconds = 0.5 + rng.uniform(-0.1, 0.1) if stubborn else rng.uniform(0.02, 0.2)
        job_id = submit(engine, steps=1, step_seconds=seconds, ignore_cancel=stubborn, max_attempts=1,
                        run_log=str(run_log))
        wait_for(lambda: read_run_log(run_log), 10, f"job {job_id} to start")
        if not stubborn:
            time.sleep(rng.uniform(0, 0.2))
        store.request_cancel(engine, job_id, by="tester")
        job = wait_for_status(engine, job_id, {"succeeded", "failed", "cancelled"}, timeout=30)
        time.sleep(0.3)
        kinds = event_kinds(engine, job_id)
        assert len([kind for kind in kinds if kind in TERMINAL_EVENTS]) == 1, kinds
        assert store.get_job(engine, job_id).status == job.status
        assert job.status in ("succeeded", "cancelled"), job.error
        if job.status == "succeeded":
            assert job.result == {"steps": 1}

    for pair in range(8):
        errors = []
        threads = [threading.Thread(target=_collect, args=(errors, race, number))
                   for number in (2 * pair, 2 * pair + 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []


def _collect(errors: list, function, *args) -> None:
    try:
        function(*args)
    except AssertionError as error:  # The test asserts that the list stays empty.
        errors.append(error)


@pytest.mark.slow
def test_two_supervisors_run_each_job_once(engine, start_supervisor, tmp_path):
    start_supervisor(workers=2)
    start_supervisor(workers=2)
    run_log = tmp_path / "runs.log"
    jobs = [submit(engine, steps=1, step_seconds=random.choice([0.0, 0.001, 0.01]), run_log=str(run_log))
            for _ in range(150)]

    for job_id in jobs:
        assert wait_for_status(engine, job_id, {"succeeded", "failed"}, timeout=60).status == "succeeded"

    started = collections.Counter(line[0] for line in starts(run_log))
    assert sorted(started) == jobs
    assert {job_id: runs for job_id, runs in started.items() if runs != 1} == {}
    with engine.connect() as connection:
        claimers = connection.execute(sa.text(
            "SELECT count(DISTINCT payload->>'supervisor') FROM job_events WHERE kind = 'claimed'")).scalar_one()
    assert claimers == 2
