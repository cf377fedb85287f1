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
