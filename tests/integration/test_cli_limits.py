"""analysisctl limits and the scheduling options of submit, run in-process against the test database."""

from __future__ import annotations

import json

import pytest

from supervisor import store


def test_limits_set_show_clear(cli, engine):
    assert cli("limits", "set", "--user", "*", "4").exit_code == 0
    assert cli("limits", "set", "--analysis", "matrix-profile", "1").exit_code == 0

    listed = json.loads(cli("limits", "show", "--json").stdout)
    text = cli("limits", "show").stdout
    cleared = cli("limits", "clear", "--analysis", "matrix-profile")

    assert [(item["scope"], item["name"], item["max_running"]) for item in listed] == [
        ("analysis", "matrix-profile", 1), ("user", "*", 4)]
    assert "matrix-profile" in text
    assert cleared.exit_code == 0
    assert [limit.name for limit in store.list_limits(engine)] == ["*"]
    assert "nothing changed" in cli("limits", "clear", "--analysis", "matrix-profile").stdout


@pytest.mark.parametrize(("args", "code", "message"), [
    (("limits", "set", "3"), 2, "exactly one of --user NAME or --analysis TYPE"),
    (("limits", "set", "--user", "a", "--analysis", "noop", "3"), 2, "exactly one of"),
    (("limits", "set", "--analysis", "no-such", "3"), 4, "unknown analysis"),
    (("limits", "set", "--user", "alice", "--", "-1"), 4, "invalid limit -1"),
    (("limits", "set", "--user", "alice", "many"), 2, "Invalid value for 'MAX_RUNNING'"),
])
def test_limits_bad_input_changes_nothing(cli, engine, args, code, message):
    result = cli(*args)

    assert result.exit_code == code
    assert message in result.output
    assert store.list_limits(engine) == []


def test_submit_memory_limit_shown_in_status(cli, engine):
    job_id = cli("submit", "noop", "--memory-limit", "300").stdout.strip()

    assert store.get_job(engine, int(job_id)).memory_limit_mib == 300
    assert "at most 300 MiB more" in cli("status", job_id).stdout
    assert json.loads(cli("status", job_id, "--json").stdout)["memory_limit_mib"] == 300


def test_submit_bad_memory_limit_writes_nothing(cli, engine):
    result = cli("submit", "noop", "--memory-limit", "0")

    assert result.exit_code == 4
    assert "memory_limit_mib" in result.output
    assert store.list_jobs(engine) == []
