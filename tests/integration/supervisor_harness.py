"""Start real supervisor processes for tests and wait on job states with timeouts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import sqlalchemy as sa

from supervisor import store

# Short timings so recovery paths run in seconds; heartbeat stays at most half
# of the lease, as the configuration requires.
FAST_SETTINGS = {
    "ANALYSIS_LEASE_SECONDS": "4",
    "ANALYSIS_HEARTBEAT_SECONDS": "1",
    "ANALYSIS_POLL_SECONDS": "0.5",
    "ANALYSIS_CANCEL_GRACE_SECONDS": "2",
    "ANALYSIS_SHUTDOWN_GRACE_SECONDS": "3",
    "ANALYSIS_PROGRESS_INTERVAL_SECONDS": "0.2",
    "ANALYSIS_RETRY_BASE_SECONDS": "0.1",
    "ANALYSIS_RETRY_MAX_SECONDS": "0.5",
    "ANALYSIS_WORKER_START_TIMEOUT_SECONDS": "30",
    # The test process and Postgres count as other programs' load; a CPU
    # pause would make these tests depend on what else the machine runs.
    "ANALYSIS_THROTTLE_PAUSE_CPU_PERCENT": "101",
}


class SupervisorProcess:
    """A supervisor started with ``python -m supervisor``; its log goes to a file."""

    def __init__(self, database_url: str, data_dir: Path, workers: int, log_path: Path, **settings: str):
        environ = {**os.environ, **FAST_SETTINGS, "ANALYSIS_DATABASE_URL": database_url,
                   "ANALYSIS_DATA_DIR": str(data_dir), "ANALYSIS_WORKERS": str(workers)}
        environ.update({f"ANALYSIS_{name.upper()}": str(value) for name, value in settings.items()})
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "supervisor"], env=environ,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid

    def wait_ready(self, engine: sa.Engine, timeout: float = 60.0) -> None:
        """Wait until this process has registered its supervisors row."""
        def registered() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.process.returncode}:\n{self.log()}")
            with engine.connect() as connection:
                return connection.execute(
                    sa.text("SELECT 1 FROM supervisors WHERE pid = :pid AND stopped_at IS NULL"), {"pid": self.pid}
                ).first() is not None
        wait_for(registered, timeout, f"supervisor {self.pid} to register")

    def worker_pids(self) -> list[int]:
        try:
            return [child.pid for child in psutil.Process(self.pid).children()
                    if "multiprocessing" in " ".join(child.cmdline())]
        except psutil.NoSuchProcess:
            return []

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Return the first truthy value of ``predicate``, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_for_status(engine: sa.Engine, job_id: int, statuses: set[str] | str, timeout: float = 30.0) -> store.Job:
    wanted = {statuses} if isinstance(statuses, str) else statuses

    def reached():
        job = store.get_job(engine, job_id)
        return job if job.status in wanted else None

    try:
        return wait_for(reached, timeout, f"job {job_id} to reach {sorted(wanted)}")
    except AssertionError:
        job = store.get_job(engine, job_id)
        raise AssertionError(f"job {job_id} is {job.status} (error {job.error}), expected {sorted(wanted)}") from None


def read_run_log(path: Path) -> list[tuple[int, int, int, str]]:
    """Return (job id, attempt, pid, start|end) lines written by noop's run_log."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        job_id, attempt, pid, event = line.split()
        lines.append((int(job_id), int(attempt), int(pid), event))
    return lines


def pid_exists(pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
