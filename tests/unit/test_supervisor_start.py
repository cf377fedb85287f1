"""A supervisor that cannot start: supervisor.loop.connect_with_backoff and run_supervisor's exit code."""

from __future__ import annotations

import logging

import pytest

from supervisor import config, db, loop
from supervisor.errors import ConfigError, DatabaseUnavailable, SchemaOutOfDate


@pytest.fixture
def settings(tmp_path):
    return config.load({"ANALYSIS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
                        "ANALYSIS_DATA_DIR": str(tmp_path)})


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The waits connect_with_backoff requests, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(loop.time, "sleep", recorded.append)
    return recorded


def fail_then_connect(monkeypatch, errors: list[Exception]) -> list[int]:
    """Make db.connect raise ``errors`` in turn, then return a stand-in engine; return the call log."""
    calls: list[int] = []

    def connect(settings, **engine_options):
        calls.append(len(calls) + 1)
        if errors:
            raise errors.pop(0)
        return "engine"

    monkeypatch.setattr(db, "connect", connect)
    return calls


def test_backoff_retries_database_down_and_schema_behind(monkeypatch, settings, sleeps, caplog):
    calls = fail_then_connect(monkeypatch, [DatabaseUnavailable("down"), SchemaOutOfDate("behind")])

    with caplog.at_level(logging.WARNING, logger="supervisor.loop"):
        engine = loop.connect_with_backoff(settings)

    assert engine == "engine"
    assert calls == [1, 2, 3]
    assert sleeps == [1.0, 2.0]
    retries = [record for record in caplog.records if getattr(record, "event", None) == "supervisor_start_retry"]
    assert [record.error for record in retries] == ["down", "behind"]


def test_backoff_gives_up_after_attempts(monkeypatch, settings, sleeps):
    fail_then_connect(monkeypatch, [DatabaseUnavailable(f"down {n}") for n in range(loop.START_ATTEMPTS)])

    with pytest.raises(DatabaseUnavailable, match=f"down {loop.START_ATTEMPTS - 1}"):
        loop.connect_with_backoff(settings)

    assert sleeps == [1.0, 2.0, 4.0, 8.0]


def test_backoff_wait_capped(monkeypatch, settings, sleeps):
    fail_then_connect(monkeypatch, [SchemaOutOfDate("behind")] * 8)

    with pytest.raises(SchemaOutOfDate):
        loop.connect_with_backoff(settings, attempts=8)

    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, loop.START_RETRY_MAX_SECONDS, loop.START_RETRY_MAX_SECONDS]


def test_backoff_config_error_not_retried(monkeypatch, settings, sleeps):
    calls = fail_then_connect(monkeypatch, [ConfigError("bad URL")])

    with pytest.raises(ConfigError):
        loop.connect_with_backoff(settings)

    assert calls == [1]
    assert sleeps == []


def test_backoff_real_refused_port(settings, sleeps):
    # Port 1 on the loopback interface refuses connections: a database that is down.
    with pytest.raises(DatabaseUnavailable, match="127.0.0.1"):
        loop.connect_with_backoff(settings, attempts=2)

    assert sleeps == [1.0]


@pytest.mark.parametrize(
    ("error", "exit_code"),
    [(ConfigError("bad"), 2), (DatabaseUnavailable("down"), 5), (SchemaOutOfDate("behind"), 6)],
)
def test_run_supervisor_start_failure_exit_code(monkeypatch, settings, caplog, error, exit_code):
    def connect_with_backoff(settings, **engine_options):
        raise error

    monkeypatch.setattr(loop, "connect_with_backoff", connect_with_backoff)

    with caplog.at_level(logging.CRITICAL, logger="supervisor.loop"):
        returned = loop.run_supervisor(settings, configure_logging=False)

    assert returned == exit_code
    failures = [record for record in caplog.records if getattr(record, "event", None) == "supervisor_start_failed"]
    assert len(failures) == 1
    assert failures[0].exit_code == exit_code
