"""A supervisor started against a database whose schema is behind: it retries, then exits 6."""

from __future__ import annotations

import logging

from supervisor import config, loop


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
