"""Parsing of job parameters and times given on the command line."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from supervisor import payloads
from supervisor.errors import InvalidRequest, shorten


def parse_value(text: str, *, label: str) -> Any:
    """Return ``text`` parsed as strict JSON when it is JSON, else the text itself.

    NaN, Infinity and numbers that overflow a double (1e400) are JSON-like but
    rejected, because the job store cannot hold them.
    """
    try:
        return payloads.loads_strict(text)
    except json.JSONDecodeError:
        return text
    except RecursionError:
        raise InvalidRequest(f"invalid {label}: nested too deeply for the JSON parser; parameters may nest at most "
                             f"{payloads.MAX_DEPTH} levels", field="params") from None
    except ValueError as error:
        raise InvalidRequest(f"invalid {label}: {error}", field="params") from None


def parse_param(item: str) -> tuple[str, Any]:
    """Split a ``NAME=VALUE`` option into the name and the parsed value."""
    name, separator, raw = item.partition("=")
    name = name.strip()
    if not separator or not name:
        raise InvalidRequest(
            f"invalid --param {item!r}: expected NAME=VALUE, for example --param steps=100", field="params"
        )
    return name, parse_value(raw, label=f"--param {shorten(f'{name}={raw}')}")


def parse_document(text: str, *, source: str) -> dict[str, Any]:
    """Parse a JSON object strictly; ``source`` names where it came from in messages."""
    try:
        document = payloads.loads_strict(text)
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"{source} is not valid JSON: {error}", field="params") from None
    except RecursionError:
        raise InvalidRequest(f"{source} is nested too deeply for the JSON parser; parameters may nest at most "
                             f"{payloads.MAX_DEPTH} levels", field="params") from None
    except ValueError as error:
        raise InvalidRequest(f"{source} is not valid: {error}", field="params") from None
    if not isinstance(document, dict):
        raise InvalidRequest(
            f"{source} must be a JSON object such as {{\"steps\": 10}}, not {type(document).__name__}",
            field="params",
        )
    return document


def read_params_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequest(f"--params-file {str(path)!r} not found; pass the path of a JSON file",
                             field="params") from None
    except IsADirectoryError:
        raise InvalidRequest(f"--params-file {str(path)!r} is a directory; pass the path of a JSON file",
                             field="params") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"cannot read --params-file {str(path)!r}: {error}", field="params") from None
    return parse_document(text, source=f"--params-file {str(path)!r}")


def collect_params(items: list[str] | None, params_json: str | None, params_file: Path | None) -> dict[str, Any]:
    """Merge --params or --params-file with the --param options, which win per name."""
    if params_json is not None and params_file is not None:
        raise InvalidRequest("--params and --params-file cannot be used together; pass only one", field="params")
    params: dict[str, Any] = {}
    if params_json is not None:
        params = parse_document(params_json, source="--params")
    elif params_file is not None:
        params = read_params_file(params_file)
    for item in items or []:
        name, value = parse_param(item)
        params[name] = value
    return params


def parse_datetime(text: str, *, option: str) -> dt.datetime:
    """Parse an ISO-8601 time with a time zone, such as ``2026-01-31T18:00:00+01:00`` or ``...Z``."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"invalid {option} {text!r}: expected an ISO-8601 time such as 2026-01-31T18:00:00+01:00",
            field=option.lstrip("-").replace("-", "_"),
        ) from None
    if moment.tzinfo is None:
        raise InvalidRequest(
            f"invalid {option} {text!r}: the time has no time zone; add one, such as Z or +01:00",
            field=option.lstrip("-").replace("-", "_"),
        )
    return moment
