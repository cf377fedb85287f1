"""A pool of long-lived worker processes that can stop any one task without disturbing the others.

Each slot has one worker process running one task at a time. Workers share
no locks or queues, because a lock held by a killed process is never
released. Each has its own duplex pipe, its own lifeline pipe and its own
record in the shared progress array.

Data flow::

    supervisor main loop (supervisor/loop.py)
       |  dispatch / request_cancel / terminate        ^  wait(): Outcomes
       v                                               |  read_progress(): Snapshots
    WorkerPool ---------------------------------------------------------------+
       |  task pipe (duplex)       process sentinel     lifeline (write end)  |
       |  ("task", dict) --->      readable on exit     never written; EOF    |
       |  <--- ("started" | "log" | "outcome", ...)     when the pool closes  |
       |                                                 or the supervisor dies
       v                                                                      |
    worker process per slot (supervisor/worker.py)                            |
       |  SlotWriter: progress, phase, process groups  (seqlock)              |
       v                                                                      |
    shared RawArray of SlotRecord (supervisor/progress.py) <--- read_slot ----+
                                 cancel flag <------------------ set_cancel --+

The pool is not thread-safe: call it from the supervisor's main loop only.
No method blocks for long. ``terminate`` sends SIGTERM and returns; ``wait``
sends SIGKILL once the grace period has passed, so the caller must keep
calling ``wait``.

NOTE: when a worker has started writing a message, ``wait`` reads the whole
message before returning. A worker stopped (SIGSTOP) halfway through a large
outcome would block ``wait`` until it resumes or dies.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import multiprocessing
import os
import pickle
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import wait as wait_for_objects
from typing import Any

from supervisor import progress
from supervisor.pool_state import (Outcome, Run, Slot, Task, Termination, WorkerHandle, describe_exit,
                                   exit_details, reemit_log, spawn_worker, terminated_outcome,
                                   worker_died_outcome)
from supervisor.worker import SPOOL_PREFIX, WorkerConfig, kill_process_groups

__all__ = ["Outcome", "Task", "WorkerPool"]

logger = logging.getLogger(__name__)

# Time a worker that closed its pipe gets to exit before the pool kills it.
_EXIT_AFTER_EOF_SECONDS = 5.0
# Messages read from one worker per pass, so a worker that logs heavily cannot starve the others.
_MAX_MESSAGES_PER_PASS = 1000


class WorkerPool:
    """Workers on ``slots`` slots, each started with the spawn method and running one task at a time.

    ``max_jobs_per_worker`` replaces a worker after that many tasks (None:
    never). A worker that sends no handshake within
    ``worker_start_timeout_seconds`` is killed and counts as a start-up
    failure. Restarts after consecutive start-up failures wait
    ``restart_backoff_seconds``, doubling up to ``max_restart_backoff_seconds``.
    ``nice_increment`` lowers the workers' priority. ``parent_death_signal``
    enables PR_SET_PDEATHSIG on Linux (see ``supervisor.worker.ParentDeathSignal``).
    """

    def __init__(self, slots: int, *, max_jobs_per_worker: int | None = None,
                 worker_start_timeout_seconds: float = 30.0, nice_increment: int = 10,
                 restart_backoff_seconds: float = 1.0, max_restart_backoff_seconds: float = 60.0,
                 parent_death_signal: bool = True) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if max_jobs_per_worker is not None and max_jobs_per_worker < 1:
            raise ValueError(f"max_jobs_per_worker must be None or >= 1, got {max_jobs_per_worker}")
        self._context = multiprocessing.get_context("spawn")
        self._records = progress.ProgressRecords(slots, self._context)
        self._slots = [Slot(index) for index in range(slots)]
        self._start_timeout = worker_start_timeout_seconds
        self._backoff = restart_backoff_seconds
        self._max_backoff = max_restart_backoff_seconds
        self._max_jobs = max_jobs_per_worker
        self._nice_increment = nice_increment
        self._parent_death_signal = parent_death_signal
        self._outcomes: list[Outcome] = []
        self._started = False
        self._closed = False
        self._exit_hook = None

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(grace_seconds=2.0)

    # Public API used by the supervisor loop.

    def start(self) -> None:
        """Start a worker on every slot and wait up to the start timeout for their handshakes.

        Raises RuntimeError, after stopping everything, when no worker started.
        Slots whose worker failed are retried later with backoff.
        """
        if self._started:
            raise RuntimeError("the pool was already started")
        self._started = True
        pool_reference = weakref.ref(self)

        def close_at_exit() -> None:
            pool = pool_reference()
            if pool is not None:
                pool.close(grace_seconds=1.0)

        # Runs before multiprocessing's own exit handler, which would otherwise
        # wait forever for non-daemon workers whose lifeline is still open.
        self._exit_hook = close_at_exit
        atexit.register(close_at_exit)

        for slot in self._slots:
            self._start_worker(slot)
        deadline = time.monotonic() + self._start_timeout + 1.0
        while time.monotonic() < deadline and any(slot.is_starting() for slot in self._slots):
            self._pump(min(0.1, deadline - time.monotonic()))
            self._run_timers()
        if not any(slot.worker is not None and slot.worker.ready for slot in self._slots):
            errors = [slot.last_start_error for slot in self._slots if slot.last_start_error]
            self.close(grace_seconds=1.0)
            detail = errors[0] if errors else "no handshake within the start timeout"
            raise RuntimeError(f"no worker of the pool started; first error:\n{detail}")

    def free_slots(self) -> list[int]:
        """Return the idle slots whose worker is ready for a task."""
        return [slot.index for slot in self._slots if slot.is_free()]

    def dispatch(self, slot: int, task: Task) -> None:
        """Send ``task`` to the worker on ``slot``, or queue it until that worker is ready.

        A slot waiting to restart after start-up failures fails the task with
        ``worker_died`` (stage "startup") at the next ``wait``. Raises
        ValueError when the slot already has a task or the job runs elsewhere.
        """
        self._check_open()
        target = self._slots[slot]
        if target.run is not None:
            raise ValueError(f"slot {slot} already runs job {target.run.task.job_id}")
        if any(other.run is not None and other.run.task.job_id == task.job_id for other in self._slots):
            raise ValueError(f"job {task.job_id} already runs on another slot")

        self._records.set_cancel(slot, False)
        self._records.set_run_deadline(slot, 0.0)
        target.run = Run(task)
        if target.worker is None:
            message = f"the worker of slot {slot} failed to start and is waiting to restart"
            self._finish(target, worker_died_outcome(task, message, {"stage": "startup"}))
            return
        self._send_pending(target)

    def wait(self, timeout: float, extra: Sequence[Any] = ()) -> list[Outcome]:
        """Return the outcomes that finished, waiting up to ``timeout`` seconds for the first.

        Also returns, possibly with no outcomes, as soon as one of ``extra``
        is ready to read. ``extra`` takes what ``multiprocessing.connection.wait``
        takes (connections, sockets, file descriptors). Meanwhile it reads
        log records and handshakes, replaces dead workers and sends SIGKILL to
        terminated workers whose grace period has passed.
        """
        self._check_open()
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            self._run_timers()
            if self._outcomes:
                break
            now = time.monotonic()
            extra_ready = self._pump(max(0.0, min(deadline, self._next_timer(deadline)) - now), extra)
            self._run_timers()
            if self._outcomes or extra_ready or time.monotonic() >= deadline:
                break
        outcomes, self._outcomes = self._outcomes, []
        return outcomes

    def read_progress(self) -> dict[int, progress.Snapshot]:
        """Return the latest progress snapshot of each running job, keyed by job id."""
        snapshots = {}
        for slot in self._slots:
            if slot.run is None or not slot.run.sent:
                continue
            snapshot = self._records.read_slot(slot.index)
            if snapshot is not None and snapshot.job_id == slot.run.task.job_id:
                snapshots[snapshot.job_id] = snapshot
        return snapshots

    def request_cancel(self, job_id: int, attempt_token: str) -> bool:
        """Set the cancel flag for that exact run; return False when it is not on any slot."""
        slot = self._find_run(job_id, attempt_token)
        if slot is None:
            return False
        self._records.set_cancel(slot.index, True)
        logger.info("cancel requested for job %d on slot %d", job_id, slot.index,
                    extra={"event": "cancel_requested", "job_id": job_id, "slot": slot.index})
        return True

    def set_run_deadline(self, job_id: int, attempt_token: str, deadline: float) -> bool:
        """Tell the worker running that exact run to stop by itself after ``deadline``.

        ``deadline`` is a ``time.monotonic()`` value. A worker past it kills
        its process groups and exits, so a supervisor that stalls (stopped,
        swapped out, cut off from the database) cannot keep running a job
        whose lease another supervisor may already have taken over. Returns
        False when the run is not on any slot.
        """
        slot = self._find_run(job_id, attempt_token)
        if slot is None:
            return False
        self._records.set_run_deadline(slot.index, deadline)
        return True

    def terminate(self, job_id: int, attempt_token: str, *, grace_seconds: float = 2.0,
                  outcome_status: str = "cancelled", error: dict | None = None,
                  retryable: bool = False) -> bool:
        """Send SIGTERM to the worker running that exact run and to its process groups.

        Returns False when the run is not on any slot. Later ``wait`` calls
        send SIGKILL once ``grace_seconds`` have passed, replace the worker,
        and return an Outcome with ``outcome_status`` ("cancelled" or
        "failed"). ``error`` (code, message, details) sets the outcome's
        error; its details gain ``stage``: "terminate" when SIGTERM sufficed,
        "kill" when SIGKILL was needed. If the worker sends its own outcome
        before the signal takes effect, ``wait`` returns that one instead.
        """
        if outcome_status not in ("cancelled", "failed"):
            raise ValueError(f"outcome_status must be 'cancelled' or 'failed', got {outcome_status!r}")
        slot = self._find_run(job_id, attempt_token)
        if slot is None:
            return False
        run = slot.run
        if not run.sent:
            # The worker never saw the task, so nothing needs a signal.
            self._finish(slot, terminated_outcome(run.task, outcome_status, error, retryable, "terminate", None))
            return True
        termination = slot.worker.termination
        if termination is not None:
            termination.kill_deadline = min(termination.kill_deadline, time.monotonic() + grace_seconds)
            return True

        # If the outcome already waits in the pipe, the run is over and needs no signal.
        self._read_messages(slot)
        if self._find_run(job_id, attempt_token) is not slot:
            return False
        worker = slot.worker
        worker.termination = Termination(worker.pid, job_id, attempt_token, outcome_status, error, retryable,
                                         time.monotonic() + grace_seconds)
        logger.info("terminating job %d on slot %d (worker %d, grace %.1f s)", job_id, slot.index, worker.pid,
                    grace_seconds, extra={"event": "job_terminating", "job_id": job_id, "slot": slot.index})
        kill_process_groups(self._records.process_groups(slot.index), signal.SIGTERM)
        worker.process.terminate()
        if grace_seconds <= 0:
            self._kill_terminated(slot)
        return True

    def running(self) -> dict[int, tuple[int, str, int | None]]:
        """Return job id -> (slot, attempt token, worker pid) for every task on a slot.

        The pid is None while the slot waits to restart its worker.
        """
        result = {}
        for slot in self._slots:
            if slot.run is not None:
                pid = slot.worker.pid if slot.worker is not None else None
                result[slot.run.task.job_id] = (slot.index, slot.run.task.attempt_token, pid)
        return result

    def worker_pids(self) -> list[int]:
        """Return the pids of all worker processes that have not been reaped yet."""
        return [slot.worker.pid for slot in self._slots if slot.worker is not None]

    def close(self, grace_seconds: float) -> None:
        """Stop every worker and its process groups, and join the processes.

        Closes the lifelines and pipes, sends SIGTERM, and SIGKILL to workers
        still alive after ``grace_seconds``. Tasks still running get no
        Outcome, only a warning in the log.
        """
        if self._closed:
            return
        self._closed = True
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)
        workers = [(slot, slot.worker) for slot in self._slots if slot.worker is not None]
        for slot in self._slots:
            if slot.run is not None:
                logger.warning("job %d dropped because the pool is closing", slot.run.task.job_id,
                               extra={"event": "job_dropped", "job_id": slot.run.task.job_id, "slot": slot.index})
        for _, worker in workers:
            worker.close_pipes()
            worker.process.terminate()
        deadline = time.monotonic() + max(grace_seconds, 0.0)
        for _, worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for slot, worker in workers:
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join(5.0)
            kill_process_groups(self._records.process_groups(slot.index), signal.SIGKILL)
            slot.worker = None
            slot.run = None
        logger.info("worker pool closed", extra={"event": "pool_closed"})

    # Worker life cycle.

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the worker pool is closed")

    def _start_worker(self, slot: Slot) -> None:
        slot.next_start_at = None
        self._records.reset_slot(slot.index)
        config = WorkerConfig(
            parent_pid=os.getpid(),
            max_jobs_per_worker=self._max_jobs,
            nice_increment=self._nice_increment,
            log_level=logging.getLogger().getEffectiveLevel(),
            # PR_SET_PDEATHSIG fires when the thread that started the child
            # exits, so it is safe only for workers started by the main thread.
            parent_death_signal=self._parent_death_signal and threading.current_thread() is threading.main_thread(),
        )
        try:
            slot.worker = spawn_worker(self._context, slot.index, self._records.array, config, self._start_timeout)
        except OSError as error:
            # For example EAGAIN from fork or EMFILE: retry later like any start-up failure.
            self._on_start_failure(slot, None, f"cannot start a worker process: {error}", {})

    def _pump(self, timeout: float, extra: Sequence[Any] = ()) -> bool:
        """Wait up to ``timeout`` for pipes, sentinels and ``extra``, and handle what became ready.

        Returns whether one of ``extra`` is ready.
        """
        owners: dict[Any, tuple[Slot | None, str]] = {item: (None, "extra") for item in extra}
        for slot in self._slots:
            if slot.worker is None:
                continue
            if slot.worker.conn is not None:
                owners[slot.worker.conn] = (slot, "conn")
            owners[slot.worker.process.sentinel] = (slot, "sentinel")
        if not owners:
            time.sleep(timeout)
            return False
        ready = wait_for_objects(list(owners), timeout)
        # Pipes first: a worker that exits right after sending its outcome must
        # have that outcome read before its exit is handled.
        ready.sort(key=lambda item: owners[item][1] != "conn")
        extra_ready = False
        for item in ready:
            slot, kind = owners[item]
            if kind == "extra":
                extra_ready = True
                continue
            if slot.worker is None:
                continue
            if kind == "conn":
                self._read_messages(slot)
            elif slot.worker.process.sentinel == item:
                self._on_exit(slot)
        return extra_ready

    def _read_messages(self, slot: Slot, limit: int | None = _MAX_MESSAGES_PER_PASS) -> None:
        """Read and handle the slot's pending messages, at most ``limit`` (None: all)."""
        worker = slot.worker
        count = 0
        while limit is None or count < limit:
            count += 1
            if worker.conn is None:
                return
            try:
                if not worker.conn.poll():
                    return
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                worker.conn.close()
                worker.conn = None
                worker.eof_deadline = time.monotonic() + _EXIT_AFTER_EOF_SECONDS
                return
            except Exception as error:
                # A message that cannot be unpickled leaves the stream in an unknown state.
                logger.error("invalid message from worker %d: %r; killing it", worker.pid, error,
                             extra={"event": "worker_message_invalid", "slot": slot.index, "pid": worker.pid})
                worker.conn.close()
                worker.conn = None
                worker.process.kill()
                return
            self._on_message(slot, kind, payload)

    def _on_message(self, slot: Slot, kind: str, payload: Any) -> None:
        worker = slot.worker
        if kind == "spooled":
            # A large message, written to a file by the worker; see worker._Sender.send.
            path = payload
            try:
                with open(path, "rb") as spool:
                    kind, payload = pickle.loads(spool.read())
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if kind == "log":
            reemit_log(slot.index, worker.pid, payload)
        elif kind == "outcome":
            self._on_outcome(slot, payload)
        elif kind == "started":
            worker.ready = True
            slot.start_failures = 0
            slot.last_start_error = None
            logger.info("worker %d ready on slot %d", worker.pid, slot.index,
                        extra={"event": "worker_started", "slot": slot.index, "pid": worker.pid})
            self._send_pending(slot)
        elif kind == "start_failed":
            worker.start_error = payload
        else:
            logger.error("ignoring message of unknown kind %r from worker %d", kind, worker.pid,
                         extra={"event": "worker_message_invalid", "slot": slot.index, "pid": worker.pid})

    def _on_outcome(self, slot: Slot, message: dict[str, Any]) -> None:
        worker = slot.worker
        run = slot.run
        if run is None or run.task.attempt_token != message["attempt_token"]:
            logger.error("ignoring outcome of job %s from worker %d: that run is not on slot %d",
                         message.get("job_id"), worker.pid, slot.index,
                         extra={"event": "outcome_unexpected", "slot": slot.index, "job_id": message.get("job_id")})
            return
        worker.jobs_done += 1
        if self._max_jobs is not None and worker.jobs_done >= self._max_jobs:
            worker.retire_deadline = time.monotonic() + self._start_timeout
        self._finish(slot, Outcome(
            job_id=message["job_id"], attempt_token=message["attempt_token"], status=message["status"],
            summary=message["summary"], results=tuple(message["results"]), error=message["error"],
            retryable=message["retryable"],
        ))

    def _on_exit(self, slot: Slot) -> None:
        """Handle the exit of the slot's worker: report its task, kill its groups, replace it."""
        worker = slot.worker
        worker.process.join(1.0)
        # Everything the worker sent before exiting counts, its outcome included.
        self._read_messages(slot, limit=None)
        exit_code = worker.process.exitcode
        worker.close_pipes()
        if exit_code is not None:
            worker.process.close()
        kill_process_groups(self._records.process_groups(slot.index), signal.SIGKILL)
        remove_spool_files(worker.pid)
        slot.worker = None
        details = exit_details(exit_code)
        extra = {"slot": slot.index, "pid": worker.pid, **details}

        if not worker.ready:
            reason = worker.start_error or f"the worker exited ({describe_exit(details)})"
            self._on_start_failure(slot, worker.pid, reason, details)
            return
        if slot.run is not None and slot.run.sent:
            self._report_exit(slot, worker, details)
        elif worker.retire_deadline is not None and exit_code == 0:
            logger.info("worker %d retired after %d jobs", worker.pid, worker.jobs_done,
                        extra={"event": "worker_retired", **extra})
        else:
            logger.warning("idle worker %d exited (%s)", worker.pid, describe_exit(details),
                           extra={"event": "worker_died", **extra})
        self._start_worker(slot)

    def _report_exit(self, slot: Slot, worker: WorkerHandle, details: dict[str, Any]) -> None:
        task = slot.run.task
        termination = worker.termination
        if termination is not None:
            stage = "kill" if termination.killed else "terminate"
            self._finish(slot, terminated_outcome(task, termination.status, termination.error, termination.retryable,
                                           stage, details))
            logger.info("job %d terminated (stage %s)", task.job_id, stage,
                        extra={"event": "job_terminated", "job_id": task.job_id, "slot": slot.index, "stage": stage})
            return
        message = f"worker process {worker.pid} died while running the job ({describe_exit(details)})"
        logger.error("job %d: %s", task.job_id, message,
                     extra={"event": "worker_died", "job_id": task.job_id, "slot": slot.index, **details})
        self._finish(slot, worker_died_outcome(task, message, details))

    def _on_start_failure(self, slot: Slot, pid: int | None, reason: str, details: dict[str, Any]) -> None:
        slot.worker = None
        slot.start_failures += 1
        delay = min(self._backoff * 2 ** (slot.start_failures - 1), self._max_backoff)
        slot.next_start_at = time.monotonic() + delay
        slot.last_start_error = reason
        logger.error("worker %s on slot %d failed to start; retrying in %.1f s: %s",
                     pid, slot.index, delay, reason,
                     extra={"event": "worker_start_failed", "slot": slot.index, "pid": pid,
                            "failures": slot.start_failures, **details})
        if slot.run is not None:
            message = f"the worker of slot {slot.index} failed to start: {slot.last_start_error}"
            self._finish(slot, worker_died_outcome(slot.run.task, message, {"stage": "startup", **details}))

    def _send_pending(self, slot: Slot) -> None:
        worker = slot.worker
        if slot.run is None or slot.run.sent or not slot.worker_ready():
            return
        slot.run.sent = True
        try:
            # A shallow copy: pickling copies the parameters anyway, and
            # dataclasses.asdict's deep copy cost more than the send.
            worker.conn.send(("task", dict(vars(slot.run.task))))
        except OSError as error:
            # The worker is dying; its exit turns the run into worker_died.
            logger.warning("cannot send job %d to worker %d: %s", slot.run.task.job_id, worker.pid, error,
                           extra={"event": "dispatch_failed", "job_id": slot.run.task.job_id, "slot": slot.index})

    def _finish(self, slot: Slot, outcome: Outcome) -> None:
        slot.run = None
        self._outcomes.append(outcome)

    def _find_run(self, job_id: int, attempt_token: str) -> Slot | None:
        for slot in self._slots:
            run = slot.run
            if run is not None and run.task.job_id == job_id and run.task.attempt_token == attempt_token:
                return slot
        return None

    # Timers: start timeouts, SIGKILL escalation, restarts after backoff.

    def _run_timers(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            worker = slot.worker
            if worker is None:
                if slot.next_start_at is not None and now >= slot.next_start_at and not self._closed:
                    self._start_worker(slot)
                continue
            # Each deadline is moved to infinity once acted on, so that
            # _next_timer does not make wait() spin until the exit shows.
            if not worker.ready and now >= worker.start_deadline:
                worker.start_error = worker.start_error or f"no handshake within {self._start_timeout:.1f} s"
                worker.start_deadline = float("inf")
                worker.process.kill()
            if worker.termination is not None and not worker.termination.killed \
                    and now >= worker.termination.kill_deadline:
                self._kill_terminated(slot)
            if worker.retire_deadline is not None and now >= worker.retire_deadline:
                worker.retire_deadline = float("inf")
                worker.process.kill()
            if worker.eof_deadline is not None and now >= worker.eof_deadline:
                worker.eof_deadline = float("inf")
                worker.process.kill()

    def _next_timer(self, default: float) -> float:
        return min([default, *(slot.next_deadline() for slot in self._slots)])

    def _kill_terminated(self, slot: Slot) -> None:
        worker = slot.worker
        termination = worker.termination if worker is not None else None
        # Signal only the process and run this termination was for. The run
        # may have ended meanwhile, but a terminating worker never gets
        # another one. An unreaped child keeps its pid, so the pid cannot
        # belong to another process yet.
        if termination is None or worker.pid != termination.pid:
            return
        run = slot.run
        if run is not None and (run.task.job_id, run.task.attempt_token) != (termination.job_id,
                                                                             termination.attempt_token):
            logger.error("not killing worker %d: it runs job %d, not the terminated job %d", worker.pid,
                         run.task.job_id, termination.job_id,
                         extra={"event": "kill_skipped", "slot": slot.index, "job_id": termination.job_id})
            return
        termination.killed = True
        logger.warning("worker %d did not stop after SIGTERM; sending SIGKILL", worker.pid,
                       extra={"event": "job_killed", "slot": slot.index, "pid": worker.pid})
        kill_process_groups(self._records.process_groups(slot.index), signal.SIGKILL)
        worker.process.kill()


def remove_spool_files(pid: int) -> None:
    """Delete the spool files a dead worker left half written."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{SPOOL_PREFIX}{pid}-*.pickle")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
