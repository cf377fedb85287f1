"""Log output: JSON lines in a file such as launchd's StandardErrorPath, text on a terminal, and rotation."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from supervisor import logs


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stderr_file_gets_json_lines(tmp_path):
    script = textwrap.dedent("""
        import logging
        from supervisor import logs

        logs.configure()
        logger = logging.getLogger("supervisor.loop")
        logger.info("supervisor started", extra={"event": "supervisor_started", "supervisor_id": "s-1"})
        try:
            raise RuntimeError("first line\\nsecond line")
        except RuntimeError:
            logger.exception("job failed", extra={"event": "job_failed", "job_id": 7})
    """)
    log_path = tmp_path / "supervisor.log"

    # The same redirection launchd makes for StandardErrorPath: stderr is a regular file.
    with open(log_path, "ab") as log_file:
        subprocess.run([sys.executable, "-c", script], stderr=log_file, check=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])

    lines = read_json_lines(log_path)
    assert len(lines) == 2
    assert lines[0]["event"] == "supervisor_started"
    assert lines[0]["supervisor_id"] == "s-1"
    assert lines[0]["level"] == "INFO"
    assert lines[0]["logger"] == "supervisor.loop"
    assert lines[1]["event"] == "job_failed"
    assert lines[1]["job_id"] == 7
    assert "RuntimeError: first line\nsecond line" in lines[1]["traceback"]


def test_terminal_gets_text(restore_root_logger):
    primary, secondary = os.openpty()
    with open(secondary, "w") as terminal:
        logs.configure(stream=terminal)

        assert isinstance(restore_root_logger.handlers[0].formatter, logs.TextFormatter)
        assert not isinstance(restore_root_logger.handlers[0], logs.RotationFollowingHandler)
    os.close(primary)


def test_pipe_gets_json_without_rotation(restore_root_logger):
    read_end, write_end = os.pipe()
    with open(write_end, "w") as pipe:
        logs.configure(stream=pipe)

        handler = restore_root_logger.handlers[0]
        assert isinstance(handler.formatter, logs.JsonFormatter)
        assert not isinstance(handler, logs.RotationFollowingHandler)
    os.close(read_end)


def test_rotation_followed_to_new_file(restore_root_logger, tmp_path):
    log_path = tmp_path / "supervisor.log"
    rotated_path = tmp_path / "supervisor.log.0"
    logger = logging.getLogger("supervisor.test")

    with open(log_path, "a") as log_file:
        logs.configure(stream=log_file)
        logger.info("before rotation", extra={"event": "before"})
        # What newsyslog does: rename the file, then create an empty one in its place.
        log_path.rename(rotated_path)
        log_path.touch()
        logger.info("after rotation", extra={"event": "after"})
        os.write(log_file.fileno(), b'{"raw": "write"}\n')

    assert [line["event"] for line in read_json_lines(rotated_path)] == ["before"]
    after = read_json_lines(log_path)
    assert after[0]["event"] == "after"
    assert after[1] == {"raw": "write"}


def test_rotation_waits_for_new_file(restore_root_logger, tmp_path):
    log_path = tmp_path / "supervisor.log"
    rotated_path = tmp_path / "supervisor.log.0"
    logger = logging.getLogger("supervisor.test")

    with open(log_path, "a") as log_file:
        logs.configure(stream=log_file)
        log_path.rename(rotated_path)
        logger.info("between rename and create", extra={"event": "between"})
        log_path.touch()
        logger.info("after create", extra={"event": "after"})

    assert [line["event"] for line in read_json_lines(rotated_path)] == ["between"]
    assert [line["event"] for line in read_json_lines(log_path)] == ["after"]


def test_rotation_unwritable_new_file_reported_once(restore_root_logger, tmp_path, monkeypatch):
    log_path = tmp_path / "supervisor.log"
    rotated_path = tmp_path / "supervisor.log.0"
    logger = logging.getLogger("supervisor.test")
    real_open = os.open

    def refuse_new_file(path, flags, *args):
        if str(path) == str(log_path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    with open(log_path, "a") as log_file:
        logs.configure(stream=log_file)
        log_path.rename(rotated_path)
        log_path.touch()
        monkeypatch.setattr(os, "open", refuse_new_file)
        logger.info("first", extra={"event": "first"})
        logger.info("second", extra={"event": "second"})

    events = [line["event"] for line in read_json_lines(rotated_path)]
    assert events == ["log_reopen_failed", "first", "second"]
    assert log_path.read_text() == ""
