"""Tests of WorkerPool with real worker processes running the noop analysis (no database)."""

from __future__ import annotations

import json
import glob
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import tempfile
import time

import psutil
import pytest

from analyses import registry
from supervisor.pool import Outcome, Task, WorkerPool
from supervisor.worker import START_FAIL_VARIABLE

pytestmark = pytest.mark.slow

# Generous bounds for slow CI machines. The tests finish far sooner when all is well.
START_TIMEOUT = 30.0
OUTCOME_TIMEOUT = 20.0


def noop_params(**params) -> dict:
    return registry.get("noop").validate_params(params)


def make_task(job_id: int, results_dir, **params) -> Task:
    return Task(job_id=job_id, attempt=1, attempt_token=f"token-{job_id}", analysis="noop",
                params=noop_params(**params), results_dir=str(results_dir))


def collect(pool: WorkerPool, job_ids, timeout: float = OUTCOME_TIMEOUT) -> dict[int, Outcome]:
    """Call pool.wait until every job in ``job_ids`` has an outcome; fail after ``timeout``."""
    expected_ids = set(job_ids)
    outcomes: dict[int, Outcome] = {}
    deadline = time.monotonic() + timeout
    while expected_ids - set(outcomes):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no outcome within {timeout} s for jobs {sorted(expected_ids - set(outcomes))}"
        for outcome in pool.wait(min(remaining, 0.2)):
            assert outcome.job_id not in outcomes, f"second outcome for job {outcome.job_id}"
            outcomes[outcome.job_id] = outcome
    return outcomes


def wait_until(pool: WorkerPool | None, condition, timeout: float, description: str) -> None:
    """Keep the pool running (when given) until ``condition()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {description}"
        if pool is not None:
            assert pool.wait(0.05) == [], "unexpected outcome while waiting"
        else:
            time.sleep(0.05)


def wait_for_progress(pool: WorkerPool, job_id: int) -> None:
    wait_until(pool, lambda: pool.read_progress().get(job_id, None) is not None
               and pool.read_progress()[job_id].completed > 0, OUTCOME_TIMEOUT, f"progress of job {job_id}")


def is_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs; a zombie counts as gone because it runs no code."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def live_group_members(pgid: int) -> list[int]:
    """Pids of non-zombie processes in process group ``pgid``.

    Plain ``os.killpg(pgid, 0)`` is not enough: where PID 1 does not reap
    orphans, killed group members stay as zombies.
    """
    members = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except ProcessLookupError:
            pass
    return members


def child_group_of(worker_pid: int) -> int:
    """Return the process group of the worker's child that leads its own group."""
    for child in psutil.Process(worker_pid).children():
        if os.getpgid(child.pid) == child.pid:
            return child.pid
    raise AssertionError(f"worker {worker_pid} has no child leading a process group")


@pytest.fixture
def pool():
    pool = WorkerPool(2, worker_start_timeout_seconds=START_TIMEOUT, nice_increment=0)
    pool.start()
    yield pool
    pool.close(grace_seconds=2.0)


def test_two_slots_run_concurrently(pool, tmp_path):
    assert sorted(pool.free_slots()) == [0, 1]
    pool.dispatch(0, make_task(1, tmp_path, steps=30, step_seconds=0.02))
    pool.dispatch(1, make_task(2, tmp_path, steps=20, step_seconds=0.03))
    assert pool.free_slots() == []

    running = pool.running()
    assert set(running) == {1, 2}
    assert running[1][:2] == (0, "token-1")
    assert running[2][:2] == (1, "token-2")
    assert running[1][2] != running[2][2]

    seen = {}
    outcomes = {}
    deadline = time.monotonic() + OUTCOME_TIMEOUT
    while len(outcomes) < 2 and time.monotonic() < deadline:
        for job_id, snapshot in pool.read_progress().items():
            seen.setdefault(job_id, []).append(snapshot)
        outcomes.update((outcome.job_id, outcome) for outcome in pool.wait(0.02))

    assert set(outcomes) == {1, 2}
    assert outcomes[1].status == "succeeded"
    assert outcomes[1].summary == {"steps": 30}
    assert outcomes[2].summary == {"steps": 20}
    assert set(seen) == {1, 2}
    # A snapshot taken before the body's first phase() call has no phase yet.
    started = {job_id: [snapshot for snapshot in snapshots if snapshot.phase] for job_id, snapshots in seen.items()}
    assert all(snapshot.total == 30 and snapshot.phase == "steps" for snapshot in started[1])
    assert all(snapshot.total == 20 for snapshot in started[2])
    assert any(snapshot.completed > 0 for snapshot in seen[1])
    assert pool.running() == {}


def test_sigkill_fails_only_that_job(pool, tmp_path):
    pool.dispatch(0, make_task(1, tmp_path, steps=1000, step_seconds=0.01))
    pool.dispatch(1, make_task(2, tmp_path, steps=100, step_seconds=0.01))
    wait_for_progress(pool, 1)
    victim = pool.running()[1][2]

    os.kill(victim, signal.SIGKILL)
    outcomes = collect(pool, [1, 2])

    died = outcomes[1]
    assert died.status == "failed"
    assert died.error["code"] == "worker_died"
    assert died.error["details"] == {"signal": "SIGKILL"}
    assert died.retryable is True
    assert outcomes[2].status == "succeeded"

    wait_until(pool, lambda: 0 in pool.free_slots(), START_TIMEOUT, "slot 0 to get a new worker")
    assert victim not in pool.worker_pids()
    pool.dispatch(0, make_task(3, tmp_path, steps=3))
    assert collect(pool, [3])[3].status == "succeeded"


@pytest.mark.parametrize(
    ("params", "details"),
    [
        ({"kill_signal": "SIGKILL"}, {"signal": "SIGKILL"}),
        ({"kill_signal": "SIGSEGV"}, {"signal": "SIGSEGV"}),
        ({"exit_code": 3}, {"exit_code": 3}),
        ({"exit_code": 0}, {"exit_code": 0}),
    ],
)
def test_worker_death_details(pool, tmp_path, params, details):
    pool.dispatch(0, make_task(1, tmp_path, steps=5, exit_at=2, **params))
    outcome = collect(pool, [1])[1]
    assert outcome.status == "failed"
    assert outcome.error["code"] == "worker_died"
    assert outcome.error["details"] == details
    assert outcome.retryable is True


def test_failure_codes_from_worker(pool, tmp_path):
    pool.dispatch(0, make_task(1, tmp_path, steps=5, fail_at=1, fail_kind="retryable"))
    pool.dispatch(1, make_task(2, tmp_path, steps=5, fail_at=1, fail_kind="final"))
    outcomes = collect(pool, [1, 2])

    assert outcomes[1].status == "failed"
    assert outcomes[1].error["code"] == "analysis_error"
    assert outcomes[1].retryable is True
    assert "injected retryable failure" in outcomes[1].error["message"]
    assert outcomes[2].retryable is False
    assert outcomes[2].error["details"] == {"step": 1}
    assert "Traceback" in outcomes[2].error["traceback"]


def test_cooperative_cancel_within_one_second(pool, tmp_path):
    pool.dispatch(0, make_task(1, tmp_path, steps=1000, step_seconds=0.01))
    wait_for_progress(pool, 1)

    assert pool.request_cancel(1, "token-other") is False
    requested_at = time.monotonic()
    assert pool.request_cancel(1, "token-1") is True
    outcome = collect(pool, [1], timeout=5.0)[1]

    assert time.monotonic() - requested_at < 1.0
    assert outcome.status == "cancelled"
    assert outcome.error["details"] == {"stage": "cooperative"}


def test_cancel_flag_cleared_for_next_job(pool, tmp_path):
    pool.dispatch(0, make_task(1, tmp_path, steps=1000, step_seconds=0.01))
    wait_for_progress(pool, 1)
    pool.request_cancel(1, "token-1")
    assert collect(pool, [1])[1].status == "cancelled"

    pool.dispatch(0, make_task(2, tmp_path, steps=3))
    assert collect(pool, [2])[2].status == "succeeded"


def test_terminate_ignored_cancel(pool, tmp_path):
    pool.dispatch(0, make_task(1, tmp_path, steps=1000, step_seconds=0.01, ignore_cancel=True))
    pool.dispatch(1, make_task(2, tmp_path, steps=150, step_seconds=0.01))
    wait_for_progress(pool, 1)
    victim = pool.running()[1][2]
    pool.request_cancel(1, "token-1")
    assert pool.wait(0.3) == []

    assert pool.terminate(1, "token-other") is False
    requested_at = time.monotonic()
    assert pool.terminate(1, "token-1", grace_seconds=2.0) is True
    assert time.monotonic() - requested_at < 0.5, "terminate() must not wait for the grace period"
    outcomes = collect(pool, [1, 2])

    assert outcomes[1].status == "cancelled"
    assert outcomes[1].error["details"]["stage"] == "terminate"
    assert outcomes[1].error["details"]["signal"] == "SIGTERM"
    assert outcomes[2].status == "succeeded"
    assert is_gone(victim)


def test_terminate_escalates_to_sigkill(pool, tmp_path):
    pool.dispatch(0, make_task(1, tmp_path, steps=1000, step_seconds=0.01, ignore_cancel=True, ignore_sigterm=True))
    pool.dispatch(1, make_task(2, tmp_path, steps=150, step_seconds=0.01))
    wait_for_progress(pool, 1)

    error = {"code": "timeout", "message": "timed out", "details": {"timeout_seconds": 1}}
    assert pool.terminate(1, "token-1", grace_seconds=0.5, outcome_status="failed", error=error)
    outcomes = collect(pool, [1, 2])

    assert outcomes[1].status == "failed"
    assert outcomes[1].error["code"] == "timeout"
    assert outcomes[1].error["details"] == {"timeout_seconds": 1, "signal": "SIGKILL", "stage": "kill"}
    assert outcomes[2].status == "succeeded"
    wait_until(pool, lambda: 0 in pool.free_slots(), START_TIMEOUT, "slot 0 to get a new worker")


def test_terminate_kills_process_group(pool, tmp_path):
    pool.dispatch(0, make_task(1, tmp_path, steps=100_000, step_seconds=0.01, spawn_child="sleep 600 & wait"))
    wait_for_progress(pool, 1)
    worker = pool.running()[1][2]
    pgid = child_group_of(worker)
    assert len(live_group_members(pgid)) >= 1

    assert pool.terminate(1, "token-1", grace_seconds=2.0)
    outcome = collect(pool, [1])[1]

    assert outcome.status == "cancelled"
    assert outcome.error["details"]["stage"] == "terminate"
    wait_until(None, lambda: not live_group_members(pgid), 5.0, f"process group {pgid} to end")


def test_worker_death_kills_process_group(pool, tmp_path):
    pool.dispatch(0, make_task(1, tmp_path, steps=100_000, step_seconds=0.01, spawn_child="sleep 600 & wait"))
    wait_for_progress(pool, 1)
    worker = pool.running()[1][2]
    pgid = child_group_of(worker)

    os.kill(worker, signal.SIGKILL)
    outcome = collect(pool, [1])[1]

    assert outcome.error["code"] == "worker_died"
    wait_until(None, lambda: not live_group_members(pgid), 5.0, f"process group {pgid} to end")


def test_large_summary_round_trip(pool, tmp_path):
    text = "x" * (50 * 1024 * 1024)
    pool.dispatch(0, make_task(1, tmp_path, steps=1, result={"text": text, "nan": math.nan}))
    outcome = collect(pool, [1], timeout=60.0)[1]

    assert outcome.status == "succeeded"
    assert len(outcome.summary["text"]) == len(text)
    assert math.isnan(outcome.summary["nan"])


def test_kill_during_large_send(pool, tmp_path):
    pool.dispatch(0, make_task(1, tmp_path, steps=1, result={"text": "x" * (50 * 1024 * 1024)}))
    pool.dispatch(1, make_task(2, tmp_path, steps=200, step_seconds=0.01))
    victim = pool.running()[1][2]
    # A large outcome goes through a spool file; kill the worker while it pickles or writes it.
    wait_until(None, lambda: glob.glob(os.path.join(tempfile.gettempdir(), f"analysis-outcome-{victim}-*")),
               30, "the spool file to appear")

    os.kill(victim, signal.SIGKILL)
    outcomes = collect(pool, [1, 2], timeout=60.0)

    assert outcomes[1].status in ("succeeded", "failed")
    if outcomes[1].status == "failed":
        assert outcomes[1].error["code"] == "worker_died"
        assert outcomes[1].error["details"] == {"signal": "SIGKILL"}
    assert outcomes[2].status == "succeeded"
    assert glob.glob(os.path.join(tempfile.gettempdir(), f"analysis-outcome-{victim}-*")) == []


def test_worker_recycled_after_max_jobs(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with WorkerPool(1, max_jobs_per_worker=2, worker_start_timeout_seconds=START_TIMEOUT) as pool:
        pids = []
        for job_id in (1, 2, 3):
            wait_until(pool, lambda: pool.free_slots() == [0], START_TIMEOUT, "slot 0 to be free")
            pool.dispatch(0, make_task(job_id, tmp_path, steps=2))
            pids.append(pool.running()[job_id][2])
            assert collect(pool, [job_id])[job_id].status == "succeeded"

    assert pids[0] == pids[1]
    assert pids[2] != pids[0]
    events = [getattr(record, "event", None) for record in caplog.records]
    assert "worker_retired" in events
    assert "worker_died" not in events


def test_worker_logs_forwarded(tmp_path, caplog):
    # Workers take the supervisor's level at start; job_started is a DEBUG record.
    caplog.set_level(logging.DEBUG)
    with WorkerPool(1, worker_start_timeout_seconds=START_TIMEOUT) as pool:
        pool.dispatch(0, make_task(5, tmp_path, steps=2))
        worker = pool.running()[5][2]
        collect(pool, [5])

    started = [record for record in caplog.records if getattr(record, "event", None) == "job_started"]
    assert len(started) == 1
    assert started[0].name == "supervisor.worker"
    assert started[0].job_id == 5
    assert started[0].slot == 0
    assert started[0].process == worker


def test_start_raises_when_no_worker_starts(monkeypatch):
    monkeypatch.setenv(START_FAIL_VARIABLE, "1")
    pool = WorkerPool(2, worker_start_timeout_seconds=START_TIMEOUT)
    with pytest.raises(RuntimeError, match="test hook"):
        pool.start()
    assert pool.worker_pids() == []


def test_startup_failure_backs_off(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    with WorkerPool(1, worker_start_timeout_seconds=START_TIMEOUT, restart_backoff_seconds=1.0) as pool:
        monkeypatch.setenv(START_FAIL_VARIABLE, "1")
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        wait_until(pool, lambda: pool.free_slots() == [], 5.0, "the pool to notice the dead worker")
        pool.dispatch(0, make_task(1, tmp_path, steps=2))
        outcome = collect(pool, [1])[1]

        assert outcome.status == "failed"
        assert outcome.error["code"] == "worker_died"
        assert outcome.error["details"]["stage"] == "startup"
        assert outcome.retryable is True

        watch_until = time.monotonic() + 3.0
        while time.monotonic() < watch_until:
            assert pool.wait(0.1) == []
        failures = [record for record in caplog.records if getattr(record, "event", None) == "worker_start_failed"]
        # Restarts wait 1 s, then 2 s, then 4 s, so the ~3 s watched after the
        # first failure hold a second attempt and maybe a third.
        assert 2 <= len(failures) <= 3

        monkeypatch.delenv(START_FAIL_VARIABLE)
        wait_until(pool, lambda: pool.free_slots() == [0], 10.0, "the slot to recover")
        pool.dispatch(0, make_task(2, tmp_path, steps=2))
        assert collect(pool, [2])[2].status == "succeeded"


_SUPERVISOR_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from analyses import registry
    from supervisor.pool import Task, WorkerPool

    if __name__ == "__main__":
        pool = WorkerPool(1, parent_death_signal=sys.argv[1] == "1", nice_increment=0)
        pool.start()
        params = registry.get("noop").validate_params(
            {"steps": 100000, "step_seconds": 0.01, "spawn_child": "sleep 600 & wait"})
        pool.dispatch(0, Task(1, 1, "token-1", "noop", params, sys.argv[2]))
        while not pool.read_progress().get(1) or pool.read_progress()[1].completed == 0:
            pool.wait(0.05)
        print(json.dumps({"workers": pool.worker_pids()}), flush=True)
        while True:
            pool.wait(1.0)
""")


@pytest.mark.parametrize("parent_death_signal", [False, True], ids=["lifeline", "lifeline-and-pdeathsig"])
def test_workers_exit_when_supervisor_killed(tmp_path, parent_death_signal):
    script = tmp_path / "supervisor_script.py"
    script.write_text(_SUPERVISOR_SCRIPT)
    helper = subprocess.Popen([sys.executable, str(script), "1" if parent_death_signal else "0", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = helper.stdout.readline()
        assert line, "helper supervisor exited before reporting its workers"
        workers = json.loads(line)["workers"]
        assert len(workers) == 1
        pgid = child_group_of(workers[0])

        helper.kill()
        helper.wait(10)
        wait_until(None, lambda: all(is_gone(pid) for pid in workers), 5.0, "the workers to exit")
        wait_until(None, lambda: not live_group_members(pgid), 5.0, f"process group {pgid} to end")
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        helper.stdout.close()
