"""analysisctl without a database: help, parsing, rendering, configuration and CSV validation."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import io
import json
import math
import sys
import uuid
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from analyses import load
from cli import output, params
from cli.main import app
from cli.watch import PlainRenderer, RichRenderer
from supervisor.errors import InvalidRequest
from supervisor.store import Job

UNREACHABLE_URL = "postgresql://postgres:hunter2@127.0.0.1:1/x"
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)


def strict_loads(text: str):
    """Parse JSON the way a strict client does: NaN and Infinity are errors."""

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


@pytest.fixture
def runner(tmp_path) -> CliRunner:
    return CliRunner(env={"ANALYSIS_DATABASE_URL": UNREACHABLE_URL, "ANALYSIS_DATA_DIR": str(tmp_path),
                          "ANALYSIS_DATABASE_URL_FILE": None, "ANALYSIS_CONFIG": None, "ANALYSIS_WORKERS": None,
                          "ANALYSIS_LEASE_SECONDS": None})


def make_job(**fields) -> Job:
    base = dict(
        id=7, analysis="noop", params={}, job_key=None, status="running", priority=0, submitted_by="alice",
        created_at=NOW, updated_at=NOW, started_at=NOW, finished_at=None, attempt=1, max_attempts=3,
        run_after=NOW, start_by=None, timeout_seconds=None, lease_owner=uuid.UUID(int=1),
        lease_expires_at=NOW, attempt_token=uuid.UUID(int=2), cancel_requested_at=None,
        cancel_requested_by=None, progress_phase="steps", progress_completed=5, progress_total=10,
        progress_message=None, progress_rate=2.0, progress_eta_seconds=2.5, progress_updated_at=NOW,
        error=None, result=None, results_expire_at=None, event_seq=2, queue_key=NOW.timestamp(), crashes=0,
        memory_limit_mib=None,
    )
    base.update(fields)
    return Job(**base)


# Help ------------------------------------------------------------------------

COMMANDS = [
    ["supervisor"], ["db"], ["config"], ["data"],
    ["submit"], ["status"], ["watch"], ["list"], ["cancel"], ["retry"], ["events"], ["result"],
    ["supervisor", "run"], ["supervisors"], ["db", "upgrade"], ["db", "check"], ["db", "url"], ["prune"],
    ["config", "show"], ["doctor"], ["analyses"], ["data", "load"], ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_examples(runner, command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output or "Example:" in result.output
    assert "analysisctl" in result.output


def test_main_help_documents_exit_codes(runner):
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0
    for line in ("3  job not found", "4  invalid request", "5  database unavailable", "6  database schema"):
        assert line in result.output


def test_setting_options_show_env_var(runner):
    result = runner.invoke(app, ["supervisor", "run", "--help"], env={"COLUMNS": "200"})

    for variable in ("ANALYSIS_WORKERS", "ANALYSIS_LEASE_SECONDS", "ANALYSIS_HEARTBEAT_SECONDS",
                     "ANALYSIS_POLL_SECONDS", "ANALYSIS_SHUTDOWN_GRACE_SECONDS", "ANALYSIS_RESULTS_DIR"):
        assert variable in result.output
    assert "SECONDS" in result.output


def test_completion_options_present(runner):
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})

    assert "--install-completion" in result.output


# Parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("steps=100", ("steps", 100)),
        ("step_seconds=0.5", ("step_seconds", 0.5)),
        ("cpu=true", ("cpu", True)),
        ("target=vlinder02.temp", ("target", "vlinder02.temp")),
        ('sensors=["a","b"]', ("sensors", ["a", "b"])),
        ('name="100"', ("name", "100")),
        ("note=a=b", ("note", "a=b")),
        ("empty=", ("empty", "")),
        ("fail_at=null", ("fail_at", None)),
    ],
)
def test_parse_param_values(item, expected):
    assert params.parse_param(item) == expected


@pytest.mark.parametrize("item", ["x=NaN", "x=Infinity", "x=-Infinity", "x=1e400", "x=[1, NaN]"])
def test_parse_param_rejects_non_finite(item):
    with pytest.raises(InvalidRequest) as caught:
        params.parse_param(item)

    assert item.split("=", 1)[1] in caught.value.message


@pytest.mark.parametrize("item", ["steps", "=5", ""])
def test_parse_param_rejects_missing_name(item):
    with pytest.raises(InvalidRequest, match="NAME=VALUE"):
        params.parse_param(item)


def test_collect_params_param_overrides_document():
    merged = params.collect_params(["steps=3"], '{"steps": 1, "cpu": true}', None)

    assert merged == {"steps": 3, "cpu": True}


@pytest.mark.parametrize(
    ("document", "fragment"),
    [("[1, 2]", "must be a JSON object"), ("{bad", "not valid JSON"), ('{"x": NaN}', "NaN")],
)
def test_collect_params_rejects_bad_document(document, fragment):
    with pytest.raises(InvalidRequest, match=fragment):
        params.collect_params([], document, None)


def test_params_file_errors(tmp_path):
    with pytest.raises(InvalidRequest, match="not found"):
        params.read_params_file(tmp_path / "missing.json")
    with pytest.raises(InvalidRequest, match="is a directory"):
        params.read_params_file(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": Infinity}')
    with pytest.raises(InvalidRequest, match="Infinity"):
        params.read_params_file(bad)


def test_params_and_params_file_exclusive(tmp_path):
    with pytest.raises(InvalidRequest, match="cannot be used together"):
        params.collect_params([], "{}", tmp_path / "p.json")


def test_parse_datetime_needs_time_zone():
    assert params.parse_datetime("2026-01-31T18:00:00Z", option="--start-by").tzinfo is not None
    with pytest.raises(InvalidRequest, match="no time zone"):
        params.parse_datetime("2026-01-31T18:00:00", option="--start-by")
    with pytest.raises(InvalidRequest, match="ISO-8601"):
        params.parse_datetime("tomorrow", option="--start-by")


# Progress rendering ------------------------------------------------------------------


def test_progress_view_normal_run():
    view = output.progress_view(make_job())

    assert view.percent == 50.0
    assert view.eta_seconds == 2.5
    assert view.rate == 2.0


@pytest.mark.parametrize(
    ("fields", "percent", "eta"),
    [
        ({"progress_total": None}, None, None),
        ({"progress_completed": 15, "progress_total": 10}, 100.0, 0.0),
        ({"progress_completed": -3}, 0.0, 2.5),
        ({"progress_rate": 0.0}, 50.0, None),
        ({"progress_rate": float("nan"), "progress_eta_seconds": float("nan")}, 50.0, None),
        ({"progress_rate": float("inf")}, 50.0, None),
        ({"progress_rate": -1.0}, 50.0, None),
        ({"progress_eta_seconds": -40.0}, 50.0, 2.5),
        ({"progress_eta_seconds": float("inf")}, 50.0, 2.5),
        ({"progress_total": 0, "progress_completed": 0}, None, 0.0),
        ({"progress_completed": None, "progress_total": None, "progress_rate": None}, None, None),
        ({"status": "succeeded", "progress_completed": 3}, 100.0, 0.0),
        ({"status": "succeeded", "progress_total": None, "progress_completed": None}, 100.0, 0.0),
        ({"status": "queued"}, 50.0, None),
        ({"status": "failed"}, 50.0, None),
    ],
)
def test_progress_view_odd_values(fields, percent, eta):
    view = output.progress_view(make_job(**fields))

    assert view.percent == percent
    assert view.eta_seconds == eta
    if view.eta_seconds is not None:
        assert math.isfinite(view.eta_seconds)
        assert view.eta_seconds >= 0
    if view.completed is not None and view.total is not None:
        assert 0 <= view.completed <= view.total


def test_job_document_is_strict_json():
    job = make_job(progress_rate=float("nan"), progress_eta_seconds=float("-inf"), timeout_seconds=float("inf"),
                   progress_completed=99, progress_total=None)

    document = strict_loads(output.dumps(output.job_document(job)))

    assert document["progress"]["eta_seconds"] is None
    assert document["progress"]["rate"] is None
    assert document["timeout_seconds"] is None
    assert document["created_at"] == NOW.isoformat()


def test_dumps_never_writes_nan():
    text = output.dumps({"a": float("nan"), "b": [float("inf")], "c": dt.timedelta(seconds=3)})

    assert strict_loads(text) == {"a": None, "b": [None], "c": 3.0}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (float("nan"), "-"), (-5, "0.0s"), (0.42, "0.4s"), (42, "42s"), (185, "3m05s"),
     (7440, "2h04m"), (200_000, "2d07h")],
)
def test_format_duration(seconds, text):
    assert output.format_duration(seconds) == text


def test_progress_line_unknown_total():
    line = output.progress_line(make_job(progress_total=None, progress_completed=12, progress_rate=0.0))

    assert "12/?" in line
    assert "eta unknown" in line


def test_abbreviate_truncates_lists():
    shortened = output.abbreviate({"pairs": list(range(100)), "name": "x" * 200})

    assert shortened["pairs"][:6] == [0, 1, 2, 3, 4, 5]
    assert shortened["pairs"][-1] == "... 94 more items"
    assert len(shortened["name"]) == 80


ODD_JOBS = [
    make_job(progress_total=None, progress_completed=None, progress_phase=None),
    make_job(progress_total=None, progress_completed=40),
    make_job(progress_completed=500, progress_total=10, progress_rate=float("nan")),
    make_job(attempt=2, progress_completed=0, progress_total=10, cancel_requested_at=NOW),
    make_job(status="queued", attempt=1, error={"code": "worker_died", "message": "killed"}),
    make_job(status="succeeded", finished_at=NOW + dt.timedelta(seconds=3)),
    make_job(status="failed", finished_at=NOW, error={"code": "analysis_error", "message": "boom"}),
]


def test_rich_renderer_survives_odd_values():
    buffer = io.StringIO()
    renderer = RichRenderer(Console(file=buffer, force_terminal=True, width=120))

    with renderer:
        for job in ODD_JOBS[:-2]:
            renderer.update(job)
        renderer.finish(ODD_JOBS[-1])

    assert "analysis_error: boom" in buffer.getvalue()


def test_plain_renderer_prints_changes_once(capsys):
    renderer = PlainRenderer()

    with renderer:
        renderer.update(ODD_JOBS[0])
        renderer.update(ODD_JOBS[0])
        renderer.update(ODD_JOBS[3])
        renderer.finish(ODD_JOBS[5])

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert "attempt 2/3" in lines[1]
    assert "cancel requested" in lines[1]
    assert "succeeded" in lines[2]


# Errors without a database -----------------------------------------------------------


def test_unreachable_database_exits_5(runner):
    result = runner.invoke(app, ["status", "1"])

    assert result.exit_code == 5, result.output
    assert "127.0.0.1:1" in result.stderr
    assert "hunter2" not in result.output
    assert "Traceback" not in result.output


def test_unreachable_database_hides_query_password(runner):
    result = runner.invoke(app, ["list"], env={
        "ANALYSIS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x?password=topsecret"})

    assert result.exit_code == 5
    assert "topsecret" not in result.output


def test_invalid_setting_exits_2(runner):
    result = runner.invoke(app, ["list"], env={"ANALYSIS_POLL_SECONDS": "soon"})

    assert result.exit_code == 2
    assert "ANALYSIS_POLL_SECONDS" in result.stderr


def test_job_id_must_be_integer(runner):
    result = runner.invoke(app, ["status", "abc"])

    assert result.exit_code == 2


def test_submit_nan_rejected_before_connecting(runner):
    result = runner.invoke(app, ["submit", "noop", "--param", "step_seconds=NaN"])

    assert result.exit_code == 4
    assert "NaN" in result.stderr


def test_submit_missing_params_file(runner, tmp_path):
    result = runner.invoke(app, ["submit", "noop", "--params-file", str(tmp_path / "nope.json")])

    assert result.exit_code == 4
    assert "nope.json" in result.stderr
    assert "not found" in result.stderr


def test_result_json_and_output_exclusive(runner, tmp_path):
    result = runner.invoke(app, ["result", "1", "--json", "--output", str(tmp_path)])

    assert result.exit_code == 2


# config show -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:hunter2@127.0.0.1:5432/db",
        "postgresql://postgres@127.0.0.1:5432/db?password=hunter2",
        "postgresql+psycopg://postgres:hunter2@127.0.0.1/db?sslpassword=hunter2",
    ],
)
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_config_show_hides_password(runner, url, json_flag):
    result = runner.invoke(app, ["config", "show", *json_flag], env={"ANALYSIS_DATABASE_URL": url})

    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    assert "***" in result.output


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_config_show_hides_password_from_url_file(runner, tmp_path, json_flag):
    url_file = tmp_path / "database-url"
    url_file.write_text("postgresql://postgres:hunter2@127.0.0.1:5432/db\n")
    url_file.chmod(0o600)

    result = runner.invoke(app, ["config", "show", *json_flag],
                           env={"ANALYSIS_DATABASE_URL": None, "ANALYSIS_DATABASE_URL_FILE": str(url_file)})

    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    assert "postgresql://postgres:***@127.0.0.1:5432/db" in result.output
    assert str(url_file) in result.output


def test_url_file_flag_read(runner, tmp_path):
    url_file = tmp_path / "database-url"
    url_file.write_text("postgresql://postgres:hunter2@127.0.0.1:5432/db\n")
    url_file.chmod(0o600)

    result = runner.invoke(app, ["--database-url-file", str(url_file), "config", "show", "--json"],
                           env={"ANALYSIS_DATABASE_URL": None})

    rows = {row["name"]: row for row in strict_loads(result.stdout)["settings"]}
    assert rows["database_url_file"]["source"] == "flag"
    assert rows["database_url"]["effective"] == "postgresql://postgres:***@127.0.0.1:5432/db"


def test_url_file_group_readable_exits_2(runner, tmp_path):
    url_file = tmp_path / "database-url"
    url_file.write_text("postgresql://postgres:hunter2@127.0.0.1:5432/db\n")
    url_file.chmod(0o640)

    result = runner.invoke(app, ["config", "show"],
                           env={"ANALYSIS_DATABASE_URL": None, "ANALYSIS_DATABASE_URL_FILE": str(url_file)})

    assert result.exit_code == 2
    assert f"chmod 600 {url_file}" in result.stderr
    assert "hunter2" not in result.output


def test_config_show_sources(runner):
    result = runner.invoke(app, ["--data-dir", "/tmp/flagdir", "config", "show", "--json"],
                           env={"ANALYSIS_WORKERS": "3"})

    rows = {row["name"]: row for row in strict_loads(result.stdout)["settings"]}
    assert rows["workers"]["value"] == 3
    assert rows["workers"]["source"] == "ANALYSIS_WORKERS"
    assert rows["data_dir"]["source"] == "flag"
    assert rows["lease_seconds"]["source"] == "default"
    assert rows["poll_seconds"]["env"] == "ANALYSIS_POLL_SECONDS"


def test_config_show_reads_toml(runner, tmp_path):
    config_file = tmp_path / "settings.toml"
    config_file.write_text("lease_seconds = 45.0\n")

    result = runner.invoke(app, ["--config", str(config_file), "config", "show", "--json"])

    rows = {row["name"]: row for row in strict_loads(result.stdout)["settings"]}
    assert rows["lease_seconds"]["value"] == 45.0
    assert rows["lease_seconds"]["source"] == str(config_file)


# supervisor run -----------------------------------------------------------------------


def test_supervisor_run_passes_flags(runner, monkeypatch):
    import supervisor.loop

    seen = {}

    def fake_run_supervisor(settings):
        seen["settings"] = settings
        return 0

    monkeypatch.setattr(supervisor.loop, "run_supervisor", fake_run_supervisor)
    result = runner.invoke(app, ["supervisor", "run", "--workers", "3", "--heartbeat-seconds", "2"],
                           env={"ANALYSIS_LEASE_SECONDS": "40"})

    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert settings.workers == 3
    assert settings.sources["workers"] == "flag"
    assert settings.lease_seconds == 40.0
    assert settings.sources["lease_seconds"] == "ANALYSIS_LEASE_SECONDS"
    assert settings.heartbeat_seconds == 2.0


def test_supervisor_run_returns_exit_code(runner, monkeypatch):
    import supervisor.loop

    monkeypatch.setattr(supervisor.loop, "run_supervisor", lambda settings: 3)

    assert runner.invoke(app, ["supervisor", "run"]).exit_code == 3


def test_supervisor_run_without_loop_module(runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "supervisor.loop", None)

    result = runner.invoke(app, ["supervisor", "run"])

    assert result.exit_code == 1
    assert "supervisor.loop" in result.stderr


def test_supervisor_run_rejects_bad_lease(runner, restore_root_logger):
    result = runner.invoke(app, ["supervisor", "run", "--lease-seconds", "4", "--heartbeat-seconds", "3"])

    assert result.exit_code == 2
    assert "heartbeat_seconds" in result.stderr


def test_supervisor_run_logs_config_error_as_json(runner, restore_root_logger):
    result = runner.invoke(app, ["supervisor", "run", "--lease-seconds", "4", "--heartbeat-seconds", "3"])

    lines = result.stderr.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "supervisor_start_failed"
    assert record["level"] == "CRITICAL"
    assert record["exit_code"] == 2
    assert "heartbeat_seconds" in record["error"]


# analyses -----------------------------------------------------------------------------


def test_analyses_json_lists_noop(runner):
    result = runner.invoke(app, ["analyses", "--json"])

    analyses = {entry["name"]: entry for entry in strict_loads(result.stdout)}
    steps = next(param for param in analyses["noop"]["params"] if param["name"] == "steps")
    assert steps["kind"] == "integer"
    assert steps["default"] == 10
    assert steps["minimum"] == 0


def test_analyses_text_lists_parameters(runner):
    result = runner.invoke(app, ["analyses"])

    assert result.exit_code == 0
    assert "noop:" in result.stdout
    assert "steps" in result.stdout


# CSV validation -------------------------------------------------------------------------------

GOOD_CSV = """sensor_id,ts,value
s1,2022-09-01T00:00:00Z,1.5
s1,2022-09-01T00:05:00+00:00,-2
s2,2022-09-01T02:00:00+02:00,3e2
"""


def write(tmp_path: Path, text: str, name: str = "readings.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_readings_good_file(tmp_path):
    readings = load.read_readings(write(tmp_path, GOOD_CSV))

    assert len(readings) == 3
    assert readings.values == [1.5, -2.0, 300.0]
    assert readings.lines == [2, 3, 4]
    assert readings.sensors == {"s1", "s2"}


def test_read_readings_gzip_and_column_order(tmp_path):
    path = tmp_path / "readings.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("value,sensor_id,ts\n4.5,s9,2022-09-01T00:00:00Z\n")

    readings = load.read_readings(path)

    assert readings.sensor_ids == ["s9"]
    assert readings.values == [4.5]


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        (",2022-09-01T00:00:00Z,1", "empty sensor_id"),
        (" s1,2022-09-01T00:00:00Z,1", "leading or trailing spaces"),
        ("s1,2022-09-01T00:00:00,1", "no time zone"),
        ("s1,2022-09-01,1", "no time zone"),
        ("s1,yesterday,1", "invalid ts"),
        ("s1,2022-09-01T00:00:00Z,NaN", "invalid value"),
        ("s1,2022-09-01T00:00:00Z,inf", "invalid value"),
        ("s1,2022-09-01T00:00:00Z,1e400", "out of range"),
        ("s1,2022-09-01T00:00:00Z,", "empty value"),
        ("s1,2022-09-01T00:00:00Z,1_000", "invalid value"),
        ("s1,2022-09-01T00:00:00Z", "expected 3 fields"),
        ("s1,2022-09-01T00:00:00Z,1,extra", "expected 3 fields"),
        ("x" * 257 + ",2022-09-01T00:00:00Z,1", "over the limit of 256"),
    ],
)
def test_read_readings_rejects_bad_row(tmp_path, row, fragment):
    path = write(tmp_path, GOOD_CSV + row + "\n")

    with pytest.raises(load.ReadingsError) as caught:
        load.read_readings(path)

    assert caught.value.problem_count == 1
    assert caught.value.problems[0].startswith("line 5: ")
    assert fragment in caught.value.problems[0]


def test_read_readings_duplicate_instant_in_other_zone(tmp_path):
    path = write(tmp_path, GOOD_CSV + "s2,2022-09-01T00:00:00Z,9\n")

    with pytest.raises(load.ReadingsError) as caught:
        load.read_readings(path)

    assert "line 5: duplicate reading of 's2'" in caught.value.problems[0]
    assert "first on line 4" in caught.value.problems[0]


def test_read_readings_lists_at_most_20_problems(tmp_path):
    rows = "".join(f"s1,not-a-time-{index},1\n" for index in range(30))
    path = write(tmp_path, "sensor_id,ts,value\n" + rows)

    with pytest.raises(load.ReadingsError) as caught:
        load.read_readings(path)

    error = caught.value
    assert error.problem_count == 30
    assert len(error.problems) == load.MAX_PROBLEMS_SHOWN
    assert error.problems[0].startswith("line 2: ")
    assert "... and 10 more" in str(error)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "empty"), ("sensor,ts,value\n", "missing sensor_id"), ("sensor_id,ts,value,unit\n", "unknown 'unit'")],
)
def test_read_readings_bad_header(tmp_path, text, fragment):
    with pytest.raises(load.ReadingsError, match=fragment):
        load.read_readings(write(tmp_path, text))


def test_read_readings_missing_file(tmp_path):
    with pytest.raises(load.ReadingsError, match="not found"):
        load.read_readings(tmp_path / "nope.csv")


def test_read_readings_not_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"sensor_id,ts,value\ns\xe9,2022-09-01T00:00:00Z,1\n")

    with pytest.raises(load.ReadingsError, match="UTF-8"):
        load.read_readings(path)


def test_read_readings_truncated_gzip(tmp_path):
    data = gzip.compress((GOOD_CSV * 200).encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(load.ReadingsError, match="gzip"):
        load.read_readings(path)


def test_bundled_readings_are_valid():
    readings = load.read_readings(load.BUNDLED_READINGS)

    assert len(readings) > 100_000
    assert "vlinder02.temp" in readings.sensors


@pytest.mark.parametrize("name", ["readings", "_x", "a1_b"])
def test_table_name_accepted(name):
    assert load.check_table_name(name) == name


@pytest.mark.parametrize("name", ["Readings", "1x", "a-b", "x;drop table jobs", "", "a" * 64, 'a"b'])
def test_table_name_rejected(name):
    with pytest.raises(load.ReadingsError, match="invalid table name"):
        load.check_table_name(name)


def test_data_load_bad_table_name_exits_4(runner, tmp_path):
    result = runner.invoke(app, ["data", "load", str(write(tmp_path, GOOD_CSV)), "--table", "Bad-Name"])

    assert result.exit_code == 4
    assert "invalid table name" in result.stderr


def test_data_load_bad_file_exits_4_without_database(runner, tmp_path):
    result = runner.invoke(app, ["data", "load", str(write(tmp_path, GOOD_CSV + "s1,x,1\n"))])

    assert result.exit_code == 4
    assert "line 5" in result.stderr
    assert "nothing was loaded" in result.stderr


def test_make_job_covers_every_field():
    assert {field.name for field in dataclasses.fields(Job)} <= set(dataclasses.asdict(make_job()))


def test_database_url_flag_password_hidden(runner):
    result = runner.invoke(app, ["--database-url", "postgresql://postgres:flagsecret@127.0.0.1:1/x", "list"])

    assert result.exit_code == 5
    assert "flagsecret" not in result.output


def test_follow_retries_unreachable_database(monkeypatch, capsys):
    import sqlalchemy as sa

    from cli import watch

    finished = make_job(status="succeeded", finished_at=NOW)
    calls = []

    def flaky_get_job(engine, job_id):
        calls.append(job_id)
        if len(calls) == 1:
            raise sa.exc.OperationalError("SELECT", {}, Exception("server closed the connection"))
        return finished

    monkeypatch.setattr(watch.store, "get_job", flaky_get_job)
    monkeypatch.setattr(watch.ChangeListener, "connect", lambda self: False)

    jobs = watch.follow(None, "postgresql://u@127.0.0.1:1/x", [7], PlainRenderer(), poll_seconds=0.01)

    assert jobs[7].status == "succeeded"
    assert len(calls) == 2
    assert "retrying" in capsys.readouterr().err
