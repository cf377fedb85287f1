"""Supervisor start-up: retries against a database whose schema is behind, stop signals, worker counts."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import sqlalchemy as sa

from supervisor import config, loop
from supervisor.errors import ConfigError
from tests.integration.supervisor_harness import FAST_SETTINGS, wait_for


def test_empty_database_retried_then_exit_6(scratch_databases, tmp_path, monkeypatch, caplog):
    url = scratch_databases.create("analysis_test_empty")
    settings = config.load({"ANALYSIS_DATABASE_URL": url, "ANALYSIS_DATA_DIR": str(tmp_path)})
    sleeps: list[float] = []
    monkeypatch.setattr(loop.time, "sleep", sleeps.append)

    with caplog.at_level(logging.WARNING, logger="supervisor.loop"):
        exit_code = loop.run_supervisor(settings, configure_logging=False)

    assert exit_code == 6
    assert sleeps == [1.0, 2.0, 4.0, 8.0]
    retries = [record for record in caplog.records if getattr(record, "event", None) == "supervisor_start_retry"]
    assert len(retries) == loop.START_ATTEMPTS - 1
    assert "analysisctl db upgrade" in retries[0].error
    failures = [record for record in caplog.records if getattr(record, "event", None) == "supervisor_start_failed"]
    assert failures[0].exit_code == 6


def test_stop_signal_during_worker_start_exits_0(database_url, engine, tmp_path):
    environ = {**os.environ, **FAST_SETTINGS, "ANALYSIS_DATABASE_URL": database_url,
               "ANALYSIS_DATA_DIR": str(tmp_path), "ANALYSIS_WORKERS": str(config.max_workers())}
    process = subprocess.Popen([sys.executable, "-m", "supervisor"], env=environ,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(process.pid)
    wait_for(lambda: parent.children(), 30, "the first worker to start")
    workers = parent.children(recursive=True)

    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
                                              for worker in workers):
        time.sleep(0.1)
    assert [worker.pid for worker in workers if worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE] == []


def test_worker_count_above_four_per_cpu_rejected():
    with pytest.raises(ConfigError, match="at most .* on this machine"):
        config.load({"ANALYSIS_WORKERS": str(4 * (os.cpu_count() or 1) + 1), "ANALYSIS_CONFIG": ""})


def failing_registration(failures: int, real):
    """Return a stand-in for runs.register_supervisor that fails ``failures`` times, then registers."""
    calls = []

    def register(*args, **kwargs):
        calls.append(args)
        if len(calls) <= failures:
            raise sa.exc.OperationalError("INSERT INTO supervisors", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    return register


def test_registration_retried_then_exit_5(database_url, engine, tmp_path, monkeypatch, caplog):
    settings = config.load({**FAST_SETTINGS, "ANALYSIS_DATABASE_URL": database_url,
                            "ANALYSIS_DATA_DIR": str(tmp_path), "ANALYSIS_WORKERS": "1"})
    monkeypatch.setattr(loop.runs, "register_supervisor", failing_registration(99, loop.runs.register_supervisor))
    monkeypatch.setattr(loop, "START_RETRY_SECONDS", 0.01)

    with caplog.at_level(logging.WARNING, logger="supervisor.loop"):
        exit_code = loop.run_supervisor(settings, configure_logging=False)

    assert exit_code == 5
    retries = [record for record in caplog.records if getattr(record, "event", None) == "supervisor_start_retry"]
    assert len(retries) == loop.START_ATTEMPTS - 1
    failures = [record for record in caplog.records if getattr(record, "event", None) == "supervisor_start_failed"]
    assert failures[0].exit_code == 5
    assert "could not register the supervisor" in failures[0].error


def test_registration_retried_then_started(database_url, engine, tmp_path, monkeypatch):
    settings = config.load({**FAST_SETTINGS, "ANALYSIS_DATABASE_URL": database_url,
                            "ANALYSIS_DATA_DIR": str(tmp_path), "ANALYSIS_WORKERS": "1"})
    monkeypatch.setattr(loop.runs, "register_supervisor", failing_registration(2, loop.runs.register_supervisor))
    monkeypatch.setattr(loop, "START_RETRY_SECONDS", 0.01)
    supervisor = loop.Supervisor(settings, engine)

    try:
        supervisor.start()
        registered = [row["id"] for row in loop.runs.list_supervisors(engine)]
    finally:
        supervisor.shutdown()

    assert supervisor.id in registered
