"""Reading a log file for `analysisctl service logs`: its last lines, then new lines as they arrive."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# How often `service logs --follow` looks for new lines and for a rotated file.
FOLLOW_POLL_SECONDS = 0.5
# Bytes read at a time from the end of the log file for `service logs -n`.
TAIL_BLOCK_BYTES = 64 * 1024


def tail_lines(handle: BinaryIO, count: int) -> list[bytes]:
    """Return the last ``count`` lines of ``handle`` and leave it positioned at its end."""
    end = handle.seek(0, os.SEEK_END)
    position, data = end, b""
    while position > 0 and data.count(b"\n") <= count:
        step = min(TAIL_BLOCK_BYTES, position)
        position -= step
        handle.seek(position)
        data = handle.read(step) + data
    handle.seek(end)
    return data.splitlines(keepends=True)[-count:] if count > 0 else []


def follow_file(path: Path, handle: BinaryIO, write: Callable[[bytes], None],
                sleep: Callable[[float], None] = time.sleep) -> None:
    """Write lines appended to ``path`` as they arrive, following rotation, until interrupted.

    After a rotation the rest of the old file is written first, then the new
    file from its start. A file truncated in place is read from its start.
    """
    pending = b""
    try:
        while True:
            chunk = handle.read()
            if chunk:
                complete, newline, pending = (pending + chunk).rpartition(b"\n")
                if newline:
                    write(complete + newline)
                continue
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(handle.fileno())
            if current is not None and (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
                if pending:
                    write(pending + b"\n")
                    pending = b""
                handle.close()
                handle = open(path, "rb")
                continue
            if current is not None and current.st_size < handle.tell():
                pending = b""
                handle.seek(0)
                continue
            sleep(FOLLOW_POLL_SECONDS)
    finally:
        handle.close()
