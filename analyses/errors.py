"""Exceptions that analyses raise and the service turns into job errors.

Every class here pickles, because an analysis raises them in a worker process
and the worker sends them to the supervisor.
"""

from __future__ import annotations

from typing import Any


class AnalysisError(Exception):
    """The analysis failed."""

    code = "analysis_error"
    retryable = False

    def __init__(self, message: str | None = None, details: dict[str, Any] | None = None):
        self.message = message or (self.__doc__ or "").strip()
        self.details = details or {}
        super().__init__(self.message)

    def __reduce__(self):
        return (type(self), (self.message, self.details))


class RetryableError(AnalysisError):
    """The analysis failed for a reason that may pass, so the job can run again."""

    retryable = True


class InvalidParams(AnalysisError):
    """The job's parameters are invalid."""

    code = "invalid_params"

    def __init__(self, field: str, value: Any, reason: str):
        self.field = field
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if value is None:
            # A missing parameter has no value worth showing.
            message = f"invalid parameter {field!r}: {reason}"
        else:
            message = f"invalid parameter {field!r} = {shown}: {reason}"
        super().__init__(message, {"field": field, "reason": reason})

    def __reduce__(self):
        return (type(self), (self.field, self.value, self.reason))


class Cancelled(Exception):
    """The job was asked to stop and stopped at a cancel check.

    Raised by ``Context.check_cancelled``. Analyses let it propagate; catching
    it and carrying on turns a cooperative cancel into a terminated one.
    """
