"""Job statuses and the transitions allowed between them.

This table lists every allowed status change. The statements in
``supervisor.store``, ``supervisor.runs`` and ``supervisor.sweeps`` check the
current status in their WHERE clause, most through ``sources()``, and the
unit tests and the store state machine compare every change they observe
against this table.

::

                 claim               finish
    queued ───────────────▶ running ───────────▶ succeeded ──▶ expired
      │  ▲                   │  │  │                (results dropped)
      │  └───────────────────┘  │  └──────────────▶ failed
      │   retry, lease recovery,│
      │   shutdown requeue      └─────────────────▶ cancelled
      ├──────────────────────────────────────────▶ cancelled  (cancel while queued)
      └──────────────────────────────────────────▶ expired    (start-by passed)

A cancel request is not a status: it is recorded on the job, and a running
job moves to ``cancelled`` once its process has stopped.
"""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


ACTIVE = frozenset({Status.QUEUED, Status.RUNNING})
TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.EXPIRED})

# (from, to) -> the operation that performs it.
ALLOWED: dict[tuple[Status, Status], str] = {
    (Status.QUEUED, Status.RUNNING): "claim",
    (Status.QUEUED, Status.CANCELLED): "cancel a queued job",
    (Status.QUEUED, Status.EXPIRED): "start-by deadline passed",
    (Status.RUNNING, Status.SUCCEEDED): "finish",
    (Status.RUNNING, Status.FAILED): "fail, or lease expired with no attempts left",
    (Status.RUNNING, Status.CANCELLED): "the process stopped after a cancel request",
    (Status.RUNNING, Status.QUEUED): "retry, lease recovery or shutdown requeue",
    (Status.SUCCEEDED, Status.EXPIRED): "results expired",
}


def is_allowed(current: Status | str, target: Status | str) -> bool:
    """Return whether a job may move from ``current`` to ``target``."""
    return (Status(current), Status(target)) in ALLOWED


def sources(target: Status | str) -> list[str]:
    """Return the statuses from which a job may move to ``target``, for SQL."""
    target = Status(target)
    return sorted(str(current) for (current, to) in ALLOWED if to == target)


def is_terminal(status: Status | str) -> bool:
    """Return whether ``status`` is final (only ``succeeded`` may still expire)."""
    return Status(status) in TERMINAL
