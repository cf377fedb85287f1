"""The analysis registry: names, parameter schemas and run policies.

Submitting a job validates its parameters here, in the submitting process, so
a bad request fails before anything is written. Workers look the analysis up
again by name and call its body with the validated parameters.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from analyses.errors import InvalidParams

# Modules imported on first use of the registry; each registers its analyses.
ANALYSIS_MODULES = (
    "analyses.noop",
    "analyses.relationship_matrix",
    "analyses.related_sensors",
    "analyses.events",
    "analyses.matrix_profile",
)

_KINDS = ("integer", "number", "boolean", "string", "string_list", "json")
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of an analysis, with the rules a value must meet."""

    name: str
    kind: str
    help: str
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"parameter {self.name!r}: kind {self.kind!r} is not one of {_KINDS}")

    def validate(self, value: Any) -> Any:
        """Return ``value`` checked and normalised, or raise ``InvalidParams``."""
        checker = getattr(self, f"_check_{self.kind}")
        value = checker(value)
        if self.choices is not None and value not in self.choices:
            raise InvalidParams(self.name, value, f"must be one of {list(self.choices)}")
        return value

    def _check_range(self, value: float) -> None:
        if self.minimum is not None and value < self.minimum:
            raise InvalidParams(self.name, value, f"must be >= {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidParams(self.name, value, f"must be <= {self.maximum}")

    def _check_integer(self, value: Any) -> int:
        # bool is a subclass of int; True as a step count is a caller mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise InvalidParams(self.name, value, "must be an integer")
        self._check_range(value)
        return value

    def _check_number(self, value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidParams(self.name, value, "must be a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidParams(self.name, value, "must be a finite number (JSON has no NaN or Infinity)")
        self._check_range(value)
        return value

    def _check_boolean(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise InvalidParams(self.name, value, "must be true or false")
        return value

    def _check_string(self, value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidParams(self.name, value, "must be a string")
        _check_text(self.name, value, self.max_length)
        return value

    def _check_string_list(self, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise InvalidParams(self.name, value, "must be a list of strings")
        if self.max_length is not None and len(value) > self.max_length:
            raise InvalidParams(self.name, f"<{len(value)} items>",
                                f"must have at most {self.max_length} items; split the work into several jobs")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise InvalidParams(f"{self.name}[{index}]", item, "must be a string")
            _check_text(f"{self.name}[{index}]", item, 256)
        return value

    def _check_json(self, value: Any) -> Any:
        return value


def _check_text(field: str, value: str, max_length: int | None) -> None:
    if max_length is not None and len(value) > max_length:
        raise InvalidParams(field, value, f"must be at most {max_length} characters long (it has {len(value)})")
    if "\x00" in value:
        raise InvalidParams(field, value, "must not contain NUL characters (Postgres text cannot store them)")


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A registered analysis: its body, parameter schema and run policy.

    ``body(params, context)`` receives validated parameters and a
    ``analyses.context.Context`` and returns a JSON-serialisable summary.
    ``deduplicate`` makes a submit without an explicit key use a key derived
    from the analysis name and canonical parameters.

    The run policy: ``retry_codes`` lists the error codes that send a job
    back to the queue while attempts remain, after a delay that starts at
    ``retry_base_seconds`` and doubles per attempt up to ``retry_max_seconds``
    (None: the supervisor's settings), with jitter. ``crash_budget`` is how
    many runs of one job may end with their worker killed (a crash, the
    memory limit) before the job is quarantined, whatever attempts remain.
    ``timeout_seconds``, ``memory_limit_mib`` and ``start_within_seconds``
    are the defaults of a job's deadlines and memory limit.
    """

    name: str
    summary: str
    body: Callable[[dict[str, Any], Any], Any]
    params: tuple[Param, ...] = ()
    deduplicate: bool = False
    max_attempts: int = 3
    retry_codes: frozenset[str] = frozenset({"worker_died", "timeout", "lease_expired"})
    retry_base_seconds: float | None = None
    retry_max_seconds: float | None = None
    crash_budget: int = 3
    timeout_seconds: float | None = None
    memory_limit_mib: int | None = None
    start_within_seconds: float | None = None
    results_ttl_seconds: float | None = 7 * 24 * 3600

    def __post_init__(self) -> None:
        if not _NAME_PATTERN.match(self.name):
            raise ValueError(f"analysis name {self.name!r} must match {_NAME_PATTERN.pattern}")
        if self.max_attempts < 1:
            raise ValueError(f"analysis {self.name!r}: max_attempts must be >= 1")
        if self.crash_budget < 1:
            raise ValueError(f"analysis {self.name!r}: crash_budget must be >= 1")
        never_retried = self.retry_codes & {"invalid_params", "cancelled", "quarantined"}
        if never_retried:
            raise ValueError(f"analysis {self.name!r}: {sorted(never_retried)} can never be retried")
        names = [param.name for param in self.params]
        if len(names) != len(set(names)):
            raise ValueError(f"analysis {self.name!r}: duplicate parameter names")

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Return the parameters with defaults filled in, or raise ``InvalidParams``."""
        if not isinstance(params, Mapping):
            raise InvalidParams("params", params, "must be a JSON object")
        known = {param.name: param for param in self.params}
        for name in params:
            if name not in known:
                allowed = ", ".join(sorted(known)) or "none"
                raise InvalidParams(name, params[name], f"unknown parameter for {self.name!r} (allowed: {allowed})")

        validated: dict[str, Any] = {}
        for param in self.params:
            if param.name in params and params[param.name] is not None:
                validated[param.name] = param.validate(params[param.name])
            elif param.required:
                raise InvalidParams(param.name, None, f"is required; pass it with --param {param.name}=VALUE")
            elif param.default is not None:
                validated[param.name] = param.default
        return validated


_registry: dict[str, Analysis] = {}
_loaded = False


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` to the registry; a second analysis with its name is an error."""
    existing = _registry.get(analysis.name)
    if existing is not None and existing is not analysis:
        raise ValueError(f"analysis {analysis.name!r} is already registered")
    _registry[analysis.name] = analysis
    return analysis


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in ANALYSIS_MODULES:
            importlib.import_module(module)
        _loaded = True


def get(name: str) -> Analysis:
    """Return the analysis called ``name``, or raise ``InvalidParams`` naming the known ones."""
    _load()
    try:
        return _registry[name]
    except KeyError:
        known = ", ".join(sorted(_registry))
        raise InvalidParams("analysis", name, f"unknown analysis (registered: {known})") from None


def all_analyses() -> Sequence[Analysis]:
    """Return every registered analysis, sorted by name."""
    _load()
    return [_registry[name] for name in sorted(_registry)]
