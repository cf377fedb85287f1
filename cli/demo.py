"""The ``demo`` command: the first-run path, from an empty machine to analysis results.

It resolves the database (the embedded server when none is configured),
migrates it, starts ``analysisctl supervisor run`` as a child process,
submits one job per registered analysis, shows their progress, prints each
summary and stops the supervisor with SIGTERM. The analyses read the bundled
readings (``source`` "bundled", their default) themselves, so nothing is
loaded into the database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.engine import Engine

from analyses import registry
from analyses.errors import InvalidParams
from cli import output
from cli.common import (
    EXIT_INTERRUPTED,
    EXIT_NOT_SUCCEEDED,
    GlobalOptions,
    current_user,
    load_settings,
    redact_url,
    setting_option,
)
from cli.watch import exit_unless, follow, make_renderer
from supervisor import config as config_module
from supervisor import db, runs, store
from supervisor.errors import InvalidRequest
from supervisor.transitions import Status

# Parameters of each analysis the demo submits, by analysis name. A
# registered analysis missing here runs with its defaults, and an entry whose
# analysis is not registered is skipped. The values suit the bundled data
# (analyses/data/vlinder_2022-09_slice.csv.gz, September 2022).
DEMO_PARAMS: dict[str, dict[str, Any]] = {
    "relationship-matrix": {},
    "related-sensors": {"target": "vlinder02.temp", "max_lag_minutes": 180},
    "spike-matching": {},
    "co-occurrence": {},
    "matrix-profile": {"target": "vlinder02.temp"},
}
# Submitted when noop is the only registered analysis, or when asked for.
NOOP_PARAMS: dict[str, Any] = {"steps": 20, "step_seconds": 0.1}

SUPERVISOR_START_TIMEOUT_SECONDS = 60.0
# Time the supervisor gets beyond its shutdown grace period to exit after
# SIGTERM, before it is killed.
SUPERVISOR_EXIT_MARGIN_SECONDS = 15.0
LOG_TAIL_LINES = 20

DEMO_EPILOG = """\
Examples:

  analysisctl demo

  analysisctl demo --only related-sensors --workers 2

  ANALYSIS_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres analysisctl demo

The supervisor's log goes to <data dir>/demo-supervisor.log. Exit code 0
only if every job succeeded. Ctrl-C cancels the demo's jobs and stops the
supervisor.
"""


def plan_jobs(only: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Return (analysis, parameters) pairs to submit, validated; raise ``InvalidRequest`` when one is invalid."""
    registered = {analysis.name: analysis for analysis in registry.all_analyses()}
    if only:
        unknown = [name for name in only if name not in registered]
        if unknown:
            raise InvalidRequest(
                f"unknown analysis {', '.join(unknown)} in --only (registered: {', '.join(sorted(registered))})",
                field="only",
            )
        names = list(dict.fromkeys(only))
    else:
        names = [name for name in registered if name != "noop"] or ["noop"]
    plan = []
    for name in names:
        params = NOOP_PARAMS if name == "noop" else DEMO_PARAMS.get(name, {})
        try:
            registered[name].validate_params(params)
        except InvalidParams as error:
            raise InvalidRequest(
                f"the demo's parameters for {name} are invalid: {error.message}; "
                f"fix DEMO_PARAMS in {Path(__file__).name}", field="params",
            ) from None
        plan.append((name, dict(params)))
    return plan


def demo(
    ctx: typer.Context,
    only: Annotated[list[str] | None, typer.Option(
        "--only", metavar="ANALYSIS", help="Run only this analysis; repeat for more. Default: all registered "
                                           "analyses except noop (noop when it is the only one).")] = None,
    workers: Annotated[int | None, setting_option("workers", "--workers", min=1)] = None,
) -> None:
    """Run every analysis once on the bundled sensor data, with a supervisor started for the purpose."""
    plan = plan_jobs(only)
    settings = load_settings(ctx, workers=workers)

    url = db.resolve_url(settings)
    where = redact_url(db.libpq_url(url))
    embedded = ""
    if not settings.effective_database_url:
        embedded = f" (embedded server in {settings.effective_data_dir / 'postgres'})"
    typer.echo(f"database: {where}{embedded}")
    engine = db.create_engine(url, settings)
    ctx.call_on_close(engine.dispose)
    before = db.current_revision(engine)
    db.upgrade(url)
    after = db.current_revision(engine)
    typer.echo(f"schema: at revision {after}" if before == after
               else f"schema: upgraded from {before or 'none (empty)'} to {after}")

    log_path = settings.effective_data_dir / "demo-supervisor.log"
    process = start_supervisor(ctx, url, workers, log_path)
    job_ids: list[int] = []
    previous_handlers = _interrupt_on_termination()
    try:
        wait_for_supervisor(engine, process, log_path)
        for name, params in plan:
            job = store.submit(engine, name, params, user=current_user(),
                               max_params_bytes=settings.max_params_bytes).job
            job_ids.append(job.id)
            typer.echo(f"submitted {name} as job {job.id}")
        finished = follow(engine, url, job_ids, make_renderer(), poll_seconds=settings.poll_seconds)
    except KeyboardInterrupt:
        _cancel_unfinished(engine, job_ids)
        typer.echo("interrupted: cancelled the demo's unfinished jobs", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        stop_supervisor(process, settings)
        for signal_number, handler in previous_handlers.items():
            signal.signal(signal_number, handler)

    for job_id in job_ids:
        _print_summary(engine, finished[job_id])
    exit_unless(finished)


def _interrupt_on_termination() -> dict[int, Any]:
    """Make SIGTERM and SIGHUP act like Ctrl-C, so the demo still stops its supervisor.

    The supervisor runs in a session of its own, so these signals no longer
    reach it directly. Returns the previous handlers.
    """

    def interrupt(signal_number, frame):
        raise KeyboardInterrupt

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, interrupt)
    return previous


def supervisor_command() -> list[str]:
    """Return the command that starts a supervisor with this interpreter's installation."""
    script = Path(sys.executable).parent / "analysisctl"
    if script.exists():
        return [str(script), "supervisor", "run"]
    return [sys.executable, "-m", "cli.main", "supervisor", "run"]


def start_supervisor(ctx: typer.Context, url: str, workers: int | None, log_path: Path) -> subprocess.Popen:
    """Start ``analysisctl supervisor run`` against ``url``, logging to ``log_path``."""
    environ = dict(os.environ)
    environ[config_module.env_name("database_url")] = url
    # The URL above replaces a URL file; the supervisor rejects both together.
    environ.pop(config_module.env_name("database_url_file"), None)
    options = ctx.find_object(GlobalOptions) or GlobalOptions()
    if options.overrides.get("data_dir") is not None:
        environ[config_module.env_name("data_dir")] = str(options.overrides["data_dir"])
    if options.config_file is not None:
        environ["ANALYSIS_CONFIG"] = str(options.config_file)
    command = supervisor_command()
    if workers is not None:
        command += ["--workers", str(workers)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        # A session of its own keeps the terminal's Ctrl-C away from the
        # supervisor: a second stop signal (the SIGTERM sent after it) would
        # make it exit at once and leave its jobs to lease recovery.
        process = subprocess.Popen(command, env=environ, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    typer.echo(f"supervisor: started pid {process.pid}, log in {log_path}")
    return process


def wait_for_supervisor(engine: Engine, process: subprocess.Popen, log_path: Path) -> None:
    """Wait until the child supervisor has registered its row; exit 1 if it stops or takes too long."""
    deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _fail_supervisor(f"the supervisor exited with code {process.returncode} during start-up", log_path)
        rows = runs.list_supervisors(engine)
        if any(row["pid"] == process.pid for row in rows):
            return
        time.sleep(0.2)
    _fail_supervisor(f"the supervisor did not register within {SUPERVISOR_START_TIMEOUT_SECONDS:g} s", log_path)


def _fail_supervisor(message: str, log_path: Path) -> None:
    typer.echo(f"error: {message}; the last lines of {log_path}:", err=True)
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        lines = []
    for line in lines:
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(EXIT_NOT_SUCCEEDED)


def stop_supervisor(process: subprocess.Popen, settings: config_module.Config) -> None:
    """Send SIGTERM and wait for the supervisor to exit; kill it if it outlives its grace period."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=settings.shutdown_grace_seconds + SUPERVISOR_EXIT_MARGIN_SECONDS)
        except subprocess.TimeoutExpired:
            typer.echo(f"warning: the supervisor (pid {process.pid}) did not exit after SIGTERM; killing it",
                       err=True)
            process.kill()
            process.wait()
    typer.echo(f"supervisor: stopped (exit code {process.returncode})")


def _cancel_unfinished(engine: Engine, job_ids: list[int]) -> None:
    by = current_user()
    for job_id in job_ids:
        store.request_cancel(engine, job_id, by=by)


def _print_summary(engine: Engine, job: store.Job) -> None:
    typer.echo("")
    typer.echo(output.outcome_line(job))
    if job.status != Status.SUCCEEDED:
        return
    for line in output.summary_lines(job.result):
        typer.echo(f"  {line}")
    entries = store.list_results(engine, job.id)
    files = sum(1 for entry in entries if entry["kind"] == "file")
    typer.echo(f"  ({len(entries)} result(s), {files} of them files; `analysisctl result {job.id}` shows all)")


def register(app: typer.Typer) -> None:
    app.command("demo", epilog=DEMO_EPILOG)(demo)
