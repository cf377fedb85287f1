"""The supervisor end to end: real Postgres, real worker processes, real signals."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import psutil
import psycopg
import pytest

from supervisor import store
from supervisor.db import libpq_url
from tests.integration.supervisor_harness import (
    pid_exists,
    read_run_log,
    wait_for,
    wait_for_status,
)

pytestmark = pytest.mark.slow


def submit(engine, **params) -> int:
    options = {name: params.pop(name) for name in ("user", "key", "max_attempts", "timeout_seconds", "priority")
               if name in params}
    options.setdefault("user", "tester")
    return store.submit(engine, "noop", params, **options).job.id


def test_jobs_run_concurrently_with_own_progress(engine, start_supervisor):
    start_supervisor(workers=2)
    long_job = submit(engine, steps=400, step_seconds=0.02)
    short_jobs = [submit(engine, steps=2, step_seconds=0.01, result={"n": n}) for n in range(20)]

    for n, job_id in enumerate(short_jobs):
        job = wait_for_status(engine, job_id, "succeeded")
        assert job.result == {"n": n}
    long = store.get_job(engine, long_job)
    assert long.status == "running", "the short jobs must finish while the long one runs"
    assert long.progress_total == 400
    assert wait_for_status(engine, long_job, "succeeded").progress_completed == 400


def test_cooperative_cancel_ends_job(engine, start_supervisor):
    start_supervisor(workers=1)
    job_id = submit(engine, steps=10_000, step_seconds=0.01)
    wait_for_status(engine, job_id, "running")

    requested_at = time.monotonic()
    assert store.request_cancel(engine, job_id, by="tester").outcome == "requested"
    job = wait_for_status(engine, job_id, "cancelled", timeout=10)

    assert job.error["details"]["stage"] == "cooperative"
    # Generous bound for a shared machine; the benchmark records the real figure.
    assert time.monotonic() - requested_at < 5


def test_ignored_cancel_terminated_after_grace(engine, start_supervisor):
    start_supervisor(workers=2)
    stubborn = submit(engine, steps=10_000, step_seconds=0.01, ignore_cancel=True)
    neighbour = submit(engine, steps=300, step_seconds=0.01)
    wait_for_status(engine, stubborn, "running")

    store.request_cancel(engine, stubborn, by="tester")

    job = wait_for_status(engine, stubborn, "cancelled", timeout=15)
    assert job.error["details"]["stage"] in ("terminate", "kill")
    assert wait_for_status(engine, neighbour, "succeeded", timeout=30).attempt == 1


def test_killed_worker_fails_only_its_job(engine, start_supervisor, tmp_path):
    supervisor = start_supervisor(workers=3)
    run_log = tmp_path / "victim.log"
    victim = submit(engine, steps=10_000, step_seconds=0.01, max_attempts=1, run_log=str(run_log))
    others = [submit(engine, steps=200, step_seconds=0.01) for _ in range(2)]
    for job_id in (victim, *others):
        wait_for_status(engine, job_id, "running")
    workers_before = supervisor.worker_pids()
    [(_, _, victim_pid, _)] = wait_for(lambda: read_run_log(run_log), 10, "the victim to start")

    os.kill(victim_pid, signal.SIGKILL)

    job = wait_for_status(engine, victim, "failed")
    assert job.error["code"] == "worker_died"
    assert job.error["details"]["signal"] == "SIGKILL"
    for job_id in others:
        assert wait_for_status(engine, job_id, "succeeded").attempt == 1
    wait_for(lambda: len(supervisor.worker_pids()) == len(workers_before), 30, "a replacement worker")
    assert wait_for_status(engine, submit(engine, steps=1), "succeeded").attempt == 1


@pytest.mark.parametrize("kill", ["kill_signal", "exit_code"])
def test_crashing_job_fails_after_max_attempts(engine, start_supervisor, tmp_path, kill):
    start_supervisor(workers=2)
    run_log = tmp_path / "runs.log"
    fault = {"kill_signal": "SIGKILL"} if kill == "kill_signal" else {"exit_code": 3}
    job_id = submit(engine, steps=5, max_attempts=3, run_log=str(run_log), **fault)

    job = wait_for_status(engine, job_id, "failed", timeout=60)

    assert job.attempt == 3
    assert job.error["code"] == "worker_died"
    assert len([line for line in read_run_log(run_log) if line[3] == "start"]) == 3


def test_sigterm_requeues_running_jobs(engine, start_supervisor):
    supervisor = start_supervisor(workers=2, shutdown_grace_seconds=3)
    running = [submit(engine, steps=6000, step_seconds=0.1), submit(engine, steps=6000, step_seconds=0.1,
                                                                     ignore_cancel=True)]
    for job_id in running:
        wait_for_status(engine, job_id, "running")
    queued = submit(engine, steps=1)
    workers = supervisor.worker_pids()

    began = time.monotonic()
    exit_code = supervisor.stop(timeout=30)
    elapsed = time.monotonic() - began

    assert exit_code == 0
    assert elapsed < 3 + 5, "the supervisor must exit within the shutdown grace plus a margin"
    for job_id in running:
        job = store.get_job(engine, job_id)
        assert job.status == "queued"
        assert job.attempt == 0, "a shutdown gives the attempt back"
        assert job.lease_owner is None
    assert store.get_job(engine, queued).status == "queued"
    for pid in workers:
        wait_for(lambda pid=pid: not pid_exists(pid), 10, f"worker {pid} to exit")

    start_supervisor(workers=3)
    wait_for_status(engine, queued, "succeeded", timeout=10)
    for job_id in running:
        wait_for_status(engine, job_id, "running", timeout=10)


def test_killed_supervisor_jobs_recovered_once(engine, start_supervisor, tmp_path):
    first = start_supervisor(workers=2)
    run_log = tmp_path / "runs.log"
    jobs = [submit(engine, steps=30, step_seconds=0.1, run_log=str(run_log)) for _ in range(2)]
    for job_id in jobs:
        wait_for_status(engine, job_id, "running")
    workers = first.worker_pids()

    first.kill()

    for pid in workers:
        wait_for(lambda pid=pid: not pid_exists(pid), 10, f"orphaned worker {pid} to exit")
    start_supervisor(workers=2)
    for job_id in jobs:
        job = wait_for_status(engine, job_id, "succeeded", timeout=60)
        assert job.attempt == 2
    lines = read_run_log(run_log)
    for job_id in jobs:
        ends = [line for line in lines if line[0] == job_id and line[3] == "end"]
        assert len(ends) == 1, f"job {job_id} body completed {len(ends)} times"
    kinds = [event.kind for event in store.list_events(engine, jobs[0])]
    assert "lease_expired" in kinds


def test_cancel_racing_claim_never_succeeds(engine, start_supervisor, tmp_path):
    start_supervisor(workers=1)
    rng = random.Random(7)
    outcomes = []
    for round_number in range(15):
        blocker = submit(engine, steps=1, step_seconds=0.3)
        run_log = tmp_path / f"b{round_number}.log"
        racer = submit(engine, steps=50, step_seconds=0.1, run_log=str(run_log))
        wait_for_status(engine, blocker, "running", timeout=10)
        time.sleep(max(0.0, 0.3 + rng.uniform(-0.1, 0.1)))

        result = store.request_cancel(engine, racer, by="tester")
        job = wait_for_status(engine, racer, {"succeeded", "failed", "cancelled"}, timeout=20)

        outcomes.append((result.outcome, job.status))
        assert job.status == "cancelled"
        if result.outcome == "cancelled":
            assert read_run_log(run_log) == [], "a job cancelled while queued must never start"
    assert {outcome for outcome, _ in outcomes} <= {"cancelled", "requested"}


def test_notifications_stay_small_with_large_params(engine, start_supervisor, database_url):
    start_supervisor(workers=1)
    received = []
    stop = threading.Event()

    def listen():
        with psycopg.connect(libpq_url(database_url), autocommit=True) as connection:
            connection.execute(f"LISTEN {store.WORK_CHANNEL}")
            connection.execute(f"LISTEN {store.CHANGES_CHANNEL}")
            while not stop.is_set():
                for note in connection.notifies(timeout=0.2):
                    received.append(note.payload)

    thread = threading.Thread(target=listen)
    thread.start()
    time.sleep(0.3)
    big = {"ids": [f"sensor-{n:06d}" for n in range(15_000)]}
    job_id = submit(engine, steps=30, step_seconds=0.02, result=big)
    wait_for_status(engine, job_id, "running")
    store.request_cancel(engine, job_id, by="tester")
    wait_for_status(engine, job_id, "cancelled")
    time.sleep(0.3)
    stop.set()
    thread.join(10)

    assert received
    assert max(len(payload) for payload in received) < 1024
    assert all(json.loads(payload)["job"] == job_id for payload in received)


@pytest.mark.parametrize("steps", [1, 40])
def test_claim_sends_running_notification(engine, start_supervisor, database_url, steps):
    # A claim for an idle worker sends its hint after the dispatch: with the
    # job's outcome for a short job, on its own for a long one.
    start_supervisor(workers=1)
    with psycopg.connect(libpq_url(database_url), autocommit=True) as connection:
        connection.execute(f"LISTEN {store.CHANGES_CHANNEL}")
        job_id = submit(engine, steps=steps, step_seconds=0.05)
        statuses = []
        deadline = time.monotonic() + 20
        while "succeeded" not in statuses and time.monotonic() < deadline:
            for note in connection.notifies(timeout=0.5, stop_after=1):
                payload = json.loads(note.payload)
                if payload["job"] == job_id and payload["kind"] == "status":
                    statuses.append(payload["status"])

    assert statuses == ["queued", "running", "succeeded"]


def test_non_finite_result_stored_as_null(engine, start_supervisor):
    start_supervisor(workers=1)
    job_id = submit(engine, steps=1, result={"r": [1.5]}, non_finite_result=True)

    job = wait_for_status(engine, job_id, {"succeeded", "failed"})

    assert job.status == "succeeded"
    assert job.result["non_finite"] == [None, None, None]
    assert job.result["_non_finite"] == ["/non_finite/0", "/non_finite/1", "/non_finite/2"]
    assert job.result["r"] == [1.5]


def test_spawned_process_group_killed_with_job(engine, start_supervisor):
    start_supervisor(workers=1)
    # A duration no other process on the machine uses identifies the grandchild.
    duration = f"600.{random.randrange(10**6):06d}"
    job_id = submit(engine, steps=10_000, step_seconds=0.01, ignore_cancel=True,
                    spawn_child=f"sh -c 'sleep {duration} & wait'")
    wait_for_status(engine, job_id, "running")
    children = wait_for(lambda: [p for p in psutil.process_iter(["cmdline"])
                                 if p.info["cmdline"] == ["sleep", duration]], 10, "the grandchild to start")

    store.request_cancel(engine, job_id, by="tester")
    wait_for_status(engine, job_id, "cancelled", timeout=15)

    for child in children:
        wait_for(lambda child=child: not pid_exists(child.pid), 5, f"grandchild {child.pid} to be killed")


def test_timeout_fails_job_with_timeout_code(engine, start_supervisor):
    start_supervisor(workers=1)
    job_id = submit(engine, steps=10_000, step_seconds=0.01, timeout_seconds=1, max_attempts=1)

    job = wait_for_status(engine, job_id, "failed", timeout=20)

    assert job.error["code"] == "timeout"


def test_fault_injection_disabled_by_default(engine, start_supervisor, tmp_path, monkeypatch):
    monkeypatch.setenv("ANALYSIS_ALLOW_FAULT_INJECTION", "0")
    start_supervisor(workers=1)
    job_id = submit(engine, steps=1, spawn_child=f"touch {tmp_path / 'ran'}")

    job = wait_for_status(engine, job_id, {"failed", "succeeded"})

    assert job.status == "failed"
    assert job.error["code"] == "invalid_params"
    assert "ANALYSIS_ALLOW_FAULT_INJECTION=1" in job.error["message"]
    assert not (tmp_path / "ran").exists()
