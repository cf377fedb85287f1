"""Strict JSON for parameters and results.

Python's ``json`` writes and reads the non-standard tokens NaN, Infinity and
-Infinity by default, and Postgres rejects them, along with the NUL character
in strings. Parameters that contain them are rejected at submit. Summaries
that contain non-finite numbers are stored with ``null`` in their place, and
the JSON pointers of the replaced values are listed under
``NON_FINITE_KEY`` in the job's result, so nothing computed is lost silently.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

NON_FINITE_KEY = "_non_finite"
# Levels a parameter document may nest: each object or list is one level.
MAX_DEPTH = 32


class PayloadError(ValueError):
    """A document cannot be stored as JSON; ``path`` is a JSON pointer to the bad value."""

    def __init__(self, path: str, reason: str):
        self.path = path or "/"
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _check(value: Any, path: str, depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise PayloadError(path, f"nested deeper than {max_depth} levels")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(path, f"{value!r} is not valid JSON (use a finite number or null)")
    elif isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PayloadError(path, f"object key {key!r} is not a string")
            _check_text(key, path)
            _check(item, f"{path}/{_escape(key)}", depth + 1, max_depth)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check(item, f"{path}/{index}", depth + 1, max_depth)
    elif value is not None and not isinstance(value, (bool, int)):
        raise PayloadError(path, f"{type(value).__name__} is not a JSON type")


def _check_text(text: str, path: str) -> None:
    if "\x00" in text:
        raise PayloadError(path, "contains a NUL character, which Postgres cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(path, "contains a lone surrogate, which is not valid UTF-8") from None


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def canonical(document: Any, max_depth: int = MAX_DEPTH) -> str:
    """Return ``document`` as canonical JSON (sorted keys, no spaces), or raise ``PayloadError``.

    Equal documents give equal strings, which makes the text usable for job keys.
    """
    _check(document, "", 0, max_depth)
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def job_key(analysis: str, params_canonical: str) -> str:
    """Return the derived deduplication key of an analysis and its canonical parameters."""
    digest = hashlib.sha256(f"{analysis}\n{params_canonical}".encode()).hexdigest()
    return f"{analysis}:{digest}"


def replace_non_finite(document: Any) -> tuple[Any, list[str]]:
    """Return a copy of ``document`` with NaN and infinities replaced by None, and their pointers."""
    replaced: list[str] = []

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            replaced.append(path or "/")
            return None
        if isinstance(value, dict):
            return {key: walk(item, f"{path}/{_escape(str(key))}") for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(item, f"{path}/{index}") for index, item in enumerate(value)]
        return value

    return walk(document, ""), replaced


def summary_document(summary: Any) -> Any:
    """Return ``summary`` ready to store: strict JSON with non-finite numbers recorded."""
    clean, replaced = replace_non_finite(summary)
    if replaced:
        if isinstance(clean, dict):
            clean = {**clean, NON_FINITE_KEY: replaced}
        else:
            clean = {"value": clean, NON_FINITE_KEY: replaced}
    canonical(clean, max_depth=64)
    return clean


def loads_strict(text: str) -> Any:
    """Parse JSON, rejecting NaN, Infinity, -Infinity and numbers that overflow to infinity."""

    def reject(token: str) -> Any:
        raise ValueError(f"{token} is not valid JSON; use a finite number or null")

    def parse_float(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise ValueError(f"{token} is out of range for a double-precision number")
        return value

    return json.loads(text, parse_constant=reject, parse_float=parse_float)
