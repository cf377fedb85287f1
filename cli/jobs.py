"""Job commands: submit, status, watch, list, cancel, retry, events and result."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from rich.table import Table
from sqlalchemy.engine import Engine

from analyses import registry
from cli import output
from cli.common import EXIT_NOT_SUCCEEDED, acting_user, load_settings, open_engine, require_one_of
from cli.params import collect_params, parse_datetime
from cli.watch import exit_unless, follow_interruptible
from supervisor import access, store
from supervisor.errors import InvalidRequest
from supervisor.store import Job
from supervisor.transitions import Status

MAX_JOB_ID = 2**63 - 1
COPY_CHUNK_BYTES = 1024 * 1024


def complete_analysis(incomplete: str) -> list[str]:
    return [analysis.name for analysis in registry.all_analyses() if analysis.name.startswith(incomplete)]


JobId = Annotated[int, typer.Argument(metavar="JOB", help="Job id, as printed by submit and list.",
                                      min=1, max=MAX_JOB_ID, show_default=False)]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print strict JSON instead of text.")]


def _engine_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


# submit ------------------------------------------------------------------

SUBMIT_EPILOG = """\
Examples:

  analysisctl submit noop --param steps=100 --param step_seconds=0.05 --wait

  analysisctl submit related-sensors --param target=vlinder02.temp --param max_lag_minutes=180

  analysisctl submit noop --params '{"steps": 5}' --key nightly-noop --priority 10 --json

  analysisctl submit noop --params-file params.json --start-by 2026-01-31T18:00:00Z

A --param value is parsed as JSON when it is JSON (steps=100 is a number,
sensors='["a","b"]' a list) and is a string otherwise; quote it as JSON
(name='"100"') to force a string. NaN, Infinity and numbers beyond the
double range are rejected. `analysisctl analyses` lists every analysis
with its parameters.
"""


def submit(
    ctx: typer.Context,
    analysis: Annotated[str, typer.Argument(metavar="TYPE", help="Analysis name; `analysisctl analyses` lists them.",
                                            autocompletion=complete_analysis, show_default=False)],
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", metavar="NAME=VALUE",
        help="One parameter; repeat for more. Overrides the same name from --params or --params-file.")] = None,
    params: Annotated[str | None, typer.Option(
        "--params", metavar="JSON", help="All parameters as one JSON object.")] = None,
    params_file: Annotated[Path | None, typer.Option(
        "--params-file", metavar="FILE", help="Read the parameters from a JSON file containing one object.",
        dir_okay=False)] = None,
    key: Annotated[str | None, typer.Option(
        help="Deduplication key: while a queued or running job has this key, submit returns that job. "
             "Default: none, except for analyses that `analysisctl analyses` lists as deduplicated, "
             "whose key is derived from the parameters.")] = None,
    priority: Annotated[int, typer.Option(help="Priority from -1000 to 1000; higher runs first.")] = 0,
    user: Annotated[str | None, typer.Option(
        help="Submitting user, recorded on the job. Default: the database login, or the OS login name when "
             "connected as a superuser or the tables' owner. Naming another user needs the "
             "analysis_operator role.", show_default=False)] = None,
    max_attempts: Annotated[int | None, typer.Option(
        help="Runs allowed before the job fails, 1 to 100. Default: the analysis's setting.",
        show_default=False)] = None,
    timeout: Annotated[float | None, typer.Option(
        metavar="SECONDS", help="Time limit of one run, in seconds. Default: the analysis's setting.",
        show_default=False)] = None,
    start_by: Annotated[str | None, typer.Option(
        metavar="ISO8601", help="Expire the job if no run has started by this time (with a time zone).",
        show_default=False)] = None,
    memory_limit: Annotated[int | None, typer.Option(
        metavar="MIB", help="Stop a run whose processes grow by more than this many MiB, with code "
                            "memory_limit. Default: the analysis's setting.", show_default=False)] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the job to its end; exit 0 only if it succeeded.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Submit an analysis job and print its id."""
    values = collect_params(param, params, params_file)
    deadline = parse_datetime(start_by, option="--start-by") if start_by is not None else None
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings)

    result = store.submit(
        engine, analysis, values, user=acting_user(engine, user), key=key, priority=priority,
        max_attempts=max_attempts, start_by=deadline, timeout_seconds=timeout, memory_limit_mib=memory_limit,
        max_params_bytes=settings.max_params_bytes,
    )
    job = result.job
    if json_output:
        if wait:
            job = follow_interruptible(engine, _engine_url(engine), [job.id], poll_seconds=settings.poll_seconds,
                                       quiet=True)[job.id]
        output.print_json({"id": job.id, "status": job.status, "deduplicated": result.deduplicated})
        if wait:
            exit_unless({job.id: job})
        return

    typer.echo(job.id)
    if result.deduplicated:
        typer.echo(f"reused job {job.id} ({job.status}), which has the same key {job.job_key!r}; "
                   "no new job was submitted", err=True)
    if wait:
        exit_unless(follow_interruptible(engine, _engine_url(engine), [job.id], poll_seconds=settings.poll_seconds))


# status ------------------------------------------------------------------

STATUS_EPILOG = """\
Examples:

  analysisctl status 42

  analysisctl status 42 --json | jq .progress.percent

The estimate (eta) is unknown while the rate is 0 or the total is unknown.
"""


def queue_info(engine: Engine, job: Job, lease_seconds: float) -> dict[str, Any]:
    """Return a queued job's place in the queue: jobs ahead of it, retry wait and live supervisors."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text(
                "SELECT now() AS now, "
                "(SELECT count(*) FROM jobs WHERE status = 'queued' AND cancel_requested_at IS NULL "
                " AND (queue_key < :key OR (queue_key = :key AND id < :id))) AS jobs_ahead, "
                "(SELECT count(*) FROM jobs WHERE status = 'queued' AND cancel_requested_at IS NULL "
                " AND submitted_by = :user AND (queue_key < :key OR (queue_key = :key AND id < :id))) "
                " AS own_jobs_ahead, "
                "(SELECT count(*) FROM supervisors WHERE stopped_at IS NULL "
                " AND heartbeat_at > now() - make_interval(secs => :lease)) AS live_supervisors, "
                "row_security_active('jobs') AND NOT pg_has_role(:operator, 'USAGE') AS own_jobs_only"
            ),
            {"key": job.queue_key, "id": job.id, "user": job.submitted_by, "lease": lease_seconds,
             "operator": access.OPERATOR_ROLE},
        ).one()
    waiting = job.run_after > row.now
    return {
        # Queue order (priority with aging, then age). Free slots go first to
        # the user with the fewest running jobs, so only the user's own jobs
        # ahead are sure to start first. An analyst can read only its own
        # jobs, so for it the total is unknown (None).
        "jobs_ahead": None if row.own_jobs_only else row.jobs_ahead,
        "own_jobs_ahead": row.own_jobs_ahead,
        "live_supervisors": row.live_supervisors,
        "waiting_for_retry": waiting,
        "run_after": job.run_after if waiting else None,
        "retry_in_seconds": (job.run_after - row.now).total_seconds() if waiting else None,
        "queued_seconds": (row.now - job.created_at).total_seconds(),
    }


def status(ctx: typer.Context, job_id: JobId, json_output: JsonFlag = False) -> None:
    """Show a job's status, progress, rate, estimate, attempts, timings and error."""
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings)
    job = store.get_job(engine, job_id)
    queue = queue_info(engine, job, settings.lease_seconds) if job.status == Status.QUEUED else None
    if json_output:
        output.print_json({**output.job_document(job), "queue": queue})
        return
    _print_status(job, queue)


def _print_status(job: Job, queue: dict[str, Any] | None) -> None:
    view = output.progress_view(job)
    rows: list[tuple[str, str]] = []
    progress = output.format_counts(view)
    if view.phase:
        progress = f"{view.phase} {progress}"
    if view.message:
        progress += f"  {view.message}"
    rows.append(("progress", progress))
    if job.status == Status.RUNNING:
        rows.append(("rate", output.format_rate(view.rate)))
        rows.append(("eta", output.format_eta(view, job.status)))
    rows.append(("attempt", output.format_attempt(job)))
    rows.append(("submitted", f"{output.format_time(job.created_at)} by {job.submitted_by}, priority {job.priority}"))
    if job.job_key:
        rows.append(("key", job.job_key))
    if job.started_at is not None:
        rows.append(("started", output.format_time(job.started_at)))
    if job.finished_at is not None:
        ran = (job.finished_at - job.started_at).total_seconds() if job.started_at else None
        rows.append(("finished", f"{output.format_time(job.finished_at)} (ran {output.format_duration(ran)})"))
    if job.timeout_seconds is not None:
        rows.append(("timeout", output.format_duration(job.timeout_seconds)))
    if job.memory_limit_mib is not None:
        rows.append(("memory", f"at most {job.memory_limit_mib} MiB more than the worker's size at start"))
    if job.lease_owner is not None:
        rows.append(("lease", f"supervisor {job.lease_owner} until {output.format_time(job.lease_expires_at)}"))
    if queue is not None:
        if queue["jobs_ahead"] is None:
            line = (f"queued for {output.format_duration(queue['queued_seconds'])}, {queue['own_jobs_ahead']} "
                    "of this user's job(s) ahead in queue order (other users' jobs are not visible)")
        else:
            line = (f"queued for {output.format_duration(queue['queued_seconds'])}, {queue['jobs_ahead']} job(s) "
                    f"ahead in queue order, {queue['own_jobs_ahead']} of them this user's")
        if queue["waiting_for_retry"]:
            line += (f"; waiting for retry until {output.format_time(queue['run_after'])} "
                     f"(in {output.format_duration(queue['retry_in_seconds'])})")
        if not queue["live_supervisors"]:
            line += "; no supervisor is running (start one with `analysisctl supervisor run`)"
        rows.append(("queue", line))
    if job.start_by is not None:
        rows.append(("start by", output.format_time(job.start_by)))
    if job.cancel_requested_at is not None:
        rows.append(("cancel", f"requested {output.format_time(job.cancel_requested_at)} "
                               f"by {job.cancel_requested_by or '-'}"))
    if job.error:
        label = "last error" if job.status in (Status.QUEUED, Status.RUNNING) else "error"
        rows.append((label, output.format_error(job.error)))

    typer.echo(f"job {job.id} {output.printable(job.analysis)}: {job.status}")
    for label, value in rows:
        typer.echo(f"  {label:<10} {output.printable(value)}")


# watch -------------------------------------------------------------------

WATCH_EPILOG = """\
Examples:

  analysisctl watch 42

  analysisctl watch 42 > progress.log

Shows a progress bar on a terminal and one line per change otherwise.
Exit code 0 if the job succeeded, 1 if it failed, was cancelled or
expired, 130 after Ctrl-C (the job keeps running).
"""


def watch(ctx: typer.Context, job_id: JobId) -> None:
    """Follow a job until it ends, showing its progress."""
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings)
    store.get_job(engine, job_id)
    exit_unless(follow_interruptible(engine, _engine_url(engine), [job_id], poll_seconds=settings.poll_seconds))


# list --------------------------------------------------------------------

LIST_EPILOG = """\
Examples:

  analysisctl list

  analysisctl list --status running --user alice

  analysisctl list --type noop --limit 5 --json
"""


def list_jobs(
    ctx: typer.Context,
    status_filter: Annotated[Status | None, typer.Option(
        "--status", help="Only jobs with this status.", show_default=False)] = None,
    analysis: Annotated[str | None, typer.Option(
        "--type", metavar="TYPE", help="Only jobs of this analysis.", autocompletion=complete_analysis,
        show_default=False)] = None,
    user: Annotated[str | None, typer.Option(help="Only jobs submitted by this user.", show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="Maximum number of jobs shown, newest first.", min=1,
                                       max=10_000)] = 50,
    json_output: JsonFlag = False,
) -> None:
    """List jobs, newest first."""
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings)
    jobs = store.list_jobs(engine, status=status_filter.value if status_filter else None, analysis=analysis,
                           user=user, limit=limit)
    if json_output:
        output.print_json([output.job_document(job) for job in jobs])
        return
    if not jobs:
        typer.echo("no jobs match")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "ANALYSIS", "STATUS", "PROGRESS", "ATTEMPT", "USER", "SUBMITTED", "RAN"):
        table.add_column(column, justify="right" if column in ("ID", "ATTEMPT") else "left", no_wrap=True)
    for job in jobs:
        ran = None
        if job.started_at is not None:
            end = job.finished_at or dt.datetime.now(dt.timezone.utc)
            ran = (end - job.started_at).total_seconds()
        table.add_row(str(job.id), job.analysis, job.status, output.format_counts(output.progress_view(job)),
                      output.format_attempt(job), job.submitted_by, output.format_time(job.created_at),
                      output.format_duration(ran))
    output.console().print(table)


# cancel ------------------------------------------------------------------

CANCEL_EPILOG = """\
Examples:

  analysisctl cancel 42

  analysisctl cancel 42 --wait

A queued job is cancelled at once. A running job is asked to stop and ends
as cancelled once its process has stopped. With --wait the exit code is 0
only if the job ended cancelled.
"""


def cancel(
    ctx: typer.Context,
    job_id: JobId,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job has ended.")] = False,
) -> None:
    """Cancel a queued job, or ask a running job to stop."""
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings)
    result = store.request_cancel(engine, job_id, by=acting_user(engine, None))
    if result.outcome == "cancelled":
        # A job re-queued after a run (retry, shutdown) has run before.
        typer.echo(f"job {job_id} cancelled while queued"
                   + (" (before its first run)" if result.job.attempt == 0 and result.job.started_at is None else ""))
    elif result.outcome == "requested":
        typer.echo(f"job {job_id}: cancel requested; it stops at its next cancel check, "
                   f"or is terminated after the grace period ({settings.cancel_grace_seconds:g} s)")
    else:
        typer.echo(f"job {job_id} already finished: {result.job.status}")
    if wait:
        jobs = {job_id: result.job}
        if not result.job.is_terminal:
            jobs = follow_interruptible(engine, _engine_url(engine), [job_id], poll_seconds=settings.poll_seconds)
        exit_unless(jobs, Status.CANCELLED)


# retry -------------------------------------------------------------------

RETRY_EPILOG = """\
Examples:

  analysisctl retry 42

The new job has the same analysis, parameters, key, user, priority, attempt
limit, timeout and memory limit; it starts from attempt 0.
"""

RETRYABLE = (Status.FAILED, Status.CANCELLED, Status.EXPIRED)


def retry(ctx: typer.Context, job_id: JobId, json_output: JsonFlag = False) -> None:
    """Submit a failed, cancelled or expired job again, as a new job."""
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings)
    job = store.get_job(engine, job_id)
    if job.status not in RETRYABLE:
        hint = {
            Status.QUEUED: f"it has not run yet; `analysisctl watch {job_id}` follows it",
            Status.RUNNING: f"it is still running; `analysisctl cancel {job_id}` stops it",
            Status.SUCCEEDED: f"submit it again with `analysisctl submit {job.analysis}` to run it again",
        }[Status(job.status)]
        raise InvalidRequest(
            f"cannot retry job {job_id}: it is {job.status}, and only failed, cancelled or expired jobs "
            f"can be retried; {hint}",
            field="job",
        )
    result = store.submit(
        engine, job.analysis, job.params, user=job.submitted_by, key=job.job_key, priority=job.priority,
        max_attempts=job.max_attempts, timeout_seconds=job.timeout_seconds, memory_limit_mib=job.memory_limit_mib,
        max_params_bytes=settings.max_params_bytes,
    )
    if json_output:
        output.print_json({"id": result.job.id, "status": result.job.status,
                           "deduplicated": result.deduplicated, "retry_of": job_id})
        return
    if result.deduplicated:
        typer.echo(f"job {result.job.id} with the same key {job.job_key!r} is already {result.job.status}; "
                   "no new job was submitted", err=True)
    else:
        typer.echo(f"resubmitted job {job_id} as job {result.job.id}", err=True)
    typer.echo(result.job.id)


# events ------------------------------------------------------------------

EVENTS_EPILOG = """\
Examples:

  analysisctl events 42

  analysisctl events 42 --json
"""


def events(ctx: typer.Context, job_id: JobId, json_output: JsonFlag = False) -> None:
    """Show a job's history: submit, claims, progress, retries, cancel and finish."""
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings)
    history = store.list_events(engine, job_id)
    if json_output:
        output.print_json([
            {"job_id": event.job_id, "seq": event.seq, "kind": event.kind, "payload": event.payload,
             "created_at": event.created_at}
            for event in history
        ])
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("SEQ", justify="right", no_wrap=True)
    table.add_column("TIME", no_wrap=True)
    table.add_column("EVENT", no_wrap=True)
    table.add_column("DETAILS", overflow="fold")
    for event in history:
        details = output.dumps(event.payload, indent=None) if event.payload else ""
        table.add_row(str(event.seq), output.format_time(event.created_at), event.kind, details)
    output.console().print(table)


# result ------------------------------------------------------------------

RESULT_EPILOG = """\
Examples:

  analysisctl result 42

  analysisctl result 42 --json | jq .summary

  analysisctl result 42 --output ./job-42

--output copies each file result into the folder and checks its SHA-256
against the one recorded when the job wrote it. The exit code is 1 when
the job has no result or a copied file does not match.
"""


def result(
    ctx: typer.Context,
    job_id: JobId,
    json_output: JsonFlag = False,
    output_dir: Annotated[Path | None, typer.Option(
        "--output", metavar="DIR", help="Copy the file results into this folder (created if missing).",
        file_okay=False, show_default=False)] = None,
) -> None:
    """Show a finished job's summary and its results index."""
    require_one_of({"--json": json_output, "--output": output_dir})
    settings = load_settings(ctx)
    engine = open_engine(ctx, settings)
    job = store.get_job(engine, job_id)
    if job.status != Status.SUCCEEDED and job.result is None:
        reason = f"it is {job.status}"
        if job.error:
            reason += f" ({output.format_error(job.error)})"
        typer.echo(f"error: job {job_id} has no result: {reason}", err=True)
        raise typer.Exit(EXIT_NOT_SUCCEEDED)
    entries = store.list_results(engine, job_id)

    if json_output:
        output.print_json({"id": job.id, "analysis": job.analysis, "status": job.status,
                           "summary": job.result, "results": entries})
        return
    typer.echo(f"job {job.id} {job.analysis}: {job.status}")
    if job.status == Status.EXPIRED:
        typer.echo("the result files have expired; only the summary is kept")
    typer.echo("summary:")
    typer.echo(output.dumps(job.result))
    if entries:
        _print_results(entries)
    if output_dir is not None:
        _copy_results(entries, output_dir)


def _print_results(entries: list[dict[str, Any]]) -> None:
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    for column in ("NAME", "KIND", "FORMAT", "SIZE", "SHA-256", "LOCATION"):
        table.add_column(column, no_wrap=column != "LOCATION", overflow="fold")
    for entry in entries:
        if entry["kind"] == "file":
            table.add_row(entry["name"], "file", entry["format"] or "-", f"{entry['size_bytes']:,} B",
                          (entry["sha256"] or "")[:12], entry["path"])
        else:
            table.add_row(entry["name"], "inline", "json", "-", "-",
                          output.dumps(output.abbreviate(entry["value"]), indent=None))
    typer.echo("results:")
    output.console().print(table)


def _copy_results(entries: list[dict[str, Any]], directory: Path) -> None:
    """Copy the file results into ``directory``, checking each SHA-256; exit 1 on any mismatch."""
    files = [entry for entry in entries if entry["kind"] == "file"]
    if not files:
        typer.echo("no file results to copy")
        return
    directory.mkdir(parents=True, exist_ok=True)
    failures = 0
    for entry in files:
        source = Path(entry["path"])
        name = source.name if source.name not in ("", ".", "..") else f"{entry['name']}.{entry['format'] or 'bin'}"
        target = directory / name
        try:
            digest = _copy_with_digest(source, target)
        except FileNotFoundError:
            typer.echo(f"error: result file {source} of {entry['name']!r} is missing; it was deleted "
                       "or the results expired", err=True)
            failures += 1
            continue
        if digest != entry["sha256"]:
            target.unlink(missing_ok=True)
            typer.echo(f"error: result file {source} has SHA-256 {digest}, but the job recorded "
                       f"{entry['sha256']}; the file changed after the job wrote it, so it was not copied",
                       err=True)
            failures += 1
            continue
        typer.echo(f"copied {entry['name']} to {target} (SHA-256 verified)")
    if failures:
        raise typer.Exit(EXIT_NOT_SUCCEEDED)


def _copy_with_digest(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` through a temporary file and return the SHA-256 of the bytes copied."""
    digest = hashlib.sha256()
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(source, "rb") as reader, open(partial, "wb") as writer:
            while chunk := reader.read(COPY_CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return digest.hexdigest()


def register(app: typer.Typer) -> None:
    app.command("submit", epilog=SUBMIT_EPILOG)(submit)
    app.command("status", epilog=STATUS_EPILOG)(status)
    app.command("watch", epilog=WATCH_EPILOG)(watch)
    app.command("list", epilog=LIST_EPILOG)(list_jobs)
    app.command("cancel", epilog=CANCEL_EPILOG)(cancel)
    app.command("retry", epilog=RETRY_EPILOG)(retry)
    app.command("events", epilog=EVENTS_EPILOG)(events)
    app.command("result", epilog=RESULT_EPILOG)(result)

