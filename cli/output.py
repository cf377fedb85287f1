"""Rendering of jobs, progress and documents for terminals, pipes and JSON.

Every value shown comes from a database row that another process wrote, so
the helpers here accept odd values without failing: an unknown total, a
completed count above the total, NaN or infinite rates, negative estimates.
JSON output goes through ``dumps``, which never writes NaN or Infinity.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from supervisor.store import Job
from supervisor.transitions import Status


def json_safe(value: Any) -> Any:
    """Return ``value`` with only strict-JSON types: ISO-8601 datetimes, finite numbers or None."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value.value if isinstance(value, enum.Enum) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (uuid.UUID, Path)):
        return str(value)
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(item) for item in value]
    return str(value)


def dumps(document: Any, *, indent: int | None = 2) -> str:
    """Return ``document`` as strict JSON, which any parser accepts."""
    return json.dumps(json_safe(document), allow_nan=False, indent=indent, ensure_ascii=False)


def print_json(document: Any) -> None:
    typer.echo(dumps(document))


# Width of tables written to a pipe or file, where no terminal sets one;
# wide enough that rows do not wrap.
PIPE_WIDTH = 250


def console() -> Console:
    """Return a console for stdout: the terminal's width on a terminal, ``PIPE_WIDTH`` otherwise."""
    terminal = Console(highlight=False)
    if terminal.is_terminal or "COLUMNS" in os.environ:
        return terminal
    return Console(highlight=False, width=PIPE_WIDTH)


def finite(value: Any) -> float | None:
    """Return ``value`` as a float when it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, decimal.Decimal)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


# Progress -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProgressView:
    """Progress of a job's current attempt, made safe for display.

    ``completed`` is clamped to [0, total] when the total is known.
    ``percent`` is None while the total is unknown, and 100 once the job
    succeeded. ``eta_seconds`` is None when the rate is 0 or unknown or the
    total is unknown, 0 once the job succeeded, and never negative.
    """

    phase: str | None
    completed: int | None
    total: int | None
    percent: float | None
    message: str | None
    rate: float | None
    eta_seconds: float | None
    updated_at: dt.datetime | None


def progress_view(job: Job) -> ProgressView:
    total = job.progress_total if isinstance(job.progress_total, int) and job.progress_total >= 0 else None
    completed = job.progress_completed if isinstance(job.progress_completed, int) else None
    if completed is not None:
        completed = max(0, completed)
        if total is not None:
            completed = min(completed, total)
    rate = finite(job.progress_rate)
    if rate is not None and rate < 0:
        rate = None
    succeeded = job.status == Status.SUCCEEDED

    percent: float | None = None
    if succeeded:
        percent = 100.0
        if total is not None:
            completed = total
    elif total and completed is not None:
        percent = min(100.0, max(0.0, 100.0 * completed / total))

    eta: float | None = None
    if succeeded:
        eta = 0.0
    elif job.status == Status.RUNNING and rate and total is not None and completed is not None:
        # The supervisor's estimate is smoothed, so it wins unless it is
        # missing or invalid, or the phase has nothing left to do.
        remaining = total - completed
        stored = finite(job.progress_eta_seconds)
        if remaining == 0:
            eta = 0.0
        elif stored is not None and stored >= 0:
            eta = stored
        else:
            eta = remaining / rate
    return ProgressView(job.progress_phase, completed, total, percent, job.progress_message, rate, eta,
                        job.progress_updated_at)


# Text formatting ---------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """Return a duration such as ``0.4s``, ``42s``, ``3m05s`` or ``2h04m``; ``-`` when unknown."""
    seconds = finite(seconds)
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_time(moment: dt.datetime | None) -> str:
    """Return a timestamp in the local time zone, to the second; ``-`` when unset."""
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    if rate >= 100:
        return f"{rate:,.0f}/s"
    return f"{rate:.3g}/s"


def format_counts(view: ProgressView) -> str:
    """Return ``completed/total (percent)``, with ``?`` for an unknown total."""
    if view.total is None and view.percent is not None:
        # A job that succeeded without ever reporting a total.
        return f"{view.completed:,} done" if view.completed else "done"
    if view.completed is None and view.total is None:
        return "-"
    completed = "?" if view.completed is None else f"{view.completed:,}"
    total = "?" if view.total is None else f"{view.total:,}"
    text = f"{completed}/{total}"
    if view.percent is not None:
        text += f" ({view.percent:.0f}%)"
    return text


def format_eta(view: ProgressView, status: str) -> str:
    if view.eta_seconds is not None:
        return format_duration(view.eta_seconds)
    return "unknown" if status == Status.RUNNING else "-"


def printable(text: str) -> str:
    """Return ``text`` with control characters escaped, safe to print on a terminal.

    Job fields contain text from the submitting user, and an escape
    sequence in them could retitle or rewrite the reader's terminal.
    """
    return "".join(
        character if character.isprintable() or character == " " else repr(character)[1:-1]
        for character in text
    )


def format_error(error: Mapping[str, Any] | None) -> str:
    if not error:
        return "-"
    code = error.get("code") or "error"
    message = error.get("message") or ""
    return printable(f"{code}: {message}" if message else str(code))


def format_attempt(job: Job) -> str:
    return f"{job.attempt}/{job.max_attempts}"


def progress_line(job: Job) -> str:
    """Return one line describing a job's state, for pipes and logs."""
    view = progress_view(job)
    parts = [f"job {job.id} {printable(job.analysis)}: {job.status}", f"attempt {format_attempt(job)}"]
    if job.status == Status.RUNNING or view.phase:
        if view.phase:
            parts.append(f"phase {view.phase}")
        if view.completed is not None or view.total is not None:
            parts.append(format_counts(view))
        if job.status == Status.RUNNING:
            parts.append(f"rate {format_rate(view.rate)}")
            parts.append(f"eta {format_eta(view, job.status)}")
        if view.message:
            parts.append(view.message)
    if job.cancel_requested_at is not None and job.status == Status.RUNNING:
        parts.append("cancel requested")
    if job.status == Status.QUEUED and job.error:
        parts.append(f"last error {format_error(job.error)}")
    return printable(", ".join(parts))


def outcome_line(job: Job) -> str:
    """Return the final line for a finished job: its status, run time and error."""
    elapsed = None
    if job.started_at is not None and job.finished_at is not None:
        elapsed = (job.finished_at - job.started_at).total_seconds()
    if job.status == Status.SUCCEEDED:
        return f"job {job.id} {job.analysis} succeeded in {format_duration(elapsed)} (attempt {format_attempt(job)})"
    if job.status == Status.CANCELLED:
        by = f" by {job.cancel_requested_by}" if job.cancel_requested_by else ""
        message = (job.error or {}).get("message")
        return f"job {job.id} {job.analysis} cancelled{by}" + (f": {message}" if message else "")
    return f"job {job.id} {job.analysis} {job.status} (attempt {format_attempt(job)}): {format_error(job.error)}"


# Documents ---------------------------------------------------------------


def job_document(job: Job) -> dict[str, Any]:
    """Return the JSON form of a job, as ``status --json`` and ``list --json`` print it."""
    view = progress_view(job)
    started, finished = job.started_at, job.finished_at
    run_seconds = (finished - started).total_seconds() if started and finished else None
    return json_safe({
        "id": job.id,
        "analysis": job.analysis,
        "status": job.status,
        "params": job.params,
        "key": job.job_key,
        "priority": job.priority,
        "user": job.submitted_by,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "timeout_seconds": job.timeout_seconds,
        "memory_limit_mib": job.memory_limit_mib,
        "crashes": job.crashes,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": started,
        "finished_at": finished,
        "run_seconds": run_seconds,
        "run_after": job.run_after,
        "start_by": job.start_by,
        "progress": {
            "phase": view.phase,
            "completed": view.completed,
            "total": view.total,
            "percent": view.percent,
            "message": view.message,
            "rate": view.rate,
            "eta_seconds": view.eta_seconds,
            "updated_at": view.updated_at,
        },
        "lease": None if job.lease_owner is None else {
            "supervisor": job.lease_owner, "expires_at": job.lease_expires_at,
        },
        "cancel": None if job.cancel_requested_at is None else {
            "requested_at": job.cancel_requested_at, "requested_by": job.cancel_requested_by,
        },
        "error": job.error,
        "results_expire_at": job.results_expire_at,
    })


def summary_lines(document: Any, *, width: int = 100, max_keys: int = 12) -> list[str]:
    """Return a JSON summary as one line per top-level key, each cut to ``width`` characters."""
    if not isinstance(document, Mapping):
        return [_cut(dumps(abbreviate(document, max_items=4, depth=2), indent=None), width)]
    lines = []
    for key, value in list(document.items())[:max_keys]:
        text = dumps(abbreviate(value, max_items=4, max_text=40, depth=2), indent=None)
        lines.append(_cut(f"{key}: {text}", width))
    if len(document) > max_keys:
        lines.append(f"... {len(document) - max_keys} more keys")
    return lines


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def abbreviate(document: Any, *, max_items: int = 6, max_text: int = 80, depth: int = 3) -> Any:
    """Return a shortened copy of a JSON document for a compact display.

    Lists and objects keep their first ``max_items`` entries plus a marker
    with the count left out; deeper levels become a size marker.
    """
    if isinstance(document, str):
        return document if len(document) <= max_text else document[: max_text - 3] + "..."
    if isinstance(document, Mapping):
        if depth == 0:
            return f"<object with {len(document)} keys>"
        items = list(document.items())
        kept = {str(key): abbreviate(value, max_items=max_items, max_text=max_text, depth=depth - 1)
                for key, value in items[:max_items]}
        if len(items) > max_items:
            kept["..."] = f"{len(items) - max_items} more keys"
        return kept
    if isinstance(document, (list, tuple)):
        if depth == 0:
            return f"<list of {len(document)} items>"
        kept_items = [abbreviate(value, max_items=max_items, max_text=max_text, depth=depth - 1)
                      for value in document[:max_items]]
        if len(document) > max_items:
            kept_items.append(f"... {len(document) - max_items} more items")
        return kept_items
    return json_safe(document)
