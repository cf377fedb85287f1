"""Follow jobs until they end: LISTEN for change hints, re-read the rows, render.

The store sends a NOTIFY on ``store.CHANGES_CHANNEL`` with a payload
``{"kind", "job", ...}`` in the transaction of every status change and
progress write, except that a claim for idle workers sends it right after
its commit. Notifications are hints only: Postgres drops those sent while
a listener is disconnected, so the follower also re-reads the rows every
poll interval, and a lost notification costs at most one poll. LISTEN runs on
a dedicated autocommit psycopg connection, because a LISTEN inside an open
transaction would only take effect at commit.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence

import psycopg
import sqlalchemy as sa
import typer
from psycopg import sql
from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn
from rich.text import Text
from sqlalchemy.engine import Engine

from cli import output
from cli.common import EXIT_INTERRUPTED, EXIT_NOT_SUCCEEDED
from supervisor import store
from supervisor.db import libpq_url
from supervisor.store import Job
from supervisor.transitions import Status

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10
# How long following keeps re-reading while the database is unreachable,
# such as during a server restart, before it gives up with exit code 5.
READ_RETRY_SECONDS = 60.0


class ChangeListener:
    """A LISTEN connection on the changes channel that reconnects after failures.

    ``wait`` returns True as soon as a hint about one of the followed jobs
    arrives, and also right after a reconnect, because hints sent while the
    connection was down are lost and the caller must re-read the rows.
    """

    def __init__(self, url: str, channel: str = store.CHANGES_CHANNEL):
        self._conninfo = libpq_url(url)
        self._channel = channel
        self._connection: psycopg.Connection | None = None
        self._warned = False

    def connect(self) -> bool:
        """Open the connection and LISTEN; return False, leaving polling to the caller, on failure."""
        connection = None
        try:
            connection = psycopg.connect(
                self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name="analysisctl-watch",
            )
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except psycopg.Error as error:
            if connection is not None:
                connection.close()
            if not self._warned:
                typer.echo(f"warning: cannot LISTEN for changes ({error}); polling instead", err=True)
                self._warned = True
            return False
        self._connection = connection
        return True

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg.Error:
                pass
            self._connection = None

    def wait(self, job_ids: Iterable[int], timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a hint about ``job_ids``; return whether to re-read now."""
        followed = set(job_ids)
        if self._connection is None:
            if self.connect():
                return True
            time.sleep(timeout)
            return False
        deadline = time.monotonic() + timeout
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                if self._receive(followed, remaining):
                    # Take the hints already delivered too, so that a burst
                    # of progress writes costs one re-read.
                    self._receive(followed, 0.0)
                    return True
        except psycopg.OperationalError as error:
            logger.debug("LISTEN connection lost: %s", error)
            self.close()
        return False

    def _receive(self, followed: set[int], timeout: float) -> bool:
        """Read the notifications that arrive within ``timeout``; return whether one concerns ``followed``.

        The generator holds the connection's lock until it ends, so it is
        always run to its end (``stop_after`` ends it after the first batch).
        """
        assert self._connection is not None
        relevant = False
        for notification in self._connection.notifies(timeout=timeout, stop_after=1):
            relevant = relevant or _job_of(notification.payload) in followed
        return relevant


def _job_of(payload: str) -> int | None:
    try:
        document = json.loads(payload)
    except ValueError:
        return None
    job = document.get("job") if isinstance(document, dict) else None
    return job if isinstance(job, int) else None


# Renderers ---------------------------------------------------------------


class PlainRenderer:
    """Line renderer: one line per visible change of a job, for pipes and log files."""

    def __init__(self) -> None:
        self._last: dict[int, str] = {}

    def __enter__(self) -> "PlainRenderer":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def update(self, job: Job) -> None:
        line = output.progress_line(job)
        if self._last.get(job.id) != line:
            self._last[job.id] = line
            typer.echo(line)

    def finish(self, job: Job) -> None:
        typer.echo(output.outcome_line(job))


class StateColumn(ProgressColumn):
    """Column with a spinner while the job is active, then a mark for how it ended.

    rich's own spinner column stops only when completed reaches total, which
    a failed job or one with an unknown total never does.
    """

    def __init__(self) -> None:
        super().__init__()
        self._spinner = SpinnerColumn()

    def render(self, task: Task) -> RenderableType:
        outcome = task.fields.get("outcome")
        if outcome is None:
            return self._spinner.render(task)
        if outcome == Status.SUCCEEDED:
            return Text("✓", style="green")
        return Text("✗", style="red")


class RichRenderer:
    """Progress-bar renderer: one bar per job, for terminals.

    The rate and estimate come from the job row (the supervisor measures
    them), not from rich's own sampling. A new attempt restarts the bar from 0.
    """

    def __init__(self, console: Console):
        self._console = console
        self._progress = Progress(
            StateColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[detail]}"),
            console=console,
            transient=False,
        )
        self._tasks: dict[int, TaskID] = {}
        self._attempts: dict[int, int] = {}

    def __enter__(self) -> "RichRenderer":
        self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.stop()

    def update(self, job: Job) -> None:
        view = output.progress_view(job)
        description = f"job {job.id} {job.analysis} [dim]{job.status}[/dim]"
        if job.max_attempts > 1 and job.attempt > 1:
            description += f" [yellow]attempt {output.format_attempt(job)}[/yellow]"
        if view.phase:
            description += f" {view.phase}"
        detail = ""
        if job.status == Status.RUNNING:
            detail = f"{output.format_rate(view.rate)}  eta {output.format_eta(view, job.status)}"
            if job.cancel_requested_at is not None:
                detail += "  [red]cancel requested[/red]"
        elif job.status == Status.QUEUED and job.error:
            detail = f"retrying after {output.format_error(job.error)}"
        outcome = job.status if job.is_terminal else None
        fields = {"counts": output.format_counts(view), "detail": detail, "outcome": outcome}

        task = self._tasks.get(job.id)
        if task is None:
            task = self._progress.add_task(description, total=None, **fields)
            self._tasks[job.id] = task
        elif self._attempts.get(job.id) != job.attempt:
            self._progress.reset(task, total=None, **fields)
        self._attempts[job.id] = job.attempt
        total, completed = view.total, view.completed or 0
        if job.status == Status.SUCCEEDED and total is None:
            # Fill the bar of a job that never reported a total.
            total = completed = 1
        self._progress.update(task, description=description, total=total, completed=completed, **fields)

    def finish(self, job: Job) -> None:
        self.update(job)
        self._progress.stop_task(self._tasks[job.id])
        style = "green" if job.status == Status.SUCCEEDED else "red"
        self._progress.console.print(f"[{style}]{output.outcome_line(job)}[/{style}]", markup=True,
                                     highlight=False)


def make_renderer(console: Console | None = None) -> PlainRenderer | RichRenderer:
    """Return a progress-bar renderer on a terminal and a line renderer otherwise."""
    console = console or Console()
    return RichRenderer(console) if console.is_terminal else PlainRenderer()


# Following ---------------------------------------------------------------


def follow(engine: Engine, url: str, job_ids: Sequence[int], renderer, *, poll_seconds: float) -> dict[int, Job]:
    """Render the jobs until all of them ended; return their final rows.

    LISTEN starts before the first read, so no change between the read and
    the LISTEN can be missed.
    """
    listener = ChangeListener(url)
    listener.connect()
    finished: dict[int, Job] = {}
    try:
        with renderer:
            while True:
                for job_id in job_ids:
                    if job_id in finished:
                        continue
                    job = _read_job(engine, job_id, poll_seconds)
                    if job.is_terminal:
                        finished[job_id] = job
                        renderer.finish(job)
                    else:
                        renderer.update(job)
                pending = [job_id for job_id in job_ids if job_id not in finished]
                if not pending:
                    return finished
                listener.wait(pending, poll_seconds)
    finally:
        listener.close()


def _read_job(engine: Engine, job_id: int, poll_seconds: float) -> Job:
    """Read a job's row, retrying for up to ``READ_RETRY_SECONDS`` while the database is unreachable."""
    deadline = time.monotonic() + READ_RETRY_SECONDS
    warned = False
    while True:
        try:
            return store.get_job(engine, job_id)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
            if time.monotonic() > deadline:
                raise
            if not warned:
                typer.echo(f"warning: cannot read job {job_id} ({error.orig}); retrying for up to "
                           f"{READ_RETRY_SECONDS:g} s", err=True)
                warned = True
            time.sleep(max(poll_seconds, 0.5))


def follow_interruptible(engine: Engine, url: str, job_ids: Sequence[int], *, poll_seconds: float,
                         quiet: bool = False) -> dict[int, Job]:
    """Follow jobs until they end; Ctrl-C stops following (exit 130) and leaves them running.

    ``quiet`` renders nothing, for JSON output.
    """
    renderer = _QuietRenderer() if quiet else make_renderer()
    try:
        return follow(engine, url, job_ids, renderer, poll_seconds=poll_seconds)
    except KeyboardInterrupt:
        ids = " ".join(str(job_id) for job_id in job_ids)
        typer.echo(f"stopped following; the job keeps running (`analysisctl cancel {ids}` stops it)", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def exit_unless(jobs: dict[int, Job], expected: str = Status.SUCCEEDED) -> None:
    """Raise ``typer.Exit(1)`` unless every job ended with status ``expected``."""
    if any(job.status != expected for job in jobs.values()):
        raise typer.Exit(EXIT_NOT_SUCCEEDED)


class _QuietRenderer:
    def __enter__(self) -> "_QuietRenderer":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def update(self, job: Job) -> None:
        pass

    def finish(self, job: Job) -> None:
        pass
