"""An in-process ``Context`` for running analysis bodies in tests and benchmarks.

It records phases and progress, keeps saved arrays and documents in memory,
and can request a cancel after a given number of progress reports.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from analyses import registry
from analyses.context import Context

_RESULT_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")


class FakeContext(Context):
    """A ``Context`` that stores everything in memory.

    With ``cancel_after_progress=N``, ``cancelled`` turns true once N
    ``progress`` calls have been made, counting only those in the phase
    ``cancel_phase`` when that is given. This exercises a body's cancel checks
    mid-run. ``progress_after_cancel`` counts the progress calls made after
    that point, which a body that stops promptly keeps at 0 or 1.
    """

    def __init__(
        self,
        cancel_after_progress: int | None = None,
        cancel_phase: str | None = None,
        database_url: str | None = None,
    ):
        self.job_id = 1
        self.attempt = 1
        # The worker's context carries the service database URL for source 'table'.
        self.database_url = database_url
        self.logger = logging.getLogger("tests.analysis")
        self.phases: list[tuple[str, int | None]] = []
        self.progress_calls: list[tuple[str | None, int, int | None]] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.documents: dict[str, Any] = {}
        self.process_groups: list[int] = []
        self.cancel_after_progress = cancel_after_progress
        self.cancel_phase = cancel_phase
        self.cancel_checks = 0
        self.progress_after_cancel = 0
        self._cancel_requested = False

    @property
    def current_phase(self) -> str | None:
        return self.phases[-1][0] if self.phases else None

    def progress(self, completed: int, total: int | None = None, message: str | None = None) -> None:
        if self._cancel_requested:
            self.progress_after_cancel += 1
        self.progress_calls.append((self.current_phase, completed, total))
        if self.cancel_after_progress is None:
            return
        counted = [call for call in self.progress_calls if self.cancel_phase in (None, call[0])]
        if len(counted) >= self.cancel_after_progress:
            self._cancel_requested = True

    def phase(self, name: str, total: int | None = None) -> None:
        self.phases.append((name, total))

    @property
    def cancelled(self) -> bool:
        self.cancel_checks += 1
        return self._cancel_requested

    def register_process_group(self, pgid: int) -> None:
        self.process_groups.append(pgid)

    def save_array(self, name: str, array: Any) -> dict[str, Any]:
        if not _RESULT_NAME.match(name):
            raise ValueError(f"result name {name!r} must match {_RESULT_NAME.pattern}")
        if name in self.arrays or name in self.documents:
            raise ValueError(f"result {name!r} saved twice")
        stored = np.array(array, copy=True)
        self.arrays[name] = stored
        return {"name": name, "kind": "array", "dtype": str(stored.dtype), "shape": list(stored.shape)}

    def save_json(self, name: str, document: Any) -> dict[str, Any]:
        if not _RESULT_NAME.match(name):
            raise ValueError(f"result {name!r} must match {_RESULT_NAME.pattern}")
        self.documents[name] = document
        return {"name": name, "kind": "json"}


def run_analysis(name: str, params: dict[str, Any], context: FakeContext | None = None) -> tuple[Any, FakeContext]:
    """Validate ``params`` as a submit would, run the body and return (summary, context)."""
    context = context or FakeContext()
    analysis = registry.get(name)
    validated = analysis.validate_params(params)
    summary = analysis.body(validated, context)
    return summary, context


def write_readings_csv(path, series: dict[str, tuple[Any, Any]], start: str = "2024-01-01T00:00:00Z") -> str:
    """Write ``{sensor: (offsets_seconds, values)}`` as a readings CSV and return its path.

    Offsets count from ``start``. A NaN value writes no row, as a missing
    reading would be stored.
    """
    from analyses.data import format_timestamp, parse_timestamp

    origin = parse_timestamp(start)
    lines = ["sensor_id,ts,value"]
    for sensor, (offsets, values) in series.items():
        for offset, value in zip(offsets, values):
            if np.isfinite(value):
                lines.append(f"{sensor},{format_timestamp(origin + float(offset))},{float(value)!r}")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return str(path)


def assert_json_finite(document: Any) -> None:
    """Fail unless ``document`` serialises as strict JSON, with no NaN or Infinity."""
    import json

    json.dumps(document, allow_nan=False)
