"""The ``doctor`` command: checks the configuration, database, schema, supervisors and queue."""

from __future__ import annotations

import dataclasses
import socket
from typing import Annotated, Any

import psutil
import sqlalchemy as sa
import typer
from alembic.util import CommandError
from sqlalchemy.engine import Engine

from cli import output
from cli.admin import supervisor_state
from cli.common import EXIT_NOT_SUCCEEDED, load_settings, redact_url
from supervisor import config as config_module
from supervisor import db, runs
from supervisor.errors import ConfigError, DatabaseUnavailable, SchemaOutOfDate

OK, WARNING, PROBLEM = "ok", "warning", "problem"
# Job ids listed in one finding.
MAX_IDS_LISTED = 10

DOCTOR_EPILOG = """\
Examples:

  analysisctl doctor

  analysisctl doctor --json

Exit code 0 when every check passed or only warned, 1 when a check found a
problem. Each problem comes with its fix.
"""


@dataclasses.dataclass
class Finding:
    check: str
    level: str
    message: str
    fix: str | None = None


def doctor(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print strict JSON instead of text.")] = False,
) -> None:
    """Check the database, schema, supervisors and queue, and name the fix for each problem."""
    findings = run_checks(ctx)
    if json_output:
        output.print_json([dataclasses.asdict(finding) for finding in findings])
    else:
        for finding in findings:
            typer.echo(f"{finding.level.upper():<8} {finding.check}: {finding.message}")
            if finding.fix:
                typer.echo(f"{'':<8} fix: {finding.fix}")
    if any(finding.level == PROBLEM for finding in findings):
        raise typer.Exit(EXIT_NOT_SUCCEEDED)


def run_checks(ctx: typer.Context) -> list[Finding]:
    """Run the checks in order; a failed check stops those that depend on it."""
    try:
        settings = load_settings(ctx)
    except ConfigError as error:
        return [Finding("configuration", PROBLEM, error.message,
                        "fix the value named above; `analysisctl config show` lists every setting")]
    findings = [Finding("configuration", OK, "the settings are valid")]

    try:
        url = db.resolve_url(settings)
        engine = db.create_engine(url, settings)
    except (DatabaseUnavailable, ConfigError) as error:
        return findings + [Finding("database", PROBLEM, error.message, _database_fix(settings))]
    ctx.call_on_close(engine.dispose)
    where = redact_url(db.libpq_url(url))
    try:
        with engine.connect() as connection:
            version = connection.execute(sa.text("SHOW server_version")).scalar_one()
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
        return findings + [Finding("database", PROBLEM, f"cannot connect to {where}: {error.orig}",
                                   _database_fix(settings))]
    findings.append(Finding("database", OK, f"reachable at {where} (PostgreSQL {version})"))

    try:
        db.check_schema(engine)
    except SchemaOutOfDate as error:
        return findings + [Finding("schema", PROBLEM, error.message, "run `analysisctl db upgrade`")]
    except CommandError as error:
        return findings + [Finding("schema", PROBLEM, f"the schema revision is unknown to this version: {error}",
                                   "a newer version of analysis-jobs migrated this database; upgrade analysis-jobs")]
    findings.append(Finding("schema", OK, f"at head revision {db.head_revision()}"))

    live = _check_supervisors(engine, settings, findings)
    _check_expired_leases(engine, settings, live, findings)
    _check_queue(engine, live, findings)
    return findings


def _database_fix(settings: config_module.Config) -> str:
    if settings.effective_database_url:
        return ("check that the server is running and accepts connections, and that the database URL "
                "(ANALYSIS_DATABASE_URL or the file ANALYSIS_DATABASE_URL_FILE names; see `analysisctl config show`) "
                "names the right host, port, user and database")
    return (f"the embedded server in {settings.effective_data_dir / 'postgres'} did not start; read its log "
            "there, or set ANALYSIS_DATABASE_URL to use another server")


def _check_supervisors(engine: Engine, settings: config_module.Config, findings: list[Finding]) -> int:
    """Add a finding per supervisor that is not alive; return how many are alive."""
    rows = runs.list_supervisors(engine)
    live = [row for row in rows if supervisor_state(row, settings.lease_seconds) == "alive"]
    for row in rows:
        if supervisor_state(row, settings.lease_seconds) != "stale":
            continue
        age = output.format_duration(output.finite(row["heartbeat_age_seconds"]))
        name = f"supervisor {str(row['id'])[:8]} on {row['host']} (pid {row['pid']})"
        if row["host"] == socket.gethostname() and not psutil.pid_exists(row["pid"]):
            findings.append(Finding(
                "supervisors", WARNING,
                f"{name} ended without a clean shutdown {age} ago; its jobs are recovered once their "
                "leases expire",
            ))
        else:
            findings.append(Finding(
                "supervisors", PROBLEM,
                f"{name} has not renewed its heartbeat for {age}, longer than the {settings.lease_seconds:g} s "
                "lease: it is stuck or cannot reach the database",
                f"read its log; if it does not recover, stop it (SIGTERM to pid {row['pid']} on {row['host']}) "
                "and start a new one with `analysisctl supervisor run`",
            ))
    if live:
        slots = sum(row["slots"] for row in live)
        findings.append(Finding("supervisors", OK, f"{len(live)} alive with {slots} worker slot(s)"))
    else:
        findings.append(Finding("supervisors", WARNING, "no supervisor is running, so no job will start",
                                "start one with `analysisctl supervisor run`"))
    return len(live)


def _check_expired_leases(engine: Engine, settings: config_module.Config, live: int,
                          findings: list[Finding]) -> None:
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT id, EXTRACT(EPOCH FROM now() - lease_expires_at) AS overdue FROM jobs "
            "WHERE status = 'running' AND lease_expires_at < now() ORDER BY lease_expires_at"
        )).all()
    if not rows:
        findings.append(Finding("leases", OK, "no running job has an expired lease"))
        return
    ids = _ids([row.id for row in rows])
    overdue = max(float(row.overdue) for row in rows)
    message = (f"{len(rows)} running job(s) have an expired lease (ids {ids}; the oldest for "
               f"{output.format_duration(overdue)}): their supervisor stopped renewing them")
    if live and overdue <= settings.lease_seconds:
        findings.append(Finding("leases", WARNING, message + "; a live supervisor re-queues them at its next sweep"))
    elif live:
        findings.append(Finding("leases", PROBLEM, message + "; the live supervisors have not recovered them",
                                "read the supervisors' logs for sweep errors, or restart them"))
    else:
        findings.append(Finding("leases", PROBLEM, message,
                                "start a supervisor (`analysisctl supervisor run`); it re-queues them"))


def _check_queue(engine: Engine, live: int, findings: list[Finding]) -> None:
    with engine.connect() as connection:
        queued = connection.execute(sa.text(
            "SELECT id FROM jobs WHERE status = 'queued' AND cancel_requested_at IS NULL ORDER BY id"
        )).scalars().all()
    if not queued:
        findings.append(Finding("queue", OK, "no job is waiting"))
    elif live:
        findings.append(Finding("queue", OK, f"{len(queued)} job(s) waiting for a free slot"))
    else:
        findings.append(Finding(
            "queue", PROBLEM, f"{len(queued)} job(s) are queued but no supervisor is running (ids {_ids(queued)})",
            "start one with `analysisctl supervisor run`",
        ))


def _ids(ids: list[Any]) -> str:
    listed = ", ".join(str(job_id) for job_id in ids[:MAX_IDS_LISTED])
    return listed + (f" and {len(ids) - MAX_IDS_LISTED} more" if len(ids) > MAX_IDS_LISTED else "")


def register(app: typer.Typer) -> None:
    app.command("doctor", epilog=DOCTOR_EPILOG)(doctor)
