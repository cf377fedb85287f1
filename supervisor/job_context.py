"""The ``analyses.context.Context`` that a worker builds for each job attempt."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from analyses.context import Context
from analyses.errors import Cancelled
from supervisor.progress import SlotWriter

_RESULT_NAME = re.compile(r"[a-z0-9_-]{1,64}")


def to_json_value(value: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """Return ``value`` rebuilt from its JSON text, so it contains only JSON types.

    NaN and infinities survive as floats. Raises TypeError or ValueError when
    ``value`` is not JSON-serialisable and ``default`` does not convert it.
    """
    return json.loads(json.dumps(value, allow_nan=True, default=default))


def check_result_name(name: str) -> None:
    """Raise ValueError unless ``name`` matches ``[a-z0-9_-]{1,64}``."""
    if not isinstance(name, str) or not _RESULT_NAME.fullmatch(name):
        raise ValueError(f"invalid result name {name!r}: use 1 to 64 characters from a-z, 0-9, '_' and '-'")


class _HashingWriter:
    """A write-only file wrapper that counts bytes and computes their SHA-256."""

    def __init__(self, file) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self._file.write(data)


class JobContext(Context):
    """A context backed by the worker's slot record and the job's results directory.

    ``progress`` and ``phase`` are the ``SlotWriter`` methods themselves, bound
    per instance, because bodies call them in tight loops.
    """

    def __init__(self, task: dict[str, Any], writer: SlotWriter, slot: int,
                 on_process_group: Callable[[], None] | None = None) -> None:
        self.job_id = task["job_id"]
        self.attempt = task["attempt"]
        self.attempt_token = task["attempt_token"]
        self.analysis = task["analysis"]
        self.database_url = task.get("database_url")
        self.results_dir = task["results_dir"]
        self.slot = slot
        self.logger = logging.getLogger(f"analyses.{self.analysis}")
        self._writer = writer
        self._record = writer.record
        self._on_process_group = on_process_group
        self._results: dict[str, dict[str, Any]] = {}
        self.progress = writer.progress
        self.phase = writer.phase

    @property
    def results(self) -> list[dict[str, Any]]:
        """Index entries of the results saved so far, in the order first saved."""
        return list(self._results.values())

    def progress(self, completed: int, total: int | None = None, message: str | None = None) -> None:
        self._writer.progress(completed, total, message)

    def phase(self, name: str, total: int | None = None) -> None:
        self._writer.phase(name, total)

    @property
    def cancelled(self) -> bool:
        return self._record.cancel != 0

    def check_cancelled(self) -> None:
        # Overrides the base method, whose import per call costs about ten times more.
        if self._record.cancel:
            raise Cancelled()

    def register_process_group(self, pgid: int) -> None:
        self._writer.add_process_group(pgid)
        if self._on_process_group is not None:
            self._on_process_group()
        self.logger.debug("registered process group %d", pgid,
                          extra={"event": "process_group_registered", "job_id": self.job_id, "pgid": pgid})

    def save_array(self, name: str, array: Any) -> dict[str, Any]:
        """Write ``array`` to ``<results_dir>/<job_id>/<attempt>/<name>.npy`` and return its index entry.

        The file is written under a temporary name, flushed to disk and then
        renamed, so a reader never sees a partial file. Saving a name again
        replaces the earlier file and entry. Object arrays are rejected
        because loading them would need pickle.
        """
        import numpy

        check_result_name(name)
        directory = os.path.join(self.results_dir, str(self.job_id), str(self.attempt))
        os.makedirs(directory, exist_ok=True)
        path = os.path.abspath(os.path.join(directory, f"{name}.npy"))
        partial = os.path.join(directory, f".{name}.npy.partial")
        try:
            with open(partial, "wb") as file:
                hashing = _HashingWriter(file)
                numpy.save(hashing, numpy.asarray(array), allow_pickle=False)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass
            raise

        entry = {"name": name, "kind": "file", "path": path, "size_bytes": hashing.size,
                 "sha256": hashing.sha256.hexdigest(), "format": "npy"}
        self._store(entry)
        return entry

    def save_json(self, name: str, document: Any) -> dict[str, Any]:
        """Return an inline index entry for ``document``, which must be JSON-serialisable.

        Saving a name again replaces the earlier entry.
        """
        check_result_name(name)
        try:
            value = to_json_value(document)
        except (TypeError, ValueError, RecursionError) as error:
            raise ValueError(f"result {name!r} is not JSON-serialisable: {error}") from error
        entry = {"name": name, "kind": "inline", "value": value}
        self._store(entry)
        return entry

    def _store(self, entry: dict[str, Any]) -> None:
        # Assigning an existing key keeps its position in the dict.
        self._results[entry["name"]] = entry
