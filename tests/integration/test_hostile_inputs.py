"""Hostile input against the store, the CLI and the result files, under each access role.

Every rejected request must exit with its documented code, say why, and
change nothing: each case compares row counts and checksums of every table
before and after. Accepted odd values (huge integers, control characters in
sensor ids) must come back exactly as they went in.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy
import pytest
from typer.testing import CliRunner

from cli.main import app
from supervisor import runs, store
from supervisor.job_context import JobContext
from supervisor.progress import ProgressRecords, SlotWriter
from supervisor.worker import ParentDeathSignal, run_task
from tests.integration.store_snapshot import snapshot

SUPERVISOR_ID = uuid.UUID(int=0x5EED)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (login, arguments, exit code, fragment of the output). An argument that is
# exactly "{alice}" or "{bob}" (login names), "{bob_job}" (a job of bob) or
# "{latin1}" (a file that is not UTF-8) is replaced at run time.
HOSTILE_CLI = [
    # Injection attempts in every text field.
    ("owner", ["submit", "noop'; DROP TABLE jobs; --"], 4, "unknown analysis"),
    ("alice", ["submit", "noop", "--key", "k'\n); DELETE FROM jobs; --"], 4, "invalid key"),
    ("alice", ["submit", "noop", "--user", "x' OR '1'='1"], 9, "not permitted to submit as user"),
    ("owner", ["submit", "noop", "--params", '{"steps": "1; DROP TABLE jobs"}'], 4, "must be an integer"),
    ("owner", ["submit", "relationship-matrix", "-p", "source=table", "-p", "table=readings; DROP TABLE jobs"], 4,
     "must be a table name"),
    ("owner", ["list", "--status", "queued' OR '1'='1"], 2, "is not one of"),
    ("owner", ["list", "--type", "noop' OR '1'='1"], 0, "no jobs match"),
    ("owner", ["list", "--user", "x' OR 1=1; DELETE FROM jobs; --"], 0, "no jobs match"),
    ("alice", ["list", "--user", "{bob}"], 0, "no jobs match"),
    ("owner", ["status", "1 OR 1=1"], 2, "valid integer"),
    ("owner", ["events", "1; DELETE FROM job_events"], 2, "valid integer"),
    # Access: other users' jobs and other users' names.
    ("alice", ["status", "{bob_job}"], 3, "not found"),
    ("alice", ["cancel", "{bob_job}"], 3, "not found"),
    ("alice", ["result", "{bob_job}"], 3, "not found"),
    ("bob", ["submit", "noop", "--user", "{alice}"], 9, "analysis_operator"),
    ("alice", ["prune", "--older-than", "0"], 9, "not permitted"),
    ("alice", ["limits", "set", "--user", "{alice}", "100"], 9, "not permitted"),
    ("supervisor", ["submit", "noop"], 9, "permission denied for table jobs"),
    # Odd Unicode: NUL, lone surrogates (undecodable bytes), RTL overrides, zero-width characters.
    ("owner", ["submit", "noop", "-p", 'result="a\\u0000b"'], 4, "NUL character"),
    ("owner", ["submit", "noop", "-p", 'result={"\\u0000": 1}'], 4, "NUL character"),
    ("owner", ["submit", "noop", "-p", 'result="\\ud800"'], 4, "lone surrogate"),
    ("owner", ["submit", "noop", "--user", "bob\udcff"], 4, "invalid user"),
    ("owner", ["submit", "noop", "--user", "alice\u202e"], 4, "invalid user"),
    ("owner", ["submit", "noop", "--user", "ali\u200bce"], 4, "invalid user"),
    ("owner", ["submit", "noop", "--key", "key\u2066isolated"], 4, "invalid key"),
    ("owner", ["submit", "noop", "--params", '{"ste\\u202eps": 1}'], 4, "unknown parameter"),
    ("owner", ["submit", "noop", "-p", "run_log=/tmp/log\udcff"], 4, "lone surrogate"),
    ("owner", ["submit", "noop", "--params-file", "{latin1}"], 4, "utf-8"),
    # Numbers: NaN and infinities, out of range, too large to keep.
    ("owner", ["submit", "noop", "-p", "steps=NaN"], 4, "NaN is not valid JSON"),
    ("owner", ["submit", "noop", "--params", '{"step_seconds": Infinity}'], 4, "Infinity is not valid JSON"),
    ("owner", ["submit", "noop", "--params", '{"result": [1, -Infinity]}'], 4, "-Infinity is not valid JSON"),
    ("owner", ["submit", "noop", "-p", "step_seconds=1e400"], 4, "1e400 is out of range"),
    ("owner", ["submit", "noop", "-p", "steps=99999999999999999999999"], 4, "must be <= 10000000"),
    ("owner", ["submit", "noop", "-p", "steps=-1"], 4, "must be >= 0"),
    ("owner", ["submit", "noop", "-p", "result=" + "9" * 5000], 4, "4300 digits"),
    ("owner", ["submit", "noop", "--priority", "1001"], 4, "invalid priority"),
    ("owner", ["submit", "noop", "--timeout", "nan"], 4, "invalid timeout_seconds"),
    ("owner", ["submit", "noop", "--memory-limit", "0"], 4, "invalid memory_limit_mib"),
    # Size, nesting, list lengths, string lengths.
    ("owner", ["submit", "noop", "--params", json.dumps({"result": "x" * 300_000})], 4,
     "over the limit of 262144 bytes"),
    ("owner", ["submit", "noop", "--params", f'{{"result": {nested(40)}}}'], 4, "nested deeper than 32 levels"),
    ("owner", ["submit", "noop", "-p", f"result={nested(5000)}"], 4, "nested too deeply"),
    ("owner", ["submit", "relationship-matrix", "--params", json.dumps({"sensors": [f"s{i}" for i in range(1001)]})],
     4, "must have at most 1000 items"),
    ("owner", ["submit", "relationship-matrix", "--params", json.dumps({"sensors": ["a", "b" * 257]})], 4,
     "must be at most 256 characters long (it has 257)"),
    ("owner", ["submit", "related-sensors", "-p", "target=" + "t" * 300], 4, "(it has 300)"),
    ("owner", ["submit", "noop", "--key", "k" * 201], 4, "1 to 200 printable characters (it has 201)"),
    ("owner", ["submit", "noop", "--user", "u" * 101], 4, "1 to 100 printable characters (it has 101)"),
    ("owner", ["submit", "relationship-matrix", "-p", "start=2000-01-01T00:00:00Z", "-p", "end=2022-01-01T00:00:00Z",
               "-p", "resample_seconds=1"], 4, "raise resample_seconds to at least 35"),
    # Paths: relative, traversing, or pasted into a table name.
    ("owner", ["submit", "relationship-matrix", "-p", "source=csv", "-p", "csv_path=../../etc/passwd"], 4,
     "must be an absolute path"),
    ("owner", ["submit", "relationship-matrix", "-p", "source=table", "-p", "table=../readings"], 4,
     "must be a table name"),
    ("owner", ["submit", "noop", "--params-file", "../../../../../../etc/shadow-missing"], 4, "not found"),
]


@pytest.fixture
def seeded(engine, logins, tmp_path) -> dict[str, str]:
    """Fill the store with jobs of each user, events and a result; return the placeholders of ``HOSTILE_CLI``."""
    finished = store.submit(logins["bob"].engine, "noop", {"steps": 2}).job
    [running] = runs.claim_jobs(engine, SUPERVISOR_ID, 1, lease_seconds=60)
    store.submit(logins["alice"].engine, "noop", {"steps": 1}, key="nightly")
    runs.succeed_run(engine, running.id, running.attempt_token, {"steps": 2},
                     [{"name": "table", "kind": "inline", "value": [1, 2, 3]}])
    cancelled = store.submit(logins["operator"].engine, "noop", {}, user=logins["alice"].name).job
    store.request_cancel(logins["operator"].engine, cancelled.id)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"result": "caf\xe9"}')
    return {"{alice}": logins["alice"].name, "{bob}": logins["bob"].name, "{bob_job}": str(finished.id),
            "{latin1}": str(latin1)}


@pytest.mark.parametrize(("login", "args", "exit_code", "fragment"), HOSTILE_CLI,
                         ids=[f"{number:02d}-{row[0]}-{row[1][0]}" for number, row in enumerate(HOSTILE_CLI)])
def test_hostile_cli_input_changes_nothing(engine, logins, database_url, seeded, tmp_path, login, args, exit_code,
                                           fragment):
    url = database_url if login == "owner" else logins[login].url
    runner = CliRunner(env={"ANALYSIS_DATABASE_URL": url, "ANALYSIS_DATA_DIR": str(tmp_path / "data"),
                            "ANALYSIS_CONFIG": None, "COLUMNS": "400"})
    arguments = [seeded.get(argument, argument) for argument in args]
    before = snapshot(engine)

    result = runner.invoke(app, arguments)

    assert result.exit_code == exit_code, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert snapshot(engine) == before


def test_hostile_table_has_enough_cases():
    assert len(HOSTILE_CLI) >= 30


# JSON values that must come back exactly --------------------------------------------------

BIG_INTEGERS = [2**63, 2**64 + 1, -(2**70) - 3, 10**300 + 7, int("9" * 4300)]
FLOATS = [0.1, 1e-300, 1.7976931348623157e308, -2.5e-10, 123456.789, 5e-324]


def same_numbers(stored: list, sent: list[float]) -> bool:
    """Return whether ``stored`` contains the numbers of ``sent``, as their shortest decimal text.

    jsonb keeps a number as the decimal of its JSON text and prints it without
    an exponent, so 1.7976931348623157e308 comes back as the 309-digit integer
    17976931348623157 followed by zeros: the same decimal, read as an int.
    """
    return [float(value) for value in stored] == sent


def test_large_integers_keep_their_value(engine, tmp_path):
    runner = CliRunner(env={"ANALYSIS_CONFIG": None})
    document = json.dumps({"result": {"integers": BIG_INTEGERS, "floats": FLOATS}})

    submitted = runner.invoke(app, ["--database-url", str(engine.url.render_as_string(hide_password=False)),
                                    "--data-dir", str(tmp_path), "submit", "noop", "--params", document, "--json"])

    assert submitted.exit_code == 0, submitted.output
    job = store.get_job(engine, json.loads(submitted.stdout)["id"])
    assert job.params["result"]["integers"] == BIG_INTEGERS
    assert same_numbers(job.params["result"]["floats"], FLOATS)
    with engine.connect() as connection:
        stored = connection.exec_driver_sql(
            "SELECT params->'result'->'integers'->>3 FROM jobs WHERE id = %(id)s", {"id": job.id}).scalar_one()
    assert stored == str(10**300 + 7)


def test_large_integers_survive_a_run(engine, tmp_path):
    job = store.submit(engine, "noop", {"steps": 0, "result": {"integers": BIG_INTEGERS, "floats": FLOATS}},
                       user="alice").job
    [claimed] = runs.claim_jobs(engine, SUPERVISOR_ID, 1, lease_seconds=60)
    outcome = run_in_process(claimed, tmp_path / "results")
    assert runs.succeed_run(engine, claimed.id, claimed.attempt_token, outcome["summary"], outcome["results"])
    runner = CliRunner(env={"ANALYSIS_CONFIG": None})

    shown = runner.invoke(app, ["--database-url", str(engine.url.render_as_string(hide_password=False)),
                                "--data-dir", str(tmp_path), "result", str(job.id), "--json"])

    assert shown.exit_code == 0, shown.output
    summary = strict_json(shown.stdout)["summary"]
    assert summary["integers"] == BIG_INTEGERS
    assert same_numbers(summary["floats"], FLOATS)


def test_control_characters_in_sensor_ids_stored_exactly(engine):
    sensors = ["a\x1bb", "\u202eevil", "zero\u200bwidth", "tab\tsep", "caf\u00e9", "\U0001F321 temp"]

    job = store.submit(engine, "relationship-matrix", {"sensors": sensors}, user="alice").job

    assert store.get_job(engine, job.id).params["sensors"] == sensors


def strict_json(text: str):
    def reject(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


# Result files stay in the results folder ----------------------------------------------------


def run_in_process(job: store.Job, results_dir: Path) -> dict:
    """Run a claimed job through the worker's run_task in this process, writing results under ``results_dir``."""
    records = ProgressRecords(1)
    task = {"job_id": job.id, "attempt": job.attempt, "attempt_token": str(job.attempt_token),
            "analysis": job.analysis, "params": job.params, "results_dir": str(results_dir), "database_url": None}
    return run_task(task, SlotWriter(records.array, 0), ParentDeathSignal(enabled=False), 0)


def files_under(folder: Path) -> set[Path]:
    return {Path(root, name) for root, _, names in os.walk(folder) for name in names}


@pytest.mark.parametrize("name", ["../escape", "/tmp/absolute", "a/b", "..", "", "x" * 65, "UPPER", "n\x00ul"])
def test_result_name_cannot_choose_path(tmp_path, name):
    records = ProgressRecords(1)
    task = {"job_id": 7, "attempt": 1, "attempt_token": "token", "analysis": "noop", "results_dir":
            str(tmp_path / "results")}
    context = JobContext(task, SlotWriter(records.array, 0), 0)

    with pytest.raises(ValueError, match="invalid result name"):
        context.save_array(name, numpy.zeros(3))

    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("analysis", ["relationship-matrix", "related-sensors", "matrix-profile"])
def test_path_like_params_cannot_place_files(engine, tmp_path, analysis):
    hostile = ["../../../escape", "/tmp/absolute-" + uuid.uuid4().hex, "..\\windows", "./dot"]
    lines = ["sensor_id,ts,value"]
    for index, sensor in enumerate(hostile):
        lines += [f"{sensor},2022-09-01T{hour:02d}:{minute:02d}:00Z,{(hour * 60 + minute) % (7 + index)}"
                  for hour in range(24) for minute in range(0, 60, 5)]
    csv = tmp_path / "input" / "readings.csv"
    csv.parent.mkdir()
    csv.write_text("\n".join(lines) + "\n")
    params = {"source": "csv", "csv_path": str(csv)}
    if analysis == "relationship-matrix":
        params["sensors"] = hostile
    elif analysis == "related-sensors":
        params["target"] = hostile[0]
    else:
        params.update(target=hostile[1], window=12)
    job = store.submit(engine, analysis, params, user="alice").job
    [claimed] = runs.claim_jobs(engine, SUPERVISOR_ID, 1, lease_seconds=60)
    results = tmp_path / "results"
    before = files_under(tmp_path)

    outcome = run_in_process(claimed, results)

    assert outcome["status"] == "succeeded", outcome["error"]
    written = files_under(tmp_path) - before
    assert written, "the analysis wrote no result file"
    folder = results / str(job.id) / str(claimed.attempt)
    assert {path.parent for path in written} == {folder}
    assert {entry["path"] for entry in outcome["results"] if entry["kind"] == "file"} == {str(p) for p in written}
    assert not Path(hostile[1]).exists()
    assert not (tmp_path.parent / "escape").exists()


def test_run_log_needs_fault_injection(engine, tmp_path, monkeypatch):
    monkeypatch.delenv("ANALYSIS_ALLOW_FAULT_INJECTION", raising=False)
    outside = tmp_path / "outside" / ".." / "written.log"
    store.submit(engine, "noop", {"steps": 1, "run_log": str(outside)}, user="alice")
    [claimed] = runs.claim_jobs(engine, SUPERVISOR_ID, 1, lease_seconds=60)

    outcome = run_in_process(claimed, tmp_path / "results")

    assert outcome["status"] == "failed"
    assert outcome["error"]["code"] == "invalid_params"
    assert files_under(tmp_path) == set()
