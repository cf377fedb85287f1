"""Exceptions of the job service and the error codes recorded on failed jobs."""

from __future__ import annotations

import enum
from typing import Any

# Characters of a value's repr that an error message shows.
SHOWN_VALUE_LENGTH = 80


class ErrorCode(enum.StrEnum):
    """Stable codes in a failed job's ``error.code``; clients may branch on them."""

    INVALID_PARAMS = "invalid_params"
    ANALYSIS_ERROR = "analysis_error"
    WORKER_DIED = "worker_died"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    LEASE_EXPIRED = "lease_expired"
    SHUTDOWN = "shutdown"
    # Runs of the job kept killing their worker; see Analysis.crash_budget.
    QUARANTINED = "quarantined"


def shorten(value: Any, limit: int = SHOWN_VALUE_LENGTH) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters, for quoting a rejected value in a message."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


class ServiceError(Exception):
    """The job service failed."""

    exit_code = 1

    def __init__(self, message: str | None = None):
        self.message = message or (self.__doc__ or "").strip()
        super().__init__(self.message)

    def __reduce__(self):
        return (type(self), (self.message,))


class JobNotFound(ServiceError):
    """No job has this id."""

    exit_code = 3

    def __init__(self, job_id: int | str):
        self.job_id = job_id
        super().__init__(f"job {job_id} not found; `analysisctl list` shows the jobs you can see")

    def __reduce__(self):
        return (type(self), (self.job_id,))


class InvalidRequest(ServiceError):
    """The request is invalid and nothing was written."""

    exit_code = 4

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.message, self.field))


class DatabaseUnavailable(ServiceError):
    """The database cannot be reached."""

    exit_code = 5


class SchemaOutOfDate(ServiceError):
    """The database schema is not at the revision this version needs."""

    exit_code = 6


class PermissionDenied(ServiceError):
    """The database role of this session is not permitted to do this, and nothing was written."""

    exit_code = 9


class ConfigError(ServiceError):
    """The configuration is invalid."""

    exit_code = 2


class InvalidOption(ServiceError):
    """A command-line option has an invalid value; nothing was changed."""

    exit_code = 2

    def __init__(self, option: str, reason: str):
        self.option = option
        self.reason = reason
        super().__init__(f"{option}: {reason}")

    def __reduce__(self):
        return (type(self), (self.option, self.reason))


class ServiceManagerUnavailable(ServiceError):
    """launchd is not available on this host, so the service was not changed."""

    exit_code = 7


class ServiceManagerFailed(ServiceError):
    """A launchctl command failed."""

    exit_code = 8
