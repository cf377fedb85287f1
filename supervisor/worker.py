"""The worker process: runs one analysis task at a time for the supervisor's pool.

``supervisor.pool.WorkerPool`` starts ``worker_main`` with the spawn start
method. This module imports only the standard library and the analysis
registry, because numpy must not be imported before ``worker_main`` has
limited the native thread pools.

Messages are ``(kind, payload)`` tuples on the worker's duplex pipe.
Supervisor to worker: ``("task", dict)``. Worker to supervisor:
``("started", {"pid": int})`` once ready, ``("start_failed", str)`` when
initialisation raised, ``("log", dict)`` for each log record and
``("outcome", dict)`` when a task ends.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from analyses import registry
from analyses.errors import AnalysisError, Cancelled
from supervisor.job_context import JobContext, to_json_value
from supervisor.progress import SlotWriter

logger = logging.getLogger(__name__)

# Variables read by OpenMP, OpenBLAS, MKL, Accelerate and numexpr when they
# load. One thread per worker keeps a pool of N workers at N busy cores.
NATIVE_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                           "NUMEXPR_NUM_THREADS")

# Test-only hook: when this environment variable is "1", worker initialisation
# raises, so tests can exercise the pool's start-up failure handling.
START_FAIL_VARIABLE = "ANALYSIS_TEST_WORKER_START_FAIL"

EXIT_START_FAILED = 3
# The worker exits with this code when its lifeline pipe reports that the
# supervisor is gone.
EXIT_SUPERVISOR_GONE = 75
# Messages up to this size are written to the pipe directly, because a Unix
# socket buffer (an estimate: 200 KiB or more on Linux, 8 KiB or more on
# macOS) takes them in one write. Larger ones are spooled to a file.
SPOOL_BYTES = 8 * 1024
# Spool files are named after the worker's pid, so the pool can delete those
# of a worker that died while writing one.
SPOOL_PREFIX = "analysis-outcome-"
# The run's lease deadline passed without renewal: see WorkerPool.set_run_deadline.
EXIT_LEASE_DEADLINE = 76
# How often the lifeline thread checks the run deadline, in seconds.
DEADLINE_CHECK_SECONDS = 0.5

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Settings that the pool passes to each worker at start."""

    parent_pid: int
    max_jobs_per_worker: int | None = None
    nice_increment: int = 10
    log_level: int = logging.INFO
    # Linux only: ask the kernel to SIGKILL the worker when the supervisor dies.
    parent_death_signal: bool = True


def limit_native_threads(environ: dict[str, str] | os._Environ) -> None:
    """Set every variable in ``NATIVE_THREAD_VARIABLES`` to "1" in ``environ``."""
    for name in NATIVE_THREAD_VARIABLES:
        environ[name] = "1"


class _Sender:
    """Serialises sends on the worker's pipe, because log records come from any thread."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple[str, Any]) -> None:
        """Pickle ``message`` and write it; pickling errors leave the pipe untouched.

        A message larger than ``SPOOL_BYTES`` goes through a temporary file,
        and the pipe carries only the file's path. The supervisor reads each
        message whole, so a worker stopped halfway through writing a large
        one would otherwise block the supervisor, and with it the heartbeat
        of every other job.
        """
        # Pickling outside the lock keeps a large outcome from delaying log records.
        data = ForkingPickler.dumps(message)
        if len(data) > SPOOL_BYTES:
            data = ForkingPickler.dumps(("spooled", _spool(data)))
        with self._lock:
            self._conn.send_bytes(data)


def _spool(data: bytes) -> str:
    """Write ``data`` to a new temporary file and return its path; the reader deletes it."""
    descriptor, path = tempfile.mkstemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", suffix=".pickle")
    with os.fdopen(descriptor, "wb") as spool:
        spool.write(data)
    return path


# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class PipeLogHandler(logging.Handler):
    """Sends each log record to the supervisor, which re-emits it with its own handlers."""

    def __init__(self, sender: _Sender) -> None:
        super().__init__()
        self._sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload = {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": record.getMessage(),
                "created": record.created,
                "exc_text": _format_exception(record),
                "extra": _extra_fields(record),
            }
            self._sender.send(("log", payload))
        except OSError:
            pass  # The supervisor is gone, and the lifeline thread ends this process.
        except Exception:
            self.handleError(record)


def _format_exception(record: logging.LogRecord) -> str | None:
    parts = []
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return "\n".join(parts) or None


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {}
    for key, value in vars(record).items():
        if key in _STANDARD_RECORD_ATTRIBUTES:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = repr(value)
        fields[key] = value
    return fields


class ParentDeathSignal:
    """Linux ``PR_SET_PDEATHSIG``: the kernel SIGKILLs the worker when the supervisor dies.

    The setting belongs to the thread that calls prctl, so arm and disarm it
    from the worker's main thread only. A job that registered a process group
    disarms it: SIGKILL would leave that group running, while the lifeline
    thread kills the group before exiting.
    """

    def __init__(self, enabled: bool) -> None:
        self._libc = None
        self._owner = threading.main_thread()
        if enabled and sys.platform.startswith("linux"):
            self._libc = ctypes.CDLL(None, use_errno=True)
        self.armed = False

    def set(self, armed: bool) -> None:
        """Arm or disarm the signal; does nothing off Linux, when disabled, or off the main thread."""
        if self._libc is None or armed == self.armed or threading.current_thread() is not self._owner:
            return
        signal_number = signal.SIGKILL if armed else 0
        result = self._libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal_number), ctypes.c_ulong(0),
                                  ctypes.c_ulong(0), ctypes.c_ulong(0))
        if result != 0:
            error = ctypes.get_errno()
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(error),
                           extra={"event": "parent_death_signal_failed", "errno": error})
            return
        self.armed = armed


def kill_process_groups(pgids: list[int], signal_number: int) -> None:
    """Send ``signal_number`` to every group in ``pgids``, skipping groups that are gone."""
    for pgid in pgids:
        try:
            os.killpg(pgid, signal_number)
        except ProcessLookupError:
            pass
        except PermissionError as error:
            logger.warning("cannot signal process group %d: %s", pgid, error,
                           extra={"event": "process_group_kill_failed", "pgid": pgid})


def _watch_lifeline(lifeline: Connection, writer: SlotWriter) -> None:
    # Only the supervisor has the write end and never writes to it, so the
    # pipe becomes readable only when the supervisor closed it or died.
    # time.monotonic() is one system-wide clock on Linux and macOS, so the
    # supervisor's deadline compares with it directly.
    while True:
        try:
            if lifeline.poll(DEADLINE_CHECK_SECONDS):
                lifeline.recv_bytes()
                continue
        except (EOFError, OSError):
            break
        record = writer.record
        deadline = record.run_deadline
        if record.job_id and deadline and time.monotonic() > deadline:
            kill_process_groups(writer.process_groups, signal.SIGKILL)
            os._exit(EXIT_LEASE_DEADLINE)
    kill_process_groups(writer.process_groups, signal.SIGKILL)
    os._exit(EXIT_SUPERVISOR_GONE)


def _initialise(slot: int, progress_array, lifeline: Connection, config: WorkerConfig,
                sender: _Sender) -> tuple[SlotWriter, ParentDeathSignal]:
    writer = SlotWriter(progress_array, slot)
    watcher = threading.Thread(target=_watch_lifeline, args=(lifeline, writer), name="lifeline", daemon=True)
    watcher.start()

    # Ctrl-C reaches every process in the terminal's process group, and the
    # supervisor decides what happens to running jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A child inherits the signal mask across exec, and the supervisor may
    # block SIGTERM while it starts workers; terminate() relies on SIGTERM.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())

    root = logging.getLogger()
    root.handlers[:] = [PipeLogHandler(sender)]
    root.setLevel(config.log_level)
    logging.captureWarnings(True)

    parent_death = ParentDeathSignal(config.parent_death_signal)
    parent_death.set(True)
    if os.getppid() != config.parent_pid:
        os._exit(EXIT_SUPERVISOR_GONE)  # The supervisor died before prctl took effect.

    if config.nice_increment:
        try:
            os.nice(config.nice_increment)
        except OSError as error:
            logger.warning("cannot change worker priority by %d: %s", config.nice_increment, error,
                           extra={"event": "worker_nice_failed", "slot": slot})

    if os.environ.get(START_FAIL_VARIABLE) == "1":
        raise RuntimeError(f"worker start failed on purpose because {START_FAIL_VARIABLE}=1 (test hook)")
    # Import every analysis module now, so a broken one fails the start-up
    # instead of the first job that needs it.
    registry.all_analyses()
    return writer, parent_death


def worker_main(slot: int, conn: Connection, progress_array, lifeline: Connection, config: WorkerConfig) -> None:
    """Run tasks sent over ``conn`` until the pipe closes or the job limit is reached.

    ``lifeline`` is the read end of a pipe whose write end only the supervisor
    has. The process exits with 0 after a clean stop, ``EXIT_START_FAILED``
    when initialisation raised and ``EXIT_SUPERVISOR_GONE`` when the lifeline
    closed.
    """
    limit_native_threads(os.environ)
    sender = _Sender(conn)
    try:
        writer, parent_death = _initialise(slot, progress_array, lifeline, config, sender)
    except Exception:
        try:
            sender.send(("start_failed", traceback.format_exc()))
        except OSError:
            pass
        _exit(EXIT_START_FAILED)

    try:
        sender.send(("started", {"pid": os.getpid()}))
    except OSError:
        _exit(EXIT_SUPERVISOR_GONE)
    jobs_done = 0
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            # The pool closed the pipe: a clean stop.
            break
        if kind != "task":
            logger.error("ignoring message of unknown kind %r", kind,
                         extra={"event": "worker_message_invalid", "slot": slot})
            continue

        outcome = run_task(payload, writer, parent_death, slot)
        _send_outcome(sender, outcome)
        jobs_done += 1
        if config.max_jobs_per_worker is not None and jobs_done >= config.max_jobs_per_worker:
            logger.info("worker %d exits after %d jobs", os.getpid(), jobs_done,
                        extra={"event": "worker_retiring", "slot": slot})
            break
    _exit(0)


def _exit(code: int) -> None:
    # os._exit skips joining threads that a body may have left running.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)


def _send_outcome(sender: _Sender, outcome: dict[str, Any]) -> None:
    try:
        sender.send(("outcome", outcome))
    except OSError:
        _exit(EXIT_SUPERVISOR_GONE)
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as error:
        logger.error("cannot send the outcome of job %s: %s", outcome["job_id"], error,
                     extra={"event": "outcome_send_failed", "job_id": outcome["job_id"]})
        sender.send(("outcome", _failed(outcome["job_id"], outcome["attempt_token"], "analysis_error",
                                        f"the outcome could not be sent to the supervisor: {error!r}",
                                        results=outcome["results"])))


def run_task(task: dict[str, Any], writer: SlotWriter, parent_death: ParentDeathSignal, slot: int) -> dict[str, Any]:
    """Run one task through its analysis body and return the outcome message."""
    job_id = task["job_id"]
    token = task["attempt_token"]
    # terminate() relies on SIGTERM's default action, and an earlier body may have changed it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    writer.begin_job(job_id, task["attempt"])
    extra = {"job_id": job_id, "attempt": task["attempt"], "slot": slot, "analysis": task["analysis"]}
    # DEBUG: the supervisor logs the claim and the outcome at INFO already.
    logger.debug("job %d started: %s", job_id, task["analysis"], extra={"event": "job_started", **extra})
    started = time.monotonic()
    context = None
    try:
        analysis = registry.get(task["analysis"])
        context = JobContext(task, writer, slot, on_process_group=lambda: parent_death.set(False))
        # Validate again: it fills in defaults of parameters added since the
        # job was submitted, and rejects rows edited by hand.
        params = analysis.validate_params(task["params"])
        summary = analysis.body(params, context)
        outcome = _succeeded(job_id, token, summary, context.results)
    except Cancelled:
        outcome = _base(job_id, token, "cancelled", context)
        outcome["error"] = {"code": "cancelled", "message": "the job stopped at a cancel check",
                            "details": {"stage": "cooperative"}, "traceback": None}
    except Exception as error:
        outcome = _failed_from_exception(job_id, token, error, context)
    finally:
        writer.end_job()
        parent_death.set(True)

    level = logging.DEBUG if outcome["status"] in ("succeeded", "cancelled") else logging.WARNING
    error_code = outcome["error"]["code"] if outcome["error"] else None
    logger.log(level, "job %d %s in %.3f s", job_id, outcome["status"], time.monotonic() - started,
               extra={"event": "job_finished", "status": outcome["status"], "error_code": error_code, **extra})
    return outcome


def _base(job_id: int, token: str, status: str, context: JobContext | None) -> dict[str, Any]:
    results = context.results if context is not None else []
    return {"job_id": job_id, "attempt_token": token, "status": status, "summary": None,
            "results": results, "error": None, "retryable": False}


def _succeeded(job_id: int, token: str, summary: Any, results: list[dict[str, Any]]) -> dict[str, Any]:
    try:
        # Round-tripping leaves only JSON types (NaN included), so the
        # supervisor never unpickles an analysis's own classes.
        summary = to_json_value(summary)
    except (TypeError, ValueError, RecursionError) as error:
        return _failed(job_id, token, "analysis_error",
                       f"the summary returned by the analysis is not JSON-serialisable: {error}", results=results)
    outcome = {"job_id": job_id, "attempt_token": token, "status": "succeeded", "summary": summary,
               "results": results, "error": None, "retryable": False}
    return outcome


def _failed(job_id: int, token: str, code: str, message: str, *, details: dict | None = None,
            trace: str | None = None, retryable: bool = False, results: list | None = None) -> dict[str, Any]:
    return {"job_id": job_id, "attempt_token": token, "status": "failed", "summary": None,
            "results": results or [], "retryable": retryable,
            "error": {"code": code, "message": message, "details": details or {}, "traceback": trace}}


def _failed_from_exception(job_id: int, token: str, error: Exception, context: JobContext | None) -> dict[str, Any]:
    trace = traceback.format_exc()
    results = context.results if context is not None else []
    if isinstance(error, AnalysisError):
        try:
            details = to_json_value(error.details, default=repr)
        except (TypeError, ValueError, RecursionError):
            details = {"repr": repr(error.details)}
        return _failed(job_id, token, error.code, error.message, details=details, trace=trace,
                       retryable=bool(error.retryable), results=results)
    if isinstance(error, MemoryError):
        return _failed(job_id, token, "memory_limit", f"the analysis ran out of memory: {error!r}",
                       trace=trace, results=results)
    return _failed(job_id, token, "analysis_error", f"{type(error).__name__}: {error}", trace=trace,
                   results=results)
