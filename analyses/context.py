"""The interface an analysis body uses to talk to the service while it runs."""

from __future__ import annotations

import abc
import logging
from typing import Any


class Context(abc.ABC):
    """What a running analysis can do besides computing.

    The worker process builds one per job attempt. Progress and cancel checks
    cost a few memory operations each, so a body may call them in a tight
    loop. It should check for cancel at least every 100 ms of work.
    """

    job_id: int
    attempt: int
    logger: logging.Logger

    @abc.abstractmethod
    def progress(self, completed: int, total: int | None = None, message: str | None = None) -> None:
        """Report that ``completed`` units of the current phase are done.

        ``total`` replaces the phase's total when given. Values are clamped so
        that completed never exceeds total and never decreases within a phase.
        """

    @abc.abstractmethod
    def phase(self, name: str, total: int | None = None) -> None:
        """Start a named phase, resetting completed to 0."""

    @property
    @abc.abstractmethod
    def cancelled(self) -> bool:
        """Whether a cancel was requested for this job."""

    def check_cancelled(self) -> None:
        """Raise ``analyses.errors.Cancelled`` if a cancel was requested."""
        from analyses.errors import Cancelled

        if self.cancelled:
            raise Cancelled()

    @abc.abstractmethod
    def register_process_group(self, pgid: int) -> None:
        """Record a process group the job started, so termination reaches it.

        A job that starts external programs puts them in a group of their own
        (``start_new_session=True``) and registers it here. When the job is
        terminated, or its worker dies, the supervisor kills that group too.
        """

    @abc.abstractmethod
    def save_array(self, name: str, array: Any) -> dict[str, Any]:
        """Store a large numpy array as a result file and return its index entry.

        The file name is chosen by the service from the job id and ``name``;
        ``name`` must match ``[a-z0-9_-]{1,64}``.
        """

    @abc.abstractmethod
    def save_json(self, name: str, document: Any) -> dict[str, Any]:
        """Store a JSON document as a named result and return its index entry."""
