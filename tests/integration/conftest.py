"""Fixtures for integration tests that start real supervisor processes."""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.supervisor_harness import SupervisorProcess, pid_exists, wait_for


def resume(pid: int) -> None:
    """Send SIGCONT, so a process a test stopped can handle the SIGTERM that ends it."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


@pytest.fixture
def start_supervisor(engine, database_url, tmp_path):
    """Start supervisors on this test's data folder, and resume and stop them at the end."""
    started: list[SupervisorProcess] = []

    def start(workers: int = 2, **settings) -> SupervisorProcess:
        log_path = tmp_path / f"supervisor-{len(started)}.log"
        process = SupervisorProcess(database_url, tmp_path / "data", workers, log_path, **settings)
        started.append(process)
        process.wait_ready(engine)
        return process

    yield start
    for process in started:
        workers = process.worker_pids()
        for pid in [process.pid, *workers]:
            resume(pid)
        process.stop()
        for pid in workers:
            wait_for(lambda pid=pid: not pid_exists(pid), 10, f"worker {pid} to exit")
