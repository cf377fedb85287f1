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

Each pass of the loop renews leases (the heartbeat), sweeps expired leases
and deadlines, and applies cancel requests, run timeouts and grace periods.
It then writes outcomes, claims jobs for the free slots unless throttled and
writes progress. Finally it waits for the next outcome, notification or
deadline. Any
database error is logged and retried with backoff while jobs keep running;
outcomes that could not be written are kept and written later.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
import uuid
from typing import Any

import psycopg
import sqlalchemy as sa

from analyses import registry
from analyses.errors import InvalidParams
from supervisor import config as config_module
from supervisor import db, logs, memory, payloads, rates, runs, store, sweeps
from supervisor.errors import ConfigError, DatabaseUnavailable, ErrorCode, ServiceError
from supervisor.listener import Listener
from supervisor.pool import Outcome, Task, WorkerPool
from supervisor.throttle import Reader, Throttle

logger = logging.getLogger(__name__)

VERSION = "0.1.0"

# Exit codes of `analysisctl supervisor run`. A supervisor that cannot start
# exits with its error's code instead: 2 (ConfigError), 5
# (DatabaseUnavailable) or 6 (SchemaOutOfDate), as the other commands do.
EXIT_OK = 0
EXIT_FORCED = 4

# Start-up attempts before a supervisor gives up, and the first wait between
# them, which doubles up to START_RETRY_MAX_SECONDS: 1 + 2 + 4 + 8 = 15 s of
# waiting in all.
START_ATTEMPTS = 5
START_RETRY_SECONDS = 1.0
START_RETRY_MAX_SECONDS = 30.0

# A progress event (as opposed to the row update) is recorded at most this
# often per job, so the event history stays small for long jobs.
PROGRESS_EVENT_SECONDS = 10.0
# How often lease recovery and expiry sweeps run.
SWEEP_SECONDS = 5.0
THROTTLE_SECONDS = 2.0
# How often the memory of runs with a memory limit is sampled.
MEMORY_CHECK_SECONDS = 0.25
# Prefetching: while recent runs are short, the supervisor claims extra jobs,
# about PREFETCH_WORK_SECONDS of work per slot and at most
# PREFETCH_MAX_PER_SLOT. A freed worker then gets its next job from memory
# instead of waiting for a commit, and one commit serves many jobs. Jobs of
# PREFETCH_WORK_SECONDS or longer are not prefetched, because they gain
# nothing and would only hold work another supervisor could start. A
# prefetched job not started within PREFETCH_HOLD_SECONDS is handed back.
PREFETCH_WORK_SECONDS = 0.05
PREFETCH_MAX_PER_SLOT = 32
PREFETCH_HOLD_SECONDS = 2.0
# Progress writes are due every progress interval. A pass that comes this
# much early still writes, so timer jitter cannot delay a write by a whole
# poll interval.
PROGRESS_SLACK_SECONDS = 0.05
# While prefetched jobs keep the workers busy, outcomes are written in
# batches: a write waits up to OUTCOME_DELAY_SECONDS for more outcomes, or
# until OUTCOME_BATCH_MAX have arrived. Each worker then runs many jobs per
# commit instead of one job per loop pass.
OUTCOME_DELAY_SECONDS = 0.01
# Starts are recorded this long after a dispatch unless another write comes
# first. A run whose start is not recorded gets its attempt back when its
# supervisor dies, so a longer delay would let a job that kills its
# supervisor at once retry without end; 0 records on the next pass.
START_RECORD_DELAY_SECONDS = 0.0
OUTCOME_BATCH_MAX = 64
# The 'running' notifications of a claim for idle workers wait this long, or
# until the next write, which then carries them. Sent at once, their
# transaction's server process took CPU from the workers starting the jobs.
NOTIFY_DELAY_SECONDS = 0.01
DB_RETRY_SECONDS_MAX = 10.0


@dataclasses.dataclass
class Run:
    """A job attempt this supervisor is running, with its stop bookkeeping."""

    job: store.Job
    # None while the run waits in the prefetch queue for a free slot.
    slot: int | None
    # time.monotonic() at dispatch; None before.
    started: float | None
    # Why a stop was requested: "cancel", "timeout" or "shutdown"; None while running normally.
    stop_reason: str | None = None
    stop_deadline: float | None = None
    terminated: bool = False
    last_progress: tuple | None = None
    last_progress_write: float = 0.0
    last_progress_event: float = 0.0
    last_phase: str | None = None
    # time.monotonic() after which the worker stops the run by itself unless
    # a heartbeat has renewed the lease; see fence_deadline().
    fence_deadline: float = 0.0
    # Resident bytes of the worker when the run started; the job's memory
    # limit applies to the growth above it. None until sampled.
    memory_baseline: int | None = None

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

        # Every run this supervisor holds a lease on, dispatched or prefetched.
        self.runs: dict[int, Run] = {}
        # Claimed runs waiting for a slot, oldest first, with their claim time.
        self.ready: collections.deque[tuple[Run, float]] = collections.deque()
        # Moving average of recent run durations, None before the first one.
        self.recent_run_seconds: float | None = None

        # Outcomes waiting to be written.
        self.pending: list[tuple[Run, Outcome]] = []
        # time.monotonic() when the oldest pending outcome arrived.
        self.pending_since: float | None = None
        # (job id, token) of runs handed to a worker since the last write,
        # and time.monotonic() of the first of them.
        self.dispatched: list[tuple[int, uuid.UUID]] = []
        self.dispatched_since: float | None = None

        self.stopping = False
        self.wake_claim = True
        self.wake_cancel = True
        self.next_heartbeat = 0.0
        self.next_sweep = 0.0
        self.next_poll = 0.0
        self.next_throttle = 0.0
        self.next_memory_check = 0.0
        self.db_backoff = 0.0
        self.db_retry_at = 0.0

        # Postgres backends serving this supervisor, when the server runs on
        # this machine: their CPU is the service's own load, not pressure
        # from other programs.
        self.backend_pids: set[int] = set()
        if is_local_database(engine.url):
            sa.event.listen(engine, "checkout", self._remember_backend)
        self.throttle = Throttle(Reader(self.own_pids), pause_cpu_percent=settings.throttle_pause_cpu_percent,
                                 resume_cpu_percent=settings.throttle_resume_cpu_percent)

        self.results_dir = settings.effective_results_dir
        # Passed to analyses that read sensor readings from a table; the
        # resolved URL, so it also points at an embedded server.
        self.database_url = engine.url.render_as_string(hide_password=False)
        self.listener: Listener | None = None
        # Claims for idle workers use a connection of their own, outside the
        # engine's pool, which saves the pool's checkout and reset on the way
        # from submit to the job's start. It is opened on first use and again
        # after a loss.
        self.claim_connection: psycopg.Connection | None = None
        # Jobs claimed without their 'running' notification (see claim_jobs).
        self.unnotified: list[int] = []
        self.unnotified_since: float | None = None
        # Set when a claim failed: its commit may still have reached the
        # server (see release_unconfirmed_claims).
        self.claims_unconfirmed = False

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
        # Import every analysis module now, not on the first outcome.
        registry.all_analyses()
        # Workers inherit the signal mask: block the stop signals while
        # starting them, so a Ctrl-C during start-up reaches only us.
        logger.info("starting workers", extra=self.log_extra("workers_starting", slots=self.slots))
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self.pool.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.register()
        self.listener = Listener(self.database_url, [store.WORK_CHANNEL], str(self.id))
        self.listener.start()
        logger.info("supervisor started", extra=self.log_extra("supervisor_started", slots=self.slots,
                                                                 pid=os.getpid()))

    def register(self) -> None:
        """Record this supervisor in the supervisors table, retrying with backoff like the start-up check.

        Raises ``DatabaseUnavailable`` after ``START_ATTEMPTS`` failures.
        """
        delay = START_RETRY_SECONDS
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                runs.register_supervisor(self.engine, self.id, host=socket.gethostname(), pid=os.getpid(),
                                         version=VERSION, slots=self.slots)
                return
            except sa.exc.OperationalError as error:
                if attempt == START_ATTEMPTS or self.stopping:
                    raise DatabaseUnavailable(
                        f"could not register the supervisor: {error.orig}; check that the database "
                        "is running (`analysisctl doctor`)") from error
                logger.warning("start-up check failed; retrying",
                               extra=self.log_extra("supervisor_start_retry", error=str(error.orig),
                                                    attempt=attempt, retry_in_seconds=delay))
                time.sleep(delay)
                delay = min(START_RETRY_MAX_SECONDS, delay * 2)

    def request_stop(self, signum: int, _frame=None) -> None:
        if self.stopping:
            logger.critical("second stop signal; exiting now", extra=self.log_extra("supervisor_forced_exit"))
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
        self.release_ready(reason="shutdown", older_than=None)
        for run in self.runs.values():
            if run.slot is not None:
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
        self.write_pending()
        self.pool.close(grace_seconds=1.0)
        if self.listener is not None:
            self.listener.close()
        self.close_claim_connection()
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
            self.enforce_memory_limits(time.monotonic())
            timeout = self.next_wake(time.monotonic())
            extra = [self.listener.wakeup] if self.listener is not None else []
            self.handle_outcomes(self.pool.wait(timeout=timeout, extra=extra))
            self.read_notifications()

    def tick(self, now: float) -> None:
        if now >= self.next_throttle:
            if self.throttle.update():
                self.log_throttle()
                # Record the new state in the supervisors row at once.
                self.next_heartbeat = now
            self.next_throttle = now + THROTTLE_SECONDS
        if now >= self.next_heartbeat:
            self.heartbeat()
            self.next_heartbeat = now + self.settings.heartbeat_seconds
        if now >= self.next_sweep:
            self.sweep()
            self.next_sweep = now + SWEEP_SECONDS
        if now >= self.next_poll:
            self.wake_claim = self.wake_cancel = True
            self.next_poll = now + self.settings.poll_seconds
        if self.wake_cancel:
            self.wake_cancel = False
            self.apply_cancel_requests()
        if self.unnotified_since is not None and now - self.unnotified_since >= NOTIFY_DELAY_SECONDS:
            self.send_notifications(self.engine)
        self.release_ready(reason="prefetch_expired", older_than=PREFETCH_HOLD_SECONDS)
        if self.claims_unconfirmed:
            self.release_unconfirmed_claims()
        self.write_and_claim()
        self.write_progress(now)

    def next_wake(self, now: float) -> float:
        if self.dispatched_since is not None and not self.is_write_deferrable():
            # Record the starts soon: until then a crash would give those runs
            # their attempt back although their bodies ran.
            return max(0.0, self.dispatched_since + START_RECORD_DELAY_SECONDS - now)
        interval = self.settings.progress_interval_seconds
        wake = min(self.next_poll, self.next_heartbeat, now + interval)
        if self.pending_since is not None:
            wake = min(wake, self.pending_since + OUTCOME_DELAY_SECONDS)
        if self.unnotified_since is not None:
            wake = min(wake, self.unnotified_since + NOTIFY_DELAY_SECONDS)
        for run in self.runs.values():
            if run.stop_deadline is not None:
                wake = min(wake, run.stop_deadline)
            if run.job.memory_limit_mib is not None and run.slot is not None:
                wake = min(wake, self.next_memory_check)
            if run.slot is not None:
                # Wake when this run's next progress write falls due, not a
                # whole interval after whichever pass came last.
                wake = min(wake, max(now, run.last_progress_write + interval - PROGRESS_SLACK_SECONDS))
        if self.db_retry_at > now:
            wake = max(wake, self.db_retry_at) if not self.runs else min(wake, self.db_retry_at)
        return max(0.0, min(wake - now, self.settings.poll_seconds))

    def read_notifications(self) -> None:
        if self.listener is None:
            return
        for note in self.listener.drain():
            kind = note.get("kind")
            if kind in ("queued", "reconnected", "limits"):
                self.wake_claim = True
            if kind in ("cancel", "reconnected"):
                self.wake_cancel = True

    # Claim and dispatch --------------------------------------------------

    def claim_limit(self) -> int:
        """Return how many jobs to claim now: free slots, plus prefetched jobs while jobs are short.

        The prefetch queue is refilled only once it has run down to half its
        target, so that each claim takes a batch: a claim costs about the
        same for one job as for thirty.
        """
        if self.stopping or self.throttle.is_throttled:
            return 0
        free = len(self.pool.free_slots())
        prefetch = 0
        if self.recent_run_seconds is not None:
            per_slot = PREFETCH_WORK_SECONDS / max(self.recent_run_seconds, 1e-4)
            prefetch = self.slots * min(PREFETCH_MAX_PER_SLOT, int(per_slot))
        if prefetch and len(self.ready) >= max(free, prefetch // 2):
            return 0
        return max(0, free + prefetch - len(self.ready))

    def write_and_claim(self) -> None:
        """Write pending outcomes and claim new jobs, then dispatch.

        With prefetched jobs in hand, one transaction does both, since with
        short jobs the commit's WAL flush is the largest cost of a job's trip
        through the database. With none in hand, a worker is idle: the claim
        then commits first on its own, so the worker starts without waiting
        for the outcomes to be written.
        """
        limit = self.claim_limit() if self.wake_claim else 0
        if not self.pending and limit == 0 and (
                not self.dispatched
                or time.monotonic() - self.dispatched_since < START_RECORD_DELAY_SECONDS):
            return
        if self.is_write_deferrable():
            return
        claimed: list[Run] = []
        if limit and not self.ready and self.pool.free_slots():
            claimed = self.claim(limit)
            limit = 0
            if not self.pending and not self.dispatched:
                self.log_claimed(claimed)
                return
        jobs: list[store.Job] = []
        try:
            with self.engine.begin() as connection:
                self.send_notifications(connection)
                self.flush_pending(connection)
                if limit:
                    jobs = self.claim_jobs(connection, limit, notify=True)
        except sa.exc.SQLAlchemyError:
            # The commit may have failed after the server applied it.
            self.claims_unconfirmed = self.claims_unconfirmed or bool(limit)
            raise
        # Only now that the claim is committed do its runs exist here: a
        # failed commit must not leave runs that a worker would start
        # without a lease, while another supervisor claims the same job.
        claimed += self.accept_claimed(jobs)
        self.dispatched.clear()
        self.dispatched_since = None
        self.pending.clear()
        self.pending_since = None
        self.dispatch_ready()
        self.log_claimed(claimed)

    def is_write_deferrable(self) -> bool:
        """Return whether pending outcomes may wait for a bigger batch.

        Only while every worker is busy or has a prefetched job waiting, so
        deferring never leaves a worker idle.
        """
        if self.stopping or not self.pending or self.pending_since is None:
            return False
        if len(self.pending) >= OUTCOME_BATCH_MAX:
            return False
        if time.monotonic() - self.pending_since >= OUTCOME_DELAY_SECONDS:
            return False
        return len(self.ready) >= self.slots

    def claim(self, limit: int) -> list[Run]:
        """Claim up to ``limit`` jobs in a transaction of their own and hand them to idle workers at once.

        The rest wait in the prefetch queue. The caller logs the returned
        runs, after dispatching, so logging does not delay a job's start.
        """
        try:
            jobs = self.claim_jobs(self.open_claim_connection(), limit, notify=False)
        except sa.exc.SQLAlchemyError:
            # The commit may have failed after the server applied it, and
            # the connection may be unusable however it reports itself.
            self.claims_unconfirmed = True
            self.close_claim_connection()
            raise
        claimed = self.accept_claimed(jobs)
        self.dispatch_ready()
        if jobs:
            self.unnotified.extend(job.id for job in jobs)
            if self.unnotified_since is None:
                self.unnotified_since = time.monotonic()
        return claimed

    def claim_jobs(self, bind: psycopg.Connection | sa.Connection, limit: int, *, notify: bool) -> list[store.Job]:
        """Claim up to ``limit`` jobs through ``bind``; the caller passes them to ``accept_claimed`` once committed."""
        # Jobs that go straight to idle workers get their start recorded by the claim itself.
        starting = max(0, len(self.pool.free_slots()) - len(self.ready))
        jobs = runs.claim_jobs(bind, self.id, limit, lease_seconds=self.settings.lease_seconds,
                               starting=starting, notify=notify)
        # A full batch suggests more is queued: claim again on the next pass.
        self.wake_claim = len(jobs) == limit
        return jobs

    def accept_claimed(self, jobs: list[store.Job]) -> list[Run]:
        """Add committed claims to the runs and the prefetch queue."""
        claimed_at = time.monotonic()
        claimed = []
        for job in jobs:
            run = Run(job=job, slot=None, started=None, fence_deadline=self.fence_deadline(claimed_at))
            self.runs[job.id] = run
            self.ready.append((run, claimed_at))
            claimed.append(run)
        return claimed

    def release_unconfirmed_claims(self) -> None:
        """Give back the jobs that run under this supervisor's lease in the database but are unknown here.

        A claim whose commit reached the server while its reply was lost
        leaves such jobs: running under this supervisor's lease, never
        dispatched. They go back to the queue with their attempt, at once,
        instead of holding limits until the lease expires and then losing
        the attempt to a start the claim recorded.
        """
        known = {run.token for run in self.runs.values()} | {run.token for run, _ in self.pending}
        for job_id, token in runs.leased_runs(self.engine, self.id):
            if token in known:
                continue
            status = runs.requeue_run(self.engine, job_id, token, reason="claim_unconfirmed")
            logger.warning("claimed job given back: its claim's commit was not confirmed",
                           extra=self.log_extra("job_requeued", job_id=job_id, reason="claim_unconfirmed",
                                                status=status))
        self.claims_unconfirmed = False

    def send_notifications(self, bind: sa.Engine | sa.Connection) -> None:
        """Send the 'running' notifications that claims for idle workers left out.

        Given the engine, they go in a transaction of their own, and a
        failure is only logged: notifications are hints.
        """
        # A job given back or cancelled meanwhile is running no longer.
        current = set(self.runs) | {run.job.id for run, _ in self.pending}
        job_ids = [job_id for job_id in self.unnotified if job_id in current]
        self.unnotified.clear()
        self.unnotified_since = None
        if not job_ids:
            return
        try:
            runs.notify_running(bind, job_ids)
        except sa.exc.SQLAlchemyError as error:
            if isinstance(bind, sa.Connection):
                raise
            logger.warning("could not notify the claimed jobs' status",
                           extra=self.log_extra("db_error", error=str(error), jobs=len(job_ids)))

    def close_claim_connection(self) -> None:
        if self.claim_connection is not None:
            with contextlib.suppress(psycopg.Error):
                self.claim_connection.close()
            self.claim_connection = None

    def open_claim_connection(self) -> psycopg.Connection:
        """Return the connection for claims outside a transaction, opening it when it is closed or lost."""
        if self.claim_connection is None or self.claim_connection.closed:
            try:
                self.claim_connection = db.connect_driver(self.engine.url, self.settings)
            except psycopg.Error as error:
                raise sa.exc.OperationalError("connect", None, error) from error
            if is_local_database(self.engine.url):
                self.backend_pids.add(self.claim_connection.info.backend_pid)
        return self.claim_connection

    def log_claimed(self, claimed: list[Run]) -> None:
        for run in claimed:
            logger.info("job claimed", extra=self.log_extra("job_claimed", run))

    def dispatch_ready(self) -> None:
        """Hand prefetched runs to free slots."""
        for slot in self.pool.free_slots():
            if not self.ready:
                return
            run, _ = self.ready.popleft()
            run.slot, run.started = slot, time.monotonic()
            # The first progress write comes one interval after the start, so
            # jobs shorter than that never write progress at all.
            run.last_progress_write = run.started
            task = Task(job_id=run.job.id, attempt=run.job.attempt, attempt_token=str(run.token),
                        analysis=run.job.analysis, params=run.job.params, results_dir=str(self.results_dir),
                        database_url=self.database_url)
            if run.job.memory_limit_mib is not None:
                run.memory_baseline = self.worker_rss(run.job.id)
            self.pool.dispatch(slot, task)
            if run.job.started_at is None:
                self.dispatched.append((run.job.id, run.token))
                if self.dispatched_since is None:
                    self.dispatched_since = time.monotonic()
            self.pool.set_run_deadline(run.job.id, str(run.token), run.fence_deadline)

    def release_ready(self, *, reason: str, older_than: float | None) -> None:
        """Give prefetched runs back to the queue, those waiting longer than ``older_than`` seconds."""
        now = time.monotonic()
        while self.ready and (older_than is None or now - self.ready[0][1] > older_than):
            run, _ = self.ready.popleft()
            self.requeue(run, reason)

    # Cancel, timeout and grace periods -----------------------------------

    def apply_cancel_requests(self) -> None:
        requested = store.cancel_requests(self.engine, self.id)
        now = time.monotonic()
        for job_id, token in requested:
            run = self.runs.get(job_id)
            if run is None or run.token != token or run.stop_reason == "cancel":
                continue
            if run.slot is None:
                # Still prefetched: the body never started, so it ends here.
                self.ready = collections.deque(item for item in self.ready if item[0] is not run)
                self.runs.pop(job_id)
                written = runs.cancel_run(self.engine, job_id, token, stage="before_start")
                self.log_finish(run, "cancelled", written, stage="before_start")
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

    def worker_rss(self, job_id: int) -> int | None:
        entry = self.pool.running().get(job_id)
        if entry is None or entry[2] is None:
            return None
        return memory.tree_rss(entry[2])

    def enforce_memory_limits(self, now: float) -> None:
        """Stop runs whose processes grew past their job's memory limit, with code ``memory_limit``.

        The limit applies to the growth of the worker and its descendants
        since the run started, so memory a worker kept from an earlier job is
        not charged to the next one. The run is stopped at once: a job over
        its limit may take the machine into swap within its grace period.
        """
        if now < self.next_memory_check:
            return
        self.next_memory_check = now + MEMORY_CHECK_SECONDS
        pids = {job_id: pid for job_id, (_, _, pid) in self.pool.running().items() if pid is not None}
        for run in self.runs.values():
            limit = run.job.memory_limit_mib
            if limit is None or run.slot is None or run.terminated or run.job.id not in pids:
                continue
            rss = memory.tree_rss(pids[run.job.id])
            if rss is None:
                continue
            if run.memory_baseline is None:
                run.memory_baseline = rss
            used = rss - run.memory_baseline
            if used <= limit * memory.MIB:
                continue
            run.terminated, run.stop_reason = True, "memory_limit"
            details = {"memory_limit_mib": limit, "used_mib": round(used / memory.MIB, 1),
                       "resident_mib": round(rss / memory.MIB, 1),
                       "baseline_mib": round(run.memory_baseline / memory.MIB, 1)}
            logger.warning("job over its memory limit; terminating",
                           extra=self.log_extra("job_memory_limit", run, **details))
            error = {"code": str(ErrorCode.MEMORY_LIMIT),
                     "message": f"used {details['used_mib']} MiB, over its memory limit of {limit} MiB",
                     "details": details}
            self.pool.terminate(run.job.id, str(run.token), grace_seconds=0.5, outcome_status="failed",
                                error=error, retryable=True)

    def enforce_deadlines(self, now: float) -> None:
        for run in list(self.runs.values()):
            if run.started is None:
                continue
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
                    # Retried if the analysis's policy allows; see record_outcome.
                    self.pool.terminate(run.job.id, str(run.token), outcome_status="failed", error=error,
                                        retryable=True)

    # Outcomes --------------------------------------------------------------

    def handle_outcomes(self, outcomes: list[Outcome]) -> None:
        """Queue outcomes for writing and refill the freed slots from the prefetch queue at once."""
        for outcome in outcomes:
            run = self.runs.get(outcome.job_id)
            if run is None or str(run.token) != outcome.attempt_token:
                logger.debug("outcome for unknown run", extra=self.log_extra("stale_outcome", job_id=outcome.job_id))
                continue
            del self.runs[outcome.job_id]
            self.pending.append((run, outcome))
            if self.pending_since is None:
                self.pending_since = time.monotonic()
            duration = time.monotonic() - (run.started or time.monotonic())
            self.recent_run_seconds = duration if self.recent_run_seconds is None else (
                0.8 * self.recent_run_seconds + 0.2 * duration)
        if outcomes:
            self.wake_claim = True
            self.dispatch_ready()

    def flush_pending(self, connection: sa.Connection) -> None:
        """Record the starts of dispatched runs, then write all pending outcomes, in ``connection``'s transaction.

        One commit for a batch of outcomes instead of one per job: with short
        jobs the WAL flush of each commit dominates the cost of finishing.
        Each outcome other than a success is written in a savepoint of its
        own, so an outcome the database rejects (a summary it cannot store)
        fails its own job and leaves the others in the batch intact.
        """
        successes, others = [], []
        for run, outcome in self.pending:
            document = None
            if outcome.status == "succeeded" and run.stop_reason != "shutdown":
                document = storable_document(outcome.summary)
            if document is not None:
                successes.append((run, outcome, document))
            else:
                others.append((run, outcome))
        # Before the outcomes, since a run may have started and ended since
        # the last write. The success statement records the start of a run
        # that also succeeded, which saves a row update per short job.
        succeeded = {run.job.id for run, _, _ in successes}
        runs.mark_started(connection, [entry for entry in self.dispatched if entry[0] not in succeeded])
        if successes:
            self.record_successes(connection, successes)
        for run, outcome in others:
            try:
                with connection.begin_nested():
                    self.record_outcome(connection, run, outcome)
            except (sa.exc.DataError, sa.exc.IntegrityError, sa.exc.ProgrammingError, ValueError) as error:
                logger.error("outcome could not be stored", exc_info=True,
                             extra=self.log_extra("outcome_rejected", run))
                rejected = {"code": str(ErrorCode.ANALYSIS_ERROR),
                            "message": f"the result could not be stored: {error}", "details": {}}
                runs.fail_run(connection, run.job.id, run.token, rejected, retryable=False)

    def record_successes(self, connection: sa.Connection, successes: list[tuple[Run, Outcome, Any]]) -> None:
        batch = [runs.Success(run.job.id, run.token, document, list(outcome.results),
                              analysis_policy(run.job.analysis).results_ttl_seconds, summary_is_document=True)
                 for run, outcome, document in successes]
        written = runs.succeed_runs(connection, batch)
        for run, _, _ in successes:
            self.log_finish(run, "succeeded", run.job.id in written)

    def write_pending(self) -> None:
        try:
            with self.engine.begin() as connection:
                self.flush_pending(connection)
            self.dispatched.clear()
            self.dispatched_since = None
            self.pending.clear()
            self.pending_since = None
        except sa.exc.OperationalError as error:
            logger.error("outcomes lost: database unavailable at shutdown",
                         extra=self.log_extra("db_unavailable", error=str(error.orig), outcomes=len(self.pending)))

    def record_outcome(self, bind: sa.Connection, run: Run, outcome: Outcome) -> None:
        analysis = analysis_policy(run.job.analysis)
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
        crashed = code in CRASH_CODES
        if crashed and retryable and run.job.attempt < run.job.max_attempts \
                and run.job.crashes + 1 >= analysis.crash_budget:
            error, retryable = quarantine_error(error, run.job.crashes + 1, analysis.crash_budget), False
        delay = retry_delay(analysis, self.settings, run.job.attempt)
        status = runs.fail_run(bind, run.job.id, run.token, error, retryable=retryable, retry_delay=delay,
                               crashed=crashed)
        self.log_finish(run, status or "stale", status is not None, code=error.get("code"))

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

    def fence_deadline(self, renewed_at: float) -> float:
        """Return when a run's worker must stop if the lease renewed at ``renewed_at`` is not renewed again.

        ``renewed_at`` is taken before the renewal is sent, so the deadline
        falls before the lease's expiry in the database, and a margin more
        covers the worker's check interval and clock reading.
        """
        lease = self.settings.lease_seconds
        return renewed_at + lease - min(2.0, lease / 4)

    def heartbeat(self) -> None:
        tokens = [run.token for run in self.runs.values()]
        sent_at = time.monotonic()
        held = runs.heartbeat(self.engine, self.id, tokens, lease_seconds=self.settings.lease_seconds,
                              throttle=self.throttle.state())
        for run in self.runs.values():
            if run.token in held:
                run.fence_deadline = self.fence_deadline(sent_at)
                if run.slot is not None:
                    self.pool.set_run_deadline(run.job.id, str(run.token), run.fence_deadline)
        for run in list(self.runs.values()):
            if run.token not in held and run.token in tokens:
                # Another supervisor recovered this job: stop our copy, and
                # write nothing about it (its writes would be rejected anyway).
                logger.warning("lease lost; terminating the run",
                               extra=self.log_extra("lease_lost", run))
                self.runs.pop(run.job.id)
                if run.slot is None:
                    self.ready = collections.deque(item for item in self.ready if item[0] is not run)
                    continue
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
        """Write the progress of each running job whose write is due and whose record changed.

        A due run is checked once per interval even when nothing changed or it
        has no record yet. ``last_progress_write`` then moves on as well, so
        the next check is an interval away and the loop never spins.
        """
        due = [run for run in self.runs.values() if run.slot is not None and
               now - run.last_progress_write >= self.settings.progress_interval_seconds - PROGRESS_SLACK_SECONDS]
        if not due:
            return
        snapshots = self.pool.read_progress()
        updates = []
        wall = time.time()
        for run in due:
            snapshot = snapshots.get(run.job.id)
            previous, run.last_progress_write = run.last_progress, now
            if snapshot is None or snapshot.attempt != run.job.attempt:
                continue
            key = (snapshot.phase, snapshot.completed, snapshot.total, snapshot.message)
            if key == previous:
                continue
            rate, eta = rates.estimate(snapshot.completed, snapshot.total, wall - snapshot.phase_started_at)
            phase_changed = snapshot.phase != run.last_phase
            record_event = phase_changed or now - run.last_progress_event >= PROGRESS_EVENT_SECONDS
            updates.append(runs.ProgressUpdate(run.job.id, run.token, snapshot.phase or None, snapshot.completed,
                                               snapshot.total, snapshot.message or None, rate, eta, record_event))
            run.last_progress, run.last_phase = key, snapshot.phase
            if record_event:
                run.last_progress_event = now
        if updates:
            runs.record_progress(self.engine, updates)


# Failures where the job's own process was killed: they count against the
# job's crash budget, which stops a job that keeps killing its worker from
# crash-looping the pool however many attempts it has left.
CRASH_CODES = frozenset({ErrorCode.WORKER_DIED, ErrorCode.MEMORY_LIMIT})


def retry_delay(analysis: registry.Analysis, settings: config_module.Config, attempt: int) -> float:
    """Return the delay before retrying after ``attempt``: the analysis's backoff, else the settings'."""
    base = analysis.retry_base_seconds if analysis.retry_base_seconds is not None else settings.retry_base_seconds
    maximum = analysis.retry_max_seconds if analysis.retry_max_seconds is not None else settings.retry_max_seconds
    return runs.retry_delay_seconds(attempt, base=base, maximum=maximum)


def quarantine_error(error: dict[str, Any], crashes: int, budget: int) -> dict[str, Any]:
    """Return the error that ends a job whose runs used up its crash budget, wrapping the last error."""
    return {
        "code": str(ErrorCode.QUARANTINED),
        "message": f"quarantined: {crashes} runs ended with the worker killed (crash budget {budget}); "
                   f"last: {error.get('code')}: {error.get('message')}",
        "details": {"crashes": crashes, "crash_budget": budget, "last_error": error},
    }


# The run policy of a job whose analysis is not registered. Only a row written
# without store.submit has one, such as a client's direct INSERT: its worker
# fails it with invalid_params, and nothing about it is retried.
UNREGISTERED = registry.Analysis(name="unregistered", summary="an analysis name the registry does not know",
                                 body=lambda params, context: None, retry_codes=frozenset())


def analysis_policy(name: str) -> registry.Analysis:
    """Return the registered analysis ``name``, or ``UNREGISTERED`` so recording its outcome cannot raise."""
    try:
        return registry.get(name)
    except InvalidParams:
        return UNREGISTERED


def storable_document(summary: Any) -> Any:
    """Return the summary as it will be stored, or None when it is None or cannot be stored.

    The caller records those outcomes one by one, which stores a null
    summary or fails the job with the storage error.
    """
    if summary is None:
        return None
    try:
        return payloads.summary_document(summary)
    except ValueError:
        return None


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


def connect_with_backoff(settings: config_module.Config, attempts: int = START_ATTEMPTS,
                         **engine_options) -> sa.Engine:
    """Connect and check the schema, retrying with backoff before giving up.

    Retries while the database is unavailable or its schema is not at head,
    and raises the last error after ``attempts`` tries. launchd restarts a
    failed service every ThrottleInterval forever, so a supervisor that
    cannot start backs off by itself first instead of hammering the
    database. A ``ConfigError`` is raised at once: waiting cannot fix it.
    """
    delay = START_RETRY_SECONDS
    for attempt in range(1, attempts + 1):
        try:
            return db.connect(settings, **engine_options)
        except ConfigError:
            raise
        except ServiceError as error:
            if attempt == attempts:
                raise
            logger.warning("start-up check failed; retrying",
                           extra={"event": "supervisor_start_retry", "error": error.message,
                                  "attempt": attempt, "retry_in_seconds": delay})
            time.sleep(delay)
            delay = min(START_RETRY_MAX_SECONDS, delay * 2)
    raise AssertionError("unreachable")


def run_supervisor(settings: config_module.Config, *, configure_logging: bool = True) -> int:
    """Run a supervisor until SIGTERM or SIGINT; return the process exit code."""
    if configure_logging:
        logs.configure()
    try:
        # No pre-ping: it costs a round trip per transaction, a fifth of the
        # supervisor's time with short jobs. A connection broken by a server
        # restart fails one statement instead; SQLAlchemy then discards the
        # whole pool and the main loop retries with backoff.
        engine = connect_with_backoff(settings, pool_pre_ping=False)
    except ServiceError as error:
        logger.critical("supervisor cannot start",
                        extra={"event": "supervisor_start_failed", "error": error.message,
                               "exit_code": error.exit_code})
        return error.exit_code
    supervisor = Supervisor(settings, engine)
    # Before the workers start: a stop signal during start-up then ends the
    # start cleanly instead of killing this process and orphaning them.
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    try:
        supervisor.start()
        supervisor.run_forever()
    except ServiceError as error:
        logger.critical("supervisor cannot start",
                        extra={"event": "supervisor_start_failed", "error": error.message,
                               "exit_code": error.exit_code})
        return error.exit_code
    finally:
        supervisor.shutdown()
        engine.dispose()
    return EXIT_OK
