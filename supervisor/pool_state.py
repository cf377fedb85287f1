"""State of the worker pool's slots, and the outcomes and log records it builds from messages.

``supervisor.pool.WorkerPool`` owns one ``Slot`` per worker slot. A slot has
at most one worker process (``WorkerHandle``) and at most one task (``Run``).
The two change independently, because a task can wait for a worker that is
still starting and a worker outlives many tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from supervisor.worker import NATIVE_THREAD_VARIABLES, WorkerConfig, worker_main

logger = logging.getLogger(__name__)
_environment_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Task:
    """One attempt of a job, as the pool sends it to a worker."""

    job_id: int
    attempt: int
    attempt_token: str
    analysis: str
    params: dict
    results_dir: str
    database_url: str | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The end state of a task: ``status`` is "succeeded", "failed" or "cancelled".

    ``error`` is None on success, otherwise a dict with ``code``, ``message``,
    ``details`` and ``traceback``.
    """

    job_id: int
    attempt_token: str
    status: str
    summary: object = None
    results: tuple = ()
    error: dict | None = None
    retryable: bool = False


@dataclasses.dataclass
class Run:
    """A task assigned to a slot; ``sent`` once its worker received it."""

    task: Task
    sent: bool = False


@dataclasses.dataclass
class Termination:
    """A terminate() request: the run it targets, the outcome to report and when SIGKILL follows."""

    pid: int
    job_id: int
    attempt_token: str
    status: str
    error: dict | None
    retryable: bool
    kill_deadline: float
    killed: bool = False


@dataclasses.dataclass
class WorkerHandle:
    """One worker process and the supervisor's ends of its pipes."""

    process: BaseProcess
    conn: Connection | None
    lifeline: Connection | None  # write end, never written
    pid: int
    start_deadline: float
    ready: bool = False
    jobs_done: int = 0
    # Set when the worker reached max_jobs_per_worker and is exiting by itself.
    retire_deadline: float | None = None
    # Set when the worker closed its pipe; it is killed if still alive then.
    eof_deadline: float | None = None
    termination: Termination | None = None
    start_error: str | None = None

    def close_pipes(self) -> None:
        for connection in (self.conn, self.lifeline):
            if connection is not None:
                connection.close()
        self.conn = None
        self.lifeline = None


@dataclasses.dataclass
class Slot:
    """One worker slot: its current worker, its task and its start-up failure count."""

    index: int
    worker: WorkerHandle | None = None
    run: Run | None = None
    start_failures: int = 0
    next_start_at: float | None = None
    last_start_error: str | None = None

    def is_starting(self) -> bool:
        return self.worker is not None and not self.worker.ready

    def worker_ready(self) -> bool:
        worker = self.worker
        return (worker is not None and worker.ready and worker.conn is not None
                and worker.retire_deadline is None and worker.termination is None)

    def is_free(self) -> bool:
        return self.run is None and self.worker_ready()

    def next_deadline(self) -> float:
        """Return the earliest time.monotonic() at which the pool must act on this slot, or infinity."""
        worker = self.worker
        if worker is None:
            return self.next_start_at if self.next_start_at is not None else float("inf")
        deadlines = [float("inf"), worker.retire_deadline, worker.eof_deadline]
        if not worker.ready:
            deadlines.append(worker.start_deadline)
        if worker.termination is not None and not worker.termination.killed:
            deadlines.append(worker.termination.kill_deadline)
        return min(deadline for deadline in deadlines if deadline is not None)


def spawn_worker(context: BaseContext, slot: int, progress_array, config: WorkerConfig,
                 start_timeout: float) -> WorkerHandle:
    """Start a worker process for ``slot``; its handshake arrives later on ``conn``."""
    conn, child_conn = context.Pipe(duplex=True)
    lifeline_read, lifeline_write = context.Pipe(duplex=False)
    process = context.Process(
        target=worker_main, args=(slot, child_conn, progress_array, lifeline_read, config),
        name=f"analysis-worker-{slot}",
    )
    with native_thread_environment():
        process.start()
    # The child has its own copies now, and closing ours lets EOF reach each side.
    child_conn.close()
    lifeline_read.close()
    logger.debug("starting worker %d on slot %d", process.pid, slot,
                 extra={"event": "worker_starting", "slot": slot, "pid": process.pid})
    return WorkerHandle(process, conn, lifeline_write, process.pid, start_deadline=time.monotonic() + start_timeout)


@contextlib.contextmanager
def native_thread_environment():
    """Set the native thread variables in os.environ while a worker is spawned.

    The spawn child may import numpy before ``worker_main`` runs, for example
    when it re-imports the supervisor's main module, so the limits must be in
    its initial environment.
    """
    with _environment_lock:
        saved = {name: os.environ.get(name) for name in NATIVE_THREAD_VARIABLES}
        try:
            for name in NATIVE_THREAD_VARIABLES:
                os.environ[name] = "1"
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def exit_details(exit_code: int | None) -> dict[str, Any]:
    """Return ``{"signal": name}`` for a negative exit code, else ``{"exit_code": n}``."""
    if exit_code is None:
        return {"exit_code": None}
    if exit_code < 0:
        try:
            return {"signal": signal.Signals(-exit_code).name}
        except ValueError:
            return {"signal": str(-exit_code)}
    return {"exit_code": exit_code}


def describe_exit(details: dict[str, Any]) -> str:
    if "signal" in details:
        return f"killed by {details['signal']}"
    return f"exit code {details.get('exit_code')}"


def worker_died_outcome(task: Task, message: str, details: dict[str, Any]) -> Outcome:
    """Build the retryable ``worker_died`` outcome of a task whose worker exited or never started."""
    error = {"code": "worker_died", "message": message, "details": details, "traceback": None}
    return Outcome(job_id=task.job_id, attempt_token=task.attempt_token, status="failed", error=error,
                   retryable=True)


def terminated_outcome(task: Task, status: str, error: dict | None, retryable: bool, stage: str,
                       exit_info: dict[str, Any] | None) -> Outcome:
    """Build the outcome of a run stopped by terminate(); ``error`` comes from its caller."""
    error = dict(error or {})
    error.setdefault("code", "cancelled" if status == "cancelled" else "terminated")
    error.setdefault("message", "the job was terminated by the supervisor")
    error["details"] = {**(error.get("details") or {}), **(exit_info or {}), "stage": stage}
    error.setdefault("traceback", None)
    return Outcome(job_id=task.job_id, attempt_token=task.attempt_token, status=status, error=error,
                   retryable=retryable)


def reemit_log(slot: int, pid: int, payload: dict[str, Any]) -> None:
    """Pass a log record sent by the worker on ``slot`` to this process's logger of the same name.

    The traceback, if any, is in ``exc_text``, because ``exc_info`` cannot
    cross the process boundary.
    """
    created = payload["created"]
    fields = {
        **payload["extra"],
        "name": payload["name"], "levelno": payload["levelno"], "levelname": payload["levelname"],
        "msg": payload["msg"], "args": None, "exc_text": payload["exc_text"],
        "created": created, "msecs": (created - int(created)) * 1000,
        "process": pid, "processName": f"analysis-worker-{slot}",
    }
    fields.setdefault("slot", slot)
    record = logging.makeLogRecord(fields)
    logging.getLogger(payload["name"]).handle(record)
