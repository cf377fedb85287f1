"""The supervisor process: claims jobs from Postgres and runs them in the worker pool.

One thread runs the main loop; a second only LISTENs for notifications::

    Postgres ──NOTIFY──▶ Listener thread ──wake-up socket──┐
       ▲                                                    ▼
       │  claim / heartbeat / progress / finish     ┌──────────────┐
       └────────────────────────────────────────────│  main loop   │
                                                    └──────┬───────┘
                            dispatch, cancel flag,         │ outcomes, deaths,
                            terminate                      ▼ progress records
                                                    WorkerPool (one process per slot)

Each pass of the loop: drain notifications; renew leases (heartbeat); sweep
expired leases and deadlines; apply cancel requests, run timeouts and grace
periods; claim as many jobs as there are free slots unless throttled; write
progress; then wait for the next outcome, notification or deadline. Any
database error is logged and retried with backoff while jobs keep running;
outcomes that could not be written are kept and written later.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

import sqlalchemy as sa

from analyses import registry
from supervisor import config as config_module
from supervisor import db, logs, rates, runs, store, sweeps
from supervisor.errors import ErrorCode, ServiceError
from supervisor.listener import Listener
from supervisor.pool import Outcome, Task, WorkerPool
from supervisor.throttle import Reader, Throttle

logger = logging.getLogger(__name__)

VERSION = "0.1.0"

# Exit codes of `analysisctl supervisor run`.
EXIT_OK = 0
EXIT_START_FAILED = 3
EXIT_FORCED = 4

# A progress event (as opposed to the row update) is recorded at most this
# often per job, so the event history stays small for long jobs.
PROGRESS_EVENT_SECONDS = 10.0
# How often lease recovery and expiry sweeps run.
SWEEP_SECONDS = 5.0
THROTTLE_SECONDS = 2.0
DB_RETRY_SECONDS_MAX = 10.0


@dataclasses.dataclass
class Run:
    """A job attempt this supervisor is running, with its stop bookkeeping."""

    job: store.Job
    slot: int
    started: float
    # Why a stop was requested: "cancel", "timeout" or "shutdown"; None while running normally.
    stop_reason: str | None = None
    stop_deadline: float | None = None
    terminated: bool = False
    last_progress: tuple | None = None
    last_progress_write: float = 0.0
    last_progress_event: float = 0.0
    last_phase: str | None = None

    @property
    def token(self) -> uuid.UUID:
        return self.job.attempt_token


class Supervisor:
    """One supervisor run: its id, pool, database engine and running jobs."""

    def __init__(self, settings: config_module.Config, engine: sa.Engine):
        self.settings = settings
        self.engine = engine
        self.id = uuid.uuid4()
        self.slots = settings.effective_workers
        self.pool = WorkerPool(
            self.slots,
            max_jobs_per_worker=settings.max_jobs_per_worker,
            worker_start_timeout_seconds=settings.worker_start_timeout_seconds,
        )
        self.runs: dict[int, Run] = {}
        self.pending: list[tuple[Run, Outcome]] = []
        self.stopping = False
        self.forced = False
        self.wake_claim = True
        self.wake_cancel = True
        self.next_heartbeat = 0.0
        self.next_sweep = 0.0
        self.next_poll = 0.0
        self.next_throttle = 0.0
        self.db_backoff = 0.0
        self.db_retry_at = 0.0
        # Postgres backends serving this supervisor, when the server runs on
        # this machine: their CPU is the service's own load, not pressure
        # from other programs.
        self.backend_pids: set[int] = set()
        if is_local_database(engine.url):
            sa.event.listen(engine, "checkout", self._remember_backend)
        self.throttle = Throttle(Reader(self.own_pids))
        self.results_dir = settings.effective_results_dir
        # Passed to analyses that read sensor readings from a table; the
        # resolved URL, so it also points at an embedded server.
        self.database_url = engine.url.render_as_string(hide_password=False)
        self.listener: Listener | None = None

    def _remember_backend(self, dbapi_connection, _record, _proxy) -> None:
        self.backend_pids.add(dbapi_connection.info.backend_pid)

    def own_pids(self) -> list[int]:
        pids = [*self.pool.worker_pids(), *self.backend_pids]
        if self.listener is not None and self.listener.backend_pid:
            pids.append(self.listener.backend_pid)
        return pids

    def log_extra(self, event: str, run: Run | None = None, **fields: Any) -> dict[str, Any]:
        extra: dict[str, Any] = {"event": event, "supervisor_id": str(self.id)}
        if run is not None:
            extra.update(job_id=run.job.id, attempt=run.job.attempt, analysis=run.job.analysis, slot=run.slot)
        extra.update(fields)
        return extra

    # Start and stop ------------------------------------------------------

    def start(self) -> None:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        # Workers inherit the signal mask: block the stop signals while
        # starting them, so a Ctrl-C during start-up reaches only us.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self.pool.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        runs.register_supervisor(self.engine, self.id, host=socket.gethostname(), pid=os.getpid(),
                                 version=VERSION, slots=self.slots)
        self.listener = Listener(self.database_url, [store.WORK_CHANNEL], str(self.id))
        self.listener.start()
        logger.info("supervisor started", extra=self.log_extra("supervisor_started", slots=self.slots,
                                                                 pid=os.getpid()))

    def request_stop(self, signum: int, _frame=None) -> None:
        if self.stopping:
            logger.critical("second stop signal; exiting now", extra=self.log_extra("supervisor_forced_exit"))
            self.forced = True
            self.pool.close(grace_seconds=0)
            os._exit(EXIT_FORCED)
        logger.info("stop requested", extra=self.log_extra("supervisor_stopping", signal=signal.Signals(signum).name))
        self.stopping = True
        # Interrupt the wait in the main loop.
        if self.listener is not None:
            self.listener._put({"kind": "stop"})

    def shutdown(self) -> None:
        """Stop running jobs within the shutdown grace, re-queue them and release everything."""
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds
        for run in self.runs.values():
            self.ask_to_stop(run, "shutdown", deadline)
        while self.runs and time.monotonic() < deadline:
            self.handle_outcomes(self.pool.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic()))))
        for run in list(self.runs.values()):
            self.pool.terminate(run.job.id, str(run.token), grace_seconds=0.5)
        end = time.monotonic() + 2.0
        while self.runs and time.monotonic() < end:
            self.handle_outcomes(self.pool.wait(timeout=0.1))
        for run in list(self.runs.values()):
            self.requeue(run, "shutdown")
        self.flush_pending()
        self.pool.close(grace_seconds=1.0)
        if self.listener is not None:
            self.listener.close()
        try:
            runs.stop_supervisor(self.engine, self.id)
        except sa.exc.SQLAlchemyError as error:
            logger.error("could not mark supervisor stopped", extra=self.log_extra("db_error", error=str(error)))
        logger.info("supervisor stopped", extra=self.log_extra("supervisor_stopped"))

    # Main loop -----------------------------------------------------------

    def run_forever(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            if now >= self.db_retry_at:
                try:
                    self.tick(now)
                    self.db_backoff = 0.0
                except sa.exc.OperationalError as error:
                    self.db_backoff = min(DB_RETRY_SECONDS_MAX, max(0.5, self.db_backoff * 2))
                    self.db_retry_at = time.monotonic() + self.db_backoff
                    logger.warning("database unavailable; retrying",
                                   extra=self.log_extra("db_unavailable", error=str(error.orig),
                                                        retry_in_seconds=self.db_backoff))
            self.enforce_deadlines(time.monotonic())
            timeout = self.next_wake(time.monotonic())
            extra = [self.listener.wakeup] if self.listener is not None else []
            self.handle_outcomes(self.pool.wait(timeout=timeout, extra=extra))
            self.read_notifications()

    def tick(self, now: float) -> None:
        self.flush_pending()
        if now >= self.next_heartbeat:
            self.heartbeat()
            self.next_heartbeat = now + self.settings.heartbeat_seconds
        if now >= self.next_sweep:
            self.sweep()
            self.next_sweep = now + SWEEP_SECONDS
        if now >= self.next_throttle:
            if self.throttle.update():
                self.log_throttle()
            self.next_throttle = now + THROTTLE_SECONDS
        if now >= self.next_poll:
            self.wake_claim = self.wake_cancel = True
            self.next_poll = now + self.settings.poll_seconds
        if self.wake_cancel:
            self.wake_cancel = False
            self.apply_cancel_requests()
        if self.wake_claim:
            self.wake_claim = False
            self.claim()
        self.write_progress(now)

    def next_wake(self, now: float) -> float:
        wake = min(self.next_poll, self.next_heartbeat, now + self.settings.progress_interval_seconds)
        for run in self.runs.values():
            if run.stop_deadline is not None:
                wake = min(wake, run.stop_deadline)
        if self.db_retry_at > now:
            wake = max(wake, self.db_retry_at) if not self.runs else min(wake, self.db_retry_at)
        return max(0.0, min(wake - now, self.settings.poll_seconds))

    def read_notifications(self) -> None:
        if self.listener is None:
            return
        for note in self.listener.drain():
            kind = note.get("kind")
            if kind in ("queued", "reconnected"):
                self.wake_claim = True
            if kind in ("cancel", "reconnected"):
                self.wake_cancel = True

    # Claim and dispatch --------------------------------------------------

    def claim(self) -> None:
        if self.stopping:
            return
        if self.throttle.is_throttled:
            return
        free = self.pool.free_slots()
        if not free:
            return
        jobs = runs.claim_jobs(self.engine, self.id, len(free), lease_seconds=self.settings.lease_seconds)
        for slot, job in zip(free, jobs):
            self.dispatch(slot, job)
        if len(jobs) == len(free):
            # Maybe more is queued: claim again as soon as a slot frees up.
            self.wake_claim = True

    def dispatch(self, slot: int, job: store.Job) -> None:
        run = Run(job=job, slot=slot, started=time.monotonic())
        self.runs[job.id] = run
        task = Task(job_id=job.id, attempt=job.attempt, attempt_token=str(job.attempt_token),
                    analysis=job.analysis, params=job.params, results_dir=str(self.results_dir),
                    database_url=self.database_url)
        self.pool.dispatch(slot, task)
        logger.info("job claimed", extra=self.log_extra("job_claimed", run))

    # Cancel, timeout and grace periods -----------------------------------

    def apply_cancel_requests(self) -> None:
        requested = store.cancel_requests(self.engine, self.id)
        now = time.monotonic()
        for job_id, token in requested:
            run = self.runs.get(job_id)
            if run is None or run.token != token or run.stop_reason == "cancel":
                continue
            self.ask_to_stop(run, "cancel", now + self.settings.cancel_grace_seconds)

    def ask_to_stop(self, run: Run, reason: str, deadline: float) -> None:
        """Set the slot's cancel flag; the run is terminated if still running at ``deadline``."""
        if run.stop_reason is not None and reason == "shutdown":
            deadline = min(deadline, run.stop_deadline or deadline)
        run.stop_reason = reason if run.stop_reason in (None, "shutdown") else run.stop_reason
        run.stop_deadline = deadline if run.stop_deadline is None else min(run.stop_deadline, deadline)
        self.pool.request_cancel(run.job.id, str(run.token))
        logger.info("stop requested", extra=self.log_extra("job_stop_requested", run, reason=reason))

    def enforce_deadlines(self, now: float) -> None:
        for run in list(self.runs.values()):
            timeout = run.job.timeout_seconds
            if run.stop_reason is None and timeout and now - run.started > timeout:
                self.ask_to_stop(run, "timeout", now + self.settings.cancel_grace_seconds)
            if run.stop_deadline is not None and now >= run.stop_deadline and not run.terminated:
                run.terminated = True
                logger.warning("terminating job after grace period",
                               extra=self.log_extra("job_terminated", run, reason=run.stop_reason))
                if run.stop_reason == "cancel":
                    self.pool.terminate(run.job.id, str(run.token), outcome_status="cancelled")
                else:
                    code = ErrorCode.TIMEOUT if run.stop_reason == "timeout" else ErrorCode.SHUTDOWN
                    error = {"code": str(code), "message": f"terminated after the grace period ({run.stop_reason})",
                             "details": {"timeout_seconds": run.job.timeout_seconds}}
                    self.pool.terminate(run.job.id, str(run.token), outcome_status="failed", error=error)

    # Outcomes --------------------------------------------------------------

    def handle_outcomes(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            run = self.runs.pop(outcome.job_id, None)
            if run is None or str(run.token) != outcome.attempt_token:
                logger.debug("outcome for unknown run", extra=self.log_extra("stale_outcome", job_id=outcome.job_id))
                continue
            self.pending.append((run, outcome))
        if outcomes:
            self.wake_claim = True
            try:
                self.flush_pending()
            except sa.exc.OperationalError as error:
                logger.warning("database unavailable; outcomes kept for later",
                               extra=self.log_extra("db_unavailable", error=str(error.orig)))

    def flush_pending(self) -> None:
        """Write all pending outcomes in one transaction, each in a savepoint of its own.

        One commit for a batch of outcomes instead of one per job: with short
        jobs the WAL flush of each commit dominates the cost of finishing.
        An outcome the database rejects (a summary it cannot store) fails its
        own job and leaves the others in the batch intact.
        """
        if not self.pending:
            return
        with self.engine.begin() as connection:
            for run, outcome in self.pending:
                try:
                    with connection.begin_nested():
                        self.record_outcome(connection, run, outcome)
                except (sa.exc.DataError, sa.exc.IntegrityError, sa.exc.ProgrammingError, ValueError) as error:
                    logger.error("outcome could not be stored", exc_info=True,
                                 extra=self.log_extra("outcome_rejected", run))
                    rejected = {"code": str(ErrorCode.ANALYSIS_ERROR),
                                "message": f"the result could not be stored: {error}", "details": {}}
                    runs.fail_run(connection, run.job.id, run.token, rejected, retryable=False)
        self.pending.clear()

    def record_outcome(self, bind: sa.Connection, run: Run, outcome: Outcome) -> None:
        analysis = registry.get(run.job.analysis)
        if run.stop_reason == "shutdown" and outcome.status != "succeeded":
            self.requeue(run, "shutdown", bind)
            return
        if outcome.status == "succeeded":
            written = runs.succeed_run(bind, run.job.id, run.token, outcome.summary, list(outcome.results),
                                       results_ttl_seconds=analysis.results_ttl_seconds)
            self.log_finish(run, "succeeded", written)
            return
        if outcome.status == "cancelled":
            stage = (outcome.error or {}).get("details", {}).get("stage", "cooperative")
            if run.stop_reason == "timeout":
                error = {"code": str(ErrorCode.TIMEOUT), "message": f"timed out after {run.job.timeout_seconds} s",
                         "details": {"stage": stage, "timeout_seconds": run.job.timeout_seconds}}
                outcome = dataclasses.replace(outcome, status="failed", error=error, retryable=True)
            else:
                written = runs.cancel_run(bind, run.job.id, run.token, stage=stage)
                self.log_finish(run, "cancelled", written, stage=stage)
                return
        error = dict(outcome.error or {"code": str(ErrorCode.ANALYSIS_ERROR), "message": "unknown failure"})
        code = error.get("code")
        if code == ErrorCode.ANALYSIS_ERROR:
            retryable = outcome.retryable
        else:
            retryable = outcome.retryable and code in analysis.retry_codes
        delay = runs.retry_delay_seconds(run.job.attempt, base=self.settings.retry_base_seconds,
                                         maximum=self.settings.retry_max_seconds)
        status = runs.fail_run(bind, run.job.id, run.token, error, retryable=retryable, retry_delay=delay)
        self.log_finish(run, status or "stale", status is not None, code=code)

    def requeue(self, run: Run, reason: str, bind: sa.Engine | sa.Connection | None = None) -> None:
        status = runs.requeue_run(bind or self.engine, run.job.id, run.token, reason=reason)
        self.runs.pop(run.job.id, None)
        logger.info("job re-queued", extra=self.log_extra("job_requeued", run, reason=reason, status=status))

    def log_finish(self, run: Run, status: str, written: bool, **fields: Any) -> None:
        if not written:
            logger.warning("run is no longer current; outcome dropped",
                           extra=self.log_extra("outcome_dropped", run, status=status))
            return
        level = {"succeeded": logging.INFO, "cancelled": logging.INFO, "queued": logging.INFO}.get(status, logging.ERROR)
        event = {"queued": "job_retried"}.get(status, f"job_{status}")
        logger.log(level, f"job {status}", extra=self.log_extra(event, run, **fields))

    # Heartbeat, sweeps, progress ----------------------------------------------

    def heartbeat(self) -> None:
        tokens = [run.token for run in self.runs.values()]
        held = runs.heartbeat(self.engine, self.id, tokens, lease_seconds=self.settings.lease_seconds,
                              throttle=self.throttle.state())
        for run in list(self.runs.values()):
            if run.token not in held and run.token in tokens:
                # Another supervisor recovered this job: stop our copy, and
                # write nothing about it (its writes would be rejected anyway).
                logger.warning("lease lost; terminating the run",
                               extra=self.log_extra("lease_lost", run))
                self.runs.pop(run.job.id)
                self.pool.terminate(run.job.id, str(run.token), grace_seconds=0.5, outcome_status="failed",
                                    error={"code": str(ErrorCode.LEASE_EXPIRED), "message": "lease lost"})

    def sweep(self) -> None:
        recovered = sweeps.recover_expired_leases(self.engine)
        if any(item.status == "queued" for item in recovered):
            self.wake_claim = True
        expired = sweeps.expire_jobs(self.engine)
        for path in expired["files"]:
            remove_result_file(path, self.results_dir)

    def log_throttle(self) -> None:
        state = self.throttle.state()
        if self.throttle.is_throttled:
            logger.warning("claims paused", extra=self.log_extra("throttle_paused", **state))
        else:
            logger.info("claims resumed", extra=self.log_extra("throttle_resumed", **state))
            self.wake_claim = True

    def write_progress(self, now: float) -> None:
        snapshots = self.pool.read_progress()
        updates = []
        wall = time.time()
        for job_id, snapshot in snapshots.items():
            run = self.runs.get(job_id)
            if run is None or snapshot.attempt != run.job.attempt:
                continue
            key = (snapshot.phase, snapshot.completed, snapshot.total, snapshot.message)
            if key == run.last_progress or now - run.last_progress_write < self.settings.progress_interval_seconds:
                continue
            rate, eta = rates.estimate(snapshot.completed, snapshot.total, wall - snapshot.phase_started_at)
            phase_changed = snapshot.phase != run.last_phase
            record_event = phase_changed or now - run.last_progress_event >= PROGRESS_EVENT_SECONDS
            updates.append(runs.ProgressUpdate(job_id, run.token, snapshot.phase or None, snapshot.completed,
                                               snapshot.total, snapshot.message or None, rate, eta, record_event))
            run.last_progress, run.last_progress_write, run.last_phase = key, now, snapshot.phase
            if record_event:
                run.last_progress_event = now
        if updates:
            runs.record_progress(self.engine, updates)


def is_local_database(url: sa.URL) -> bool:
    """Return whether the database server runs on this machine (a Unix socket or loopback)."""
    host = url.host or url.query.get("host") or ""
    if isinstance(host, tuple):
        host = host[0]
    return host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")


def remove_result_file(path: str, results_dir) -> None:
    """Delete a result file, but only one inside the results folder."""
    from pathlib import Path

    target = Path(path).resolve()
    if not target.is_relative_to(Path(results_dir).resolve()):
        logger.warning("result file outside the results folder left in place",
                       extra={"event": "result_file_skipped", "path": path})
        return
    target.unlink(missing_ok=True)


def connect_with_backoff(settings: config_module.Config, attempts: int = 5) -> sa.Engine:
    """Connect and check the schema, retrying with backoff before giving up.

    launchd restarts a failed service every ThrottleInterval forever, so a
    supervisor that cannot start backs off by itself first instead of
    hammering the database.
    """
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            return db.connect(settings)
        except ServiceError as error:
            if attempt == attempts:
                raise
            logger.warning("start-up check failed; retrying",
                           extra={"event": "supervisor_start_retry", "error": error.message,
                                  "retry_in_seconds": delay})
            time.sleep(delay)
            delay = min(30.0, delay * 2)
    raise AssertionError("unreachable")


def run_supervisor(settings: config_module.Config, *, configure_logging: bool = True) -> int:
    """Run a supervisor until SIGTERM or SIGINT; return the process exit code."""
    if configure_logging:
        logs.configure()
    try:
        engine = connect_with_backoff(settings)
    except ServiceError as error:
        logger.critical("supervisor cannot start", extra={"event": "supervisor_start_failed", "error": error.message})
        return EXIT_START_FAILED
    supervisor = Supervisor(settings, engine)
    supervisor.start()
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    try:
        supervisor.run_forever()
    finally:
        supervisor.shutdown()
        engine.dispose()
    return EXIT_OK
