"""Service commands: supervisor, supervisors, db, prune, config, analyses."""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path
from typing import Annotated, Any

import typer
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from rich.table import Table

from analyses import registry
from cli import output
from cli.common import (
    GlobalOptions,
    load_settings,
    open_engine,
    redact_url,
    setting_option,
)
from supervisor import config as config_module
from supervisor import db, embedded, logs, runs, sweeps
from supervisor.errors import ConfigError, SchemaOutOfDate
from supervisor.store import SWEEP_BATCH

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400
# Column of parameter names in the text output of `analyses`.
PARAM_NAME_WIDTH = 18

# supervisor run ------------------------------------------------------------

supervisor_app = typer.Typer(help="Run the supervisor that claims and runs jobs.", no_args_is_help=True,
                             epilog="Example:\n\n  analysisctl supervisor run --workers 2")

SUPERVISOR_RUN_EPILOG = """\
Examples:

  analysisctl supervisor run

  analysisctl supervisor run --workers 2 --lease-seconds 60

  ANALYSIS_WORKERS=4 analysisctl supervisor run

Runs in the foreground until SIGTERM or SIGINT, then gives running jobs
the shutdown grace period to stop and puts the rest back in the queue.
Logs go to stderr: text on a terminal, JSON lines otherwise.

Exit codes:
  0  stopped by SIGTERM or SIGINT after re-queueing unfinished jobs
  2  invalid configuration
  4  a second SIGTERM or SIGINT forced an immediate exit
  5  database unavailable, after 5 attempts over about 15 seconds
  6  database schema out of date, after the same attempts
"""


@supervisor_app.command("run", epilog=SUPERVISOR_RUN_EPILOG)
def supervisor_run(
    ctx: typer.Context,
    workers: Annotated[int | None, setting_option("workers", "--workers", min=1)] = None,
    lease_seconds: Annotated[float | None, setting_option("lease_seconds", "--lease-seconds", min=0)] = None,
    heartbeat_seconds: Annotated[float | None, setting_option(
        "heartbeat_seconds", "--heartbeat-seconds", min=0, extra="At most half of --lease-seconds")] = None,
    poll_seconds: Annotated[float | None, setting_option("poll_seconds", "--poll-seconds", min=0)] = None,
    cancel_grace_seconds: Annotated[float | None, setting_option(
        "cancel_grace_seconds", "--cancel-grace-seconds", min=0)] = None,
    shutdown_grace_seconds: Annotated[float | None, setting_option(
        "shutdown_grace_seconds", "--shutdown-grace-seconds", min=0)] = None,
    progress_interval_seconds: Annotated[float | None, setting_option(
        "progress_interval_seconds", "--progress-interval-seconds", min=0)] = None,
    worker_start_timeout_seconds: Annotated[float | None, setting_option(
        "worker_start_timeout_seconds", "--worker-start-timeout-seconds", min=0)] = None,
    max_jobs_per_worker: Annotated[int | None, setting_option(
        "max_jobs_per_worker", "--max-jobs-per-worker", min=1)] = None,
    retry_base_seconds: Annotated[float | None, setting_option(
        "retry_base_seconds", "--retry-base-seconds", min=0)] = None,
    retry_max_seconds: Annotated[float | None, setting_option(
        "retry_max_seconds", "--retry-max-seconds", min=0)] = None,
    results_dir: Annotated[Path | None, setting_option("results_dir", "--results-dir", file_okay=False)] = None,
) -> None:
    """Run a supervisor in the foreground: claim queued jobs and run them in worker processes."""
    try:
        settings = load_settings(
            ctx, workers=workers, lease_seconds=lease_seconds, heartbeat_seconds=heartbeat_seconds,
            poll_seconds=poll_seconds, cancel_grace_seconds=cancel_grace_seconds,
            shutdown_grace_seconds=shutdown_grace_seconds, progress_interval_seconds=progress_interval_seconds,
            worker_start_timeout_seconds=worker_start_timeout_seconds, max_jobs_per_worker=max_jobs_per_worker,
            retry_base_seconds=retry_base_seconds, retry_max_seconds=retry_max_seconds, results_dir=results_dir,
        )
    except ConfigError as error:
        # Logged, not printed, so that a service's log file contains JSON lines only.
        logs.configure()
        logger.critical("supervisor cannot start",
                        extra={"event": "supervisor_start_failed", "error": error.message,
                               "exit_code": error.exit_code})
        raise typer.Exit(error.exit_code) from None
    # Imported here so that every other command works in an installation
    # whose supervisor module cannot be imported.
    try:
        from supervisor.loop import run_supervisor
    except ModuleNotFoundError as error:
        if error.name != "supervisor.loop":
            raise
        typer.echo("error: this installation has no supervisor (supervisor.loop is missing); "
                   "reinstall analysis-jobs", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(run_supervisor(settings))


# supervisors --------------------------------------------------------------

SUPERVISORS_EPILOG = """\
Examples:

  analysisctl supervisors

  analysisctl supervisors --all --json

A supervisor is stale when its heartbeat is older than the lease
(--lease-seconds of `supervisor run`): it stopped without a clean shutdown,
is stuck, or cannot reach the database.
"""


def supervisors(
    ctx: typer.Context,
    include_stopped: Annotated[bool, typer.Option("--all", help="Include supervisors that have stopped.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print strict JSON instead of text.")] = False,
) -> None:
    """List supervisors with their heartbeat age, slots, running jobs and throttle state."""
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings)
    rows = runs.list_supervisors(engine, include_stopped=include_stopped)
    for row in rows:
        row["state"] = supervisor_state(row, settings.lease_seconds)
    if json_output:
        output.print_json([
            {key: row.get(key) for key in ("id", "host", "pid", "version", "started_at", "heartbeat_at",
                                           "heartbeat_age_seconds", "stopped_at", "slots", "running_jobs",
                                           "throttle", "state")}
            for row in rows
        ])
        return
    if not rows:
        typer.echo("no supervisor is running; start one with `analysisctl supervisor run`"
                   if not include_stopped else "no supervisor has run against this database")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "HOST", "PID", "STATE", "STARTED", "HEARTBEAT AGE", "SLOTS", "RUNNING", "THROTTLE"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("PID", "SLOTS", "RUNNING") else "left")
    for row in rows:
        throttle = row.get("throttle") or {}
        throttle_text = throttle_summary(throttle)
        table.add_row(str(row["id"])[:8], row["host"], str(row["pid"]), row["state"],
                      output.format_time(row["started_at"]), output.format_duration(row["heartbeat_age_seconds"]),
                      str(row["slots"]), str(row["running_jobs"]), throttle_text)
    output.console().print(table)


def throttle_summary(throttle: dict[str, Any]) -> str:
    """Return e.g. "throttled: cpu (others 93.5% CPU, memory normal)" from a supervisors row's throttle."""
    text = throttle.get("state", "-")
    if throttle.get("reason"):
        text += f": {throttle['reason']}"
    readings = throttle.get("readings") or {}
    if "other_cpu_percent" in readings:
        text += f" (others {readings['other_cpu_percent']}% CPU, memory {readings.get('memory_level', '?')})"
    return text


def supervisor_state(row: dict[str, Any], lease_seconds: float) -> str:
    """Return "stopped", "stale" (heartbeat older than the lease) or "alive"."""
    if row.get("stopped_at") is not None:
        return "stopped"
    age = output.finite(row.get("heartbeat_age_seconds"))
    return "stale" if age is None or age > lease_seconds else "alive"


# db ------------------------------------------------------------------------

DB_EPILOG = """\
Examples:

  analysisctl db upgrade

  analysisctl db check

  psql "$(analysisctl db url)"
"""

db_app = typer.Typer(help="Create, upgrade and locate the database.", no_args_is_help=True, epilog=DB_EPILOG)


@db_app.command("upgrade", epilog="Example:\n\n  analysisctl db upgrade\n\nRunning it at head changes nothing.")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the job tables to the revision this version needs."""
    settings = load_settings(ctx)
    url = db.resolve_url(settings)
    engine = db.create_engine(url, settings)
    ctx.call_on_close(engine.dispose)
    before = db.current_revision(engine)
    head = db.head_revision()
    if before is not None and not known_revision(before):
        raise SchemaOutOfDate(
            f"the database is at revision {before}, which this version does not know "
            "(a newer version migrated it); upgrade analysis-jobs instead"
        )
    where = redact_url(db.libpq_url(url))
    if before == head:
        typer.echo(f"the database at {where} is already at head revision {head}")
        return
    db.upgrade(url)
    after = db.current_revision(engine)
    typer.echo(f"upgraded the database at {where} from revision {before or 'none (empty)'} to {after}")


def known_revision(revision: str) -> bool:
    """Return whether this version's migrations contain ``revision``."""
    script = ScriptDirectory.from_config(db.alembic_config("postgresql+psycopg://"))
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


@db_app.command("check", epilog="Example:\n\n  analysisctl db check || analysisctl db upgrade")
def db_check(ctx: typer.Context) -> None:
    """Exit 0 when the schema is at head; else exit 6 and name the fix."""
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings, check=False)
    db.check_schema(engine)
    where = redact_url(db.libpq_url(engine.url.render_as_string(hide_password=False)))
    typer.echo(f"the database at {where} is at head revision {db.head_revision()}")


@db_app.command("url", epilog="Example:\n\n  psql \"$(analysisctl db url)\"\n\n"
                              "Starts the embedded server first when no URL is configured.")
def db_url(ctx: typer.Context) -> None:
    """Print the database URL in libpq form with the password hidden.

    The embedded server needs no password, so ``psql "$(analysisctl db url)"``
    connects to it. For a server that requires one, give psql the password
    yourself (PGPASSWORD or ~/.pgpass).
    """
    settings = load_settings(ctx)
    typer.echo(redact_url(db.libpq_url(db.resolve_url(settings))))


@db_app.command("stop", epilog="Example:\n\n  analysisctl db stop")
def db_stop(ctx: typer.Context) -> None:
    """Stop the embedded Postgres server; the next command that needs it starts it again."""
    settings = load_settings(ctx)
    if settings.effective_database_url:
        typer.echo("error: a database URL is configured (ANALYSIS_DATABASE_URL, ANALYSIS_DATABASE_URL_FILE or "
                   "their flags); only the embedded server can be stopped with this command", err=True)
        raise typer.Exit(2)
    pgdata = settings.effective_data_dir / "postgres"
    if embedded.stop(settings.effective_data_dir):
        typer.echo(f"stopped the embedded Postgres in {pgdata}")
    else:
        typer.echo(f"the embedded Postgres in {pgdata} is not running")


# prune -----------------------------------------------------------------------

PRUNE_EPILOG = """\
Examples:

  analysisctl prune

  analysisctl prune --older-than 7 --batch 500

First expires queued jobs past their start-by time and succeeded jobs past
their results expiry, then deletes jobs that finished more than DAYS days
ago, with their events and results. Result files are deleted only when
they lie inside the results folder.
"""


def prune(
    ctx: typer.Context,
    older_than: Annotated[float, typer.Option(
        "--older-than", metavar="DAYS", help="Delete jobs that finished more than this many days ago.",
        min=0)] = 30.0,
    batch: Annotated[int, typer.Option(
        "--batch", metavar="N", help="Jobs deleted per transaction.", min=1, max=100_000)] = 1000,
    results_dir: Annotated[Path | None, setting_option("results_dir", "--results-dir", file_okay=False)] = None,
) -> None:
    """Expire overdue jobs and delete old finished jobs and their result files."""
    settings = load_settings(ctx, results_dir=results_dir)
    engine = open_engine(ctx, settings)

    expired: dict[str, list] = {"start_by": [], "results": [], "files": []}
    while True:
        batch_expired = sweeps.expire_jobs(engine)
        for name in expired:
            expired[name] += batch_expired[name]
        if len(batch_expired["start_by"]) < SWEEP_BATCH and len(batch_expired["results"]) < SWEEP_BATCH:
            break
    pruned = sweeps.prune_jobs(engine, older_than_seconds=older_than * SECONDS_PER_DAY, batch_size=batch)
    removal = remove_result_files([*expired["files"], *pruned["files"]], settings.effective_results_dir)

    typer.echo(f"expired {len(expired['start_by'])} queued job(s) past their start-by time and "
               f"{len(expired['results'])} job(s) past their results expiry")
    typer.echo(f"deleted {pruned['deleted']} job(s) that finished more than {older_than:g} day(s) ago")
    typer.echo(f"deleted {removal['deleted']} result file(s); {removal['missing']} were already gone")
    for path in removal["outside"]:
        typer.echo(f"warning: left {path} in place: it is outside the results folder "
                   f"{settings.effective_results_dir}", err=True)
    for path, reason in removal["failed"]:
        typer.echo(f"warning: could not delete {path}: {reason}", err=True)


def remove_result_files(paths: list[str], results_dir: Path) -> dict[str, Any]:
    """Delete result files that lie inside ``results_dir``, then their emptied job folders."""
    root = results_dir.resolve()
    summary: dict[str, Any] = {"deleted": 0, "missing": 0, "outside": [], "failed": []}
    for raw in paths:
        path = Path(raw)
        # The directory entry and the file it points to must both be inside,
        # so neither "../" nor a symlink can send the deletion elsewhere.
        entry = path.parent.resolve() / path.name
        if not path.is_absolute() or not entry.is_relative_to(root) or not path.resolve().is_relative_to(root):
            summary["outside"].append(raw)
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            summary["missing"] += 1
            continue
        except OSError as error:
            summary["failed"].append((raw, error.strerror or str(error)))
            continue
        summary["deleted"] += 1
        _remove_empty_parents(path.parent, root)
    return summary


def _remove_empty_parents(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents while they are empty and below ``root``."""
    folder = folder.resolve()
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


# config ----------------------------------------------------------------------

config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True,
                         epilog="Example:\n\n  analysisctl config show --json")

CONFIG_SHOW_EPILOG = """\
Examples:

  analysisctl config show

  ANALYSIS_WORKERS=2 analysisctl config show --json

Sources, later winning: default, the TOML file (ANALYSIS_CONFIG, else
<data dir>/config.toml), ANALYSIS_* environment variables, then flags.
Passwords in the database URL are shown as ***, also for a URL read from
database_url_file.
"""


@config_app.command("show", epilog=CONFIG_SHOW_EPILOG)
def config_show(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print strict JSON instead of text.")] = False,
) -> None:
    """Show each setting's effective value and where it came from."""
    settings = load_settings(ctx)
    rows = config_rows(settings)
    config_file = _config_file(ctx, settings)
    if json_output:
        output.print_json({"config_file": config_file, "settings": rows})
        return
    typer.echo(f"config file: {config_file}{'' if Path(config_file).exists() else ' (not found)'}")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("SETTING", "VALUE", "SOURCE"):
        table.add_column(column, overflow="fold")
    for row in rows:
        value = "-" if row["value"] is None else str(row["value"])
        if row["effective"] is not None and row["value"] is None:
            value = f"{row['effective']} (computed)"
        table.add_row(row["name"], value, row["source"])
    output.console().print(table)
    typer.echo("Each setting NAME is also read from the environment variable ANALYSIS_NAME, such as "
               "ANALYSIS_WORKERS.")


def config_rows(settings: config_module.Config) -> list[dict[str, Any]]:
    """Return every setting's value, effective value, source and variable; URLs redacted."""
    if settings.database_url_from_file:
        database_url = redact_url(settings.database_url_from_file)
    else:
        database_url = f"embedded server in {settings.effective_data_dir / 'postgres'}"
    computed = {
        "data_dir": settings.effective_data_dir,
        "results_dir": settings.effective_results_dir,
        "workers": settings.effective_workers,
        "database_url": database_url,
    }
    rows = []
    for setting in config_module.SETTINGS:
        value = settings.values[setting.name]
        if setting.secret and value is not None:
            value = redact_url(str(value))
        rows.append({
            "name": setting.name,
            "value": output.json_safe(value),
            "effective": output.json_safe(computed.get(setting.name)) if value is None else output.json_safe(value),
            "source": settings.sources[setting.name],
            "env": config_module.env_name(setting.name),
            "help": setting.help,
        })
    return rows


def _config_file(ctx: typer.Context, settings: config_module.Config) -> str:
    options = ctx.find_object(GlobalOptions) or GlobalOptions()
    if options.config_file is not None:
        return str(options.config_file)
    if os.environ.get("ANALYSIS_CONFIG"):
        return os.environ["ANALYSIS_CONFIG"]
    data_dir = os.environ.get(config_module.env_name("data_dir"))
    return str((Path(data_dir) if data_dir else config_module.default_data_dir()) / "config.toml")


# analyses --------------------------------------------------------------------

ANALYSES_EPILOG = """\
Examples:

  analysisctl analyses

  analysisctl analyses --json | jq '.[].name'
"""


def analyses(
    json_output: Annotated[bool, typer.Option("--json", help="Print strict JSON instead of text.")] = False,
) -> None:
    """List the registered analyses and their parameters."""
    documents = [analysis_document(analysis) for analysis in registry.all_analyses()]
    if json_output:
        output.print_json(documents)
        return
    width = min(output.console().width, 100)
    for document in documents:
        policy = f"max attempts {document['max_attempts']}"
        if document["timeout_seconds"] is not None:
            policy += f", timeout {output.format_duration(document['timeout_seconds'])}"
        if document["deduplicate"]:
            policy += ", deduplicated by parameters"
        typer.echo(f"{document['name']}: {document['summary']}")
        typer.echo(f"  {policy}")
        for param in document["params"]:
            facts = [param["kind"]]
            if param["required"]:
                facts.append("required")
            elif param["default"] is not None:
                facts.append(f"default {output.dumps(param['default'], indent=None)}")
            limits = _limits(param)
            if limits:
                facts.append(limits)
            typer.echo(f"  {param['name']:<{PARAM_NAME_WIDTH}} {', '.join(facts)}")
            for line in textwrap.wrap(param["help"], width=max(40, width - PARAM_NAME_WIDTH - 3)):
                typer.echo(f"  {'':<{PARAM_NAME_WIDTH}} {line}")
        typer.echo("")


def analysis_document(analysis: registry.Analysis) -> dict[str, Any]:
    return output.json_safe({
        "name": analysis.name,
        "summary": analysis.summary,
        "deduplicate": analysis.deduplicate,
        "max_attempts": analysis.max_attempts,
        "timeout_seconds": analysis.timeout_seconds,
        "memory_limit_mib": analysis.memory_limit_mib,
        "start_within_seconds": analysis.start_within_seconds,
        "crash_budget": analysis.crash_budget,
        "results_ttl_seconds": analysis.results_ttl_seconds,
        "retry_codes": sorted(analysis.retry_codes),
        "params": [
            {"name": param.name, "kind": param.kind, "default": param.default, "required": param.required,
             "minimum": param.minimum, "maximum": param.maximum,
             "choices": list(param.choices) if param.choices is not None else None,
             "max_length": param.max_length, "help": param.help}
            for param in analysis.params
        ],
    })


def _limits(param: dict[str, Any]) -> str:
    parts = []
    if param["minimum"] is not None:
        parts.append(f">= {param['minimum']:g}")
    if param["maximum"] is not None:
        parts.append(f"<= {param['maximum']:g}")
    if param["choices"] is not None:
        parts.append("one of " + ", ".join(str(choice) for choice in param["choices"]))
    if param["max_length"] is not None:
        parts.append(f"at most {param['max_length']} {'items' if param['kind'] == 'string_list' else 'chars'}")
    return "; ".join(parts)


def register(app: typer.Typer) -> None:
    app.add_typer(supervisor_app, name="supervisor")
    app.command("supervisors", epilog=SUPERVISORS_EPILOG)(supervisors)
    app.add_typer(db_app, name="db")
    app.command("prune", epilog=PRUNE_EPILOG)(prune)
    app.add_typer(config_app, name="config")
    app.command("analyses", epilog=ANALYSES_EPILOG)(analyses)
