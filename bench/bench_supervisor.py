"""Measure the supervisor's own overhead: throughput, pick-up, cancel, progress and scheduling.

Usage::

    .venv/bin/python bench/bench_supervisor.py [--quick] [--database-url URL] [--only NAME]
        [--profile FILE] [--output FILE]

``--database-url`` names the Postgres server, by any database on it. The
default is ``ANALYSIS_DATABASE_URL``, else
postgresql://postgres@127.0.0.1:5432/postgres. The script creates a scratch
database ``bench_sup_<pid>_<hex>`` there, migrates it to head and drops it
at the end. Each scenario starts its own supervisor as ``python -m
supervisor`` with 2 workers and default settings unless the scenario sets
others. It runs one unmeasured noop job on it first and stops it with
SIGTERM at the end. The markdown goes to stdout, and progress to stderr.

Scenarios, with the sizes of a full run (``--quick`` uses fewer jobs and samples):

drain
    5,000 noop jobs (steps=0) inserted with one INSERT ... SELECT, 5 runs.
    jobs/s = jobs / (last finished_at - first claim), both server
    timestamps; the claim time is the created_at of the job's "claimed" event. The CPU seconds of the supervisor process, its workers and
    the Postgres backends serving it are sampled around each run.
pickup
    An idle supervisor, one noop (steps=1) submitted with ``store.submit``,
    200 samples after 5 discarded warm-up jobs. Latency runs from the
    return of ``submit`` (its transaction has committed) to the body's
    start. The body's start is observed through noop's ``run_log``
    parameter pointed at a FIFO that this process keeps open: the body's
    ``open()`` and ``write()`` of its "start" line wake this process at once,
    and the line is stamped with ``time.time()`` on arrival. That puts both
    ends on one clock. A child process writing one line this way arrived
    0.1 ms later on the machine of RESULTS-supervisor.md, while a regular
    file's mtime there was off by up to 1.4 ms, and the job's ``claimed``
    event marks the claim, not the body's start. On a loaded machine the
    scheduler can still delay either stamp by milliseconds.
makespan
    8 noop jobs (steps=1, step_seconds=0.5, cpu=true) submitted in one
    transaction, 5 runs. Makespan runs from that commit to
    max(finished_at). The ratio is makespan / (8 x 0.5 s / 2 workers).
    The body spins on ``time.perf_counter``, so each job lasts 0.5 s of
    wall time even when other programs take CPU from the workers. The
    run_log FIFO also splits the overhead into the time before the first
    body starts, the gaps between bodies on one worker and the time after
    the last body ends.
cancel
    A noop that checks for cancel every 1 ms (steps=100000,
    step_seconds=0.001), cancelled with ``store.request_cancel`` 50 to 150
    ms after its body started, 20 samples. Latency runs from the
    ``cancel_requested`` event's created_at to the job's finished_at, both
    server timestamps. Both are the start times of their transactions
    (``now()``), so the request's own transaction time is included and the
    finishing transaction's commit is not.
cancel-ignored
    The same with ignore_cancel=true and ANALYSIS_CANCEL_GRACE_SECONDS=1,
    10 samples. The result is latency minus the 1 s grace period. Each
    sample waits until the worker that the termination replaced is ready.
progress-call
    ``SlotWriter.progress`` timed in this process: 21 repeats of 100,000
    calls, median ns per call, loop overhead included.
progress-visible
    A noop with steps=1000 and step_seconds=0.01 under the default
    ANALYSIS_PROGRESS_INTERVAL_SECONDS=0.5, 3 runs. This process reads the
    job's row every 20 ms and keeps each distinct progress write. Step k
    is taken to end at body start + k x (body duration / steps), from the
    run_log FIFO's start and end lines. A write that moves progress from
    c_prev to c makes steps c_prev+1 .. c visible. The delay of the write
    is its progress_updated_at minus the end of step c_prev+1, the oldest
    step it reveals, so it is the longest any progress value waited to
    become visible in Postgres.

Every scenario reports the throttle_paused events in its supervisor's log
(the supervisor stops claiming while other programs use more than 85 % of
the CPU) and the load average before and after. In drain, pickup and
makespan, whose results depend on claims, a run or sample that overlaps a
pause is replaced by a new one, at most as many times as there are samples,
and the details say how many were replaced.

``--profile FILE`` adds one drain run, not counted in the table, with the
supervisor started under ``python -m cProfile -o FILE``, and prints the
supervisor process's top functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import itertools
import json
import math
import os
import platform
import pstats
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import make_url

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from supervisor import db, store  # noqa: E402
from supervisor.progress import SlotWriter, create_array  # noqa: E402

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
WORKERS = 2
BENCH_USER = "bench"
# application_name of this script's own connections, so they are left out of
# the CPU seconds attributed to the supervisor's Postgres backends.
BENCH_APPLICATION = "bench-supervisor"
# application_name values that supervisor/db.py and supervisor/listener.py set.
SUPERVISOR_APPLICATIONS = ("analysis-jobs", "analysis-jobs-listener")
CANCEL_GRACE_SECONDS = 1.0
CPU_JOBS = 8
CPU_JOB_SECONDS = 0.5
PROGRESS_STEPS = 1000
PROGRESS_STEP_SECONDS = 0.01
PROGRESS_POLL_SECONDS = 0.02
PICKUP_WARMUP = 5
# Pause before each pick-up or cancel sample, drawn uniformly, so samples do
# not line up with the supervisor's 0.5 s wake-up and 1 s poll timers.
IDLE_SECONDS = (0.05, 0.15)


@dataclasses.dataclass(frozen=True)
class Sizes:
    drain_jobs: int
    drain_runs: int
    pickup_samples: int
    makespan_runs: int
    cancel_samples: int
    ignored_cancel_samples: int
    progress_call_repeats: int
    progress_calls: int
    progress_runs: int
    progress_steps: int


FULL = Sizes(drain_jobs=5000, drain_runs=5, pickup_samples=200, makespan_runs=5, cancel_samples=20,
             ignored_cancel_samples=10, progress_call_repeats=21, progress_calls=100_000, progress_runs=3,
             progress_steps=PROGRESS_STEPS)
QUICK = Sizes(drain_jobs=2000, drain_runs=3, pickup_samples=50, makespan_runs=3, cancel_samples=5,
              ignored_cancel_samples=3, progress_call_repeats=5, progress_calls=100_000, progress_runs=1,
              progress_steps=300)


@dataclasses.dataclass
class Result:
    """One row of the summary table and the lines of its details section."""

    scenario: str
    result: str
    target: str
    met: bool | None
    throttle_pauses: int | None = None
    details: list[str] = dataclasses.field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile: the smallest value with ``fraction`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def epoch(timestamp: dt.datetime) -> float:
    return timestamp.timestamp()


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# Scratch database -----------------------------------------------------------


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """Create a uniquely named database migrated to head, yield its URL and drop it afterwards."""
    name = f"bench_sup_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db.libpq_url(server_url), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(db.normalise_url(server_url)).set(database=name).render_as_string(hide_password=False)
    log(f"scratch database {name} on {db.redact(server_url)}")
    try:
        db.upgrade(url)
        yield url
    finally:
        with psycopg.connect(db.libpq_url(server_url), autocommit=True) as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        log(f"dropped {name}")


def clear_jobs(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        connection.execute(sa.text("TRUNCATE job_results, job_events, jobs"))


# Supervisor process ---------------------------------------------------------


class SupervisorProcess:
    """A ``python -m supervisor`` child with its own data folder and a JSON-lines log file."""

    def __init__(self, database_url: str, work_dir: Path, name: str, settings: dict[str, str] | None = None,
                 profile_path: Path | None = None) -> None:
        environ = {key: value for key, value in os.environ.items() if not key.startswith("ANALYSIS_")}
        data_dir = work_dir / f"{name}-data"
        data_dir.mkdir()
        # The pick-up scenario times the body's start through noop's run_log,
        # a fault-injection parameter the supervisor honours only when allowed.
        environ.update({"ANALYSIS_DATABASE_URL": database_url, "ANALYSIS_DATA_DIR": str(data_dir),
                        "ANALYSIS_WORKERS": str(WORKERS), "ANALYSIS_ALLOW_FAULT_INJECTION": "1"})
        environ.update(settings or {})
        command = [sys.executable, "-m", "supervisor"]
        if profile_path is not None:
            command = [sys.executable, "-m", "cProfile", "-o", str(profile_path), "-m", "supervisor"]
        self.name = name
        self.log_path = work_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, env=environ, cwd=REPO_ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        self.pid = self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"supervisor {self.name} exited with {self.process.returncode}; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def wait_ready(self, engine: sa.Engine, timeout: float = 120.0) -> None:
        """Wait until the supervisor has registered its row, which it does once its workers are ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with engine.connect() as connection:
                row = connection.execute(
                    sa.text("SELECT 1 FROM supervisors WHERE pid = :pid AND stopped_at IS NULL"), {"pid": self.pid}
                ).first()
            if row is not None:
                return
            time.sleep(0.05)
        raise TimeoutError(f"supervisor {self.name} did not register within {timeout} s")

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"supervisor {self.name} ignored SIGTERM for {timeout} s; killing it")
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def events(self, *names: str) -> list[dict[str, Any]]:
        """Return the log records whose ``event`` field is one of ``names``."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") in names:
                records.append(record)
        return records

    def throttle_pauses(self) -> int:
        return len(self.events("throttle_paused"))

    def paused_intervals(self) -> list[tuple[float, float]]:
        """Return (paused, resumed) times, as time.time(), of the throttle pauses in the log so far."""
        intervals = []
        paused = None
        for record in self.events("throttle_paused", "throttle_resumed"):
            at = dt.datetime.fromisoformat(record["time"]).timestamp()
            if record["event"] == "throttle_paused" and paused is None:
                paused = at
            elif record["event"] == "throttle_resumed" and paused is not None:
                intervals.append((paused, at))
                paused = None
        if paused is not None:
            intervals.append((paused, math.inf))
        return intervals

    def paused_during(self, begin: float, end: float) -> bool:
        """Return whether claims were paused at any time between ``begin`` and ``end``."""
        return any(paused <= end and begin <= resumed for paused, resumed in self.paused_intervals())

    def worker_pids(self) -> list[int]:
        try:
            return [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []


@contextlib.contextmanager
def running_supervisor(engine: sa.Engine, database_url: str, work_dir: Path, name: str,
                       settings: dict[str, str] | None = None,
                       profile_path: Path | None = None) -> Iterator[SupervisorProcess]:
    supervisor = SupervisorProcess(database_url, work_dir, name, settings, profile_path)
    try:
        supervisor.wait_ready(engine)
        # The supervisor imports every analysis module when it records its
        # first outcome, which took about 60 ms on the machine of
        # RESULTS-supervisor.md. One unmeasured job keeps that out of the samples.
        job = store.submit(engine, "noop", {"steps": 0}, user=BENCH_USER).job
        wait_for_status(engine, job.id, {"succeeded"}, timeout=60, interval=0.05)
        log(f"supervisor {name} ready (pid {supervisor.pid})")
        yield supervisor
    finally:
        code = supervisor.stop()
        if code != 0:
            log(f"supervisor {name} exited with {code}; log {supervisor.log_path}")


class RunLogPipe:
    """A FIFO given to noop as ``run_log``, whose lines this process stamps with time.time() on arrival.

    Lines are "job_id attempt pid start|end". The FIFO is opened read-write,
    so a writer always exists and reads wait for data instead of returning
    end-of-file between jobs.
    """

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / f"run_log_{uuid.uuid4().hex[:8]}.fifo")
        os.mkfifo(self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        self._buffer = b""
        # (job id, "start" or "end") -> time.time() when the line arrived
        self.arrivals: dict[tuple[int, str], float] = {}
        # job id -> pid of the worker that ran its body
        self.pids: dict[int, int] = {}

    def read(self, timeout: float) -> None:
        """Read the lines that arrive within ``timeout`` seconds, returning after the first batch."""
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not ready:
            return
        arrived = time.time()
        self._buffer += os.read(self._fd, 65536)
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            job_id, _attempt, pid, event = line.decode().split()
            self.arrivals.setdefault((int(job_id), event), arrived)
            self.pids.setdefault(int(job_id), int(pid))

    def wait(self, job_id: int, event: str, timeout: float) -> float:
        """Return the arrival time of the job's ``event`` line, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (job_id, event) not in self.arrivals:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {event!r} line from job {job_id} within {timeout} s")
            self.read(remaining)
        return self.arrivals[(job_id, event)]

    def close(self) -> None:
        os.close(self._fd)
        os.unlink(self.path)


def wait_for_status(engine: sa.Engine, job_id: int, statuses: set[str], timeout: float,
                    interval: float = 0.01) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as connection:
            row = connection.execute(sa.text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()
        if row["status"] in statuses:
            return dict(row)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is {row['status']} after {timeout} s, expected {sorted(statuses)}")
        time.sleep(interval)


def wait_until_drained(engine: sa.Engine, supervisor: SupervisorProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        supervisor.check_alive()
        with engine.connect() as connection:
            active = connection.execute(
                sa.text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
            ).scalar_one()
        if active == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{active} jobs still queued or running after {timeout} s")
        time.sleep(0.1)


def collect_unpaused(supervisor: SupervisorProcess, count: int,
                     measure: Callable[[], tuple[Any, float, float]]) -> tuple[list[Any], int]:
    """Call ``measure`` until ``count`` samples fall outside throttle pauses, and return them with the excluded count.

    ``measure`` returns (sample, begin, end) with begin and end as
    time.time(). A sample during which the supervisor paused claims measures
    the throttle, not the supervisor, so it is replaced, up to ``count``
    extra calls. When too few remain, the excluded samples are returned too.
    """
    kept, excluded = [], []
    while len(kept) < count and len(kept) + len(excluded) < 2 * count:
        sample, begin, end = measure()
        (excluded if supervisor.paused_during(begin, end) else kept).append(sample)
    if len(kept) < count:
        log(f"only {len(kept)} of {count} samples ran without a throttle pause, "
            f"so all {len(kept) + len(excluded)} are kept")
        return kept + excluded, len(excluded)
    return kept, len(excluded)


def excluded_note(excluded: int) -> list[str]:
    if not excluded:
        return []
    return [f"{excluded} samples overlapped a throttle pause and were replaced by new ones"]


@contextlib.contextmanager
def load_window(details: list[str]) -> Iterator[None]:
    """Add the load average and the machine's busy CPU share over the block to ``details``."""
    before_load = load_average()
    before = psutil.cpu_times()
    yield
    after = psutil.cpu_times()
    total = sum(after) - sum(before)
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    busy = 100.0 * (1 - idle / total) if total > 0 else float("nan")
    details.append(f"load average before {before_load}, after {load_average()}; "
                   f"all CPUs {busy:.0f} % busy during the scenario (this benchmark included)")


# 1. Drain -------------------------------------------------------------------

INSERT_NOOPS = sa.text(
    "INSERT INTO jobs (analysis, params, submitted_by, max_attempts) "
    "SELECT 'noop', CAST(:params AS jsonb), :user, 3 FROM generate_series(1, :count)"
)
# A raw INSERT sends no notification, so this one wakes the supervisor as store.submit would.
NOTIFY_QUEUED = sa.text("SELECT pg_notify(:channel, :payload)")


def backend_pids(engine: sa.Engine) -> list[int]:
    """Return the pids of the Postgres backends that serve supervisors on this database."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = ANY(:names)"),
            {"names": list(SUPERVISOR_APPLICATIONS)},
        )
        return [row.pid for row in rows]


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """Return user + system CPU seconds of each pid that still exists (threads included, children not)."""
    seconds = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        seconds[pid] = times.user + times.system
    return seconds


def cpu_snapshot(engine: sa.Engine, supervisor: SupervisorProcess) -> dict[str, dict[int, float]]:
    return {"supervisor": cpu_seconds([supervisor.pid]), "workers": cpu_seconds(supervisor.worker_pids()),
            "postgres": cpu_seconds(backend_pids(engine))}


def cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    # A process that appeared during the run counts from zero. The CPU time of one that ended is lost.
    return {group: sum(seconds - before[group].get(pid, 0.0) for pid, seconds in after[group].items())
            for group in after}


def drain_once(engine: sa.Engine, supervisor: SupervisorProcess, jobs: int) -> dict[str, Any]:
    clear_jobs(engine)
    time.sleep(0.5)
    before = cpu_snapshot(engine, supervisor)
    with engine.begin() as connection:
        connection.execute(INSERT_NOOPS, {"params": json.dumps({"steps": 0}), "user": BENCH_USER, "count": jobs})
        connection.execute(NOTIFY_QUEUED, {"channel": store.WORK_CHANNEL,
                                           "payload": json.dumps({"kind": "queued", "job": 0})})
    wait_until_drained(engine, supervisor, timeout=600)
    after = cpu_snapshot(engine, supervisor)
    with engine.connect() as connection:
        row = connection.execute(sa.text(
            "SELECT count(*) AS jobs, count(*) FILTER (WHERE status <> 'succeeded') AS not_succeeded, "
            "(SELECT min(created_at) FROM job_events WHERE kind = 'claimed') AS first_claim, "
            "max(finished_at) AS last_finish FROM jobs"
        )).mappings().one()
    seconds = epoch(row["last_finish"]) - epoch(row["first_claim"])
    return {"jobs": row["jobs"], "not_succeeded": row["not_succeeded"], "seconds": seconds,
            "rate": row["jobs"] / seconds, "cpu": cpu_used(before, after)}


def run_drain(engine: sa.Engine, database_url: str, work_dir: Path, sizes: Sizes) -> Result:
    details: list[str] = []
    with load_window(details), running_supervisor(engine, database_url, work_dir, "drain") as supervisor:

        def measure() -> tuple[dict[str, Any], float, float]:
            begin = time.time()
            run = drain_once(engine, supervisor, sizes.drain_jobs)
            log(f"drain run: {run['rate']:.0f} jobs/s over {run['seconds']:.2f} s")
            return run, begin, time.time()

        runs, excluded = collect_unpaused(supervisor, sizes.drain_runs, measure)
        pauses = supervisor.throttle_pauses()
    details += excluded_note(excluded)
    rates = [run["rate"] for run in runs]
    median = statistics.median(rates)
    details.append(f"{sizes.drain_jobs} jobs per run; jobs/s per run: " + ", ".join(f"{rate:.0f}" for rate in rates))
    failed = sum(run["not_succeeded"] for run in runs)
    if failed:
        details.append(f"NOTE: {failed} jobs did not succeed")
    middle = sorted(runs, key=lambda run: run["rate"])[len(runs) // 2]
    cpu = middle["cpu"]
    per_job = ", ".join(f"{group} {1e6 * seconds / middle['jobs']:.0f} us/job "
                        f"({seconds / middle['seconds']:.2f} CPUs)" for group, seconds in cpu.items())
    details.append(f"CPU time in the median run ({middle['seconds']:.2f} s): {per_job}; the Postgres "
                   "figure counts only the backends of the supervisor's connections, not WAL writer, "
                   "checkpointer or autovacuum")
    return Result(f"1. noop drain, {sizes.drain_jobs:,} jobs, 2 workers",
                  f"{median:,.0f} jobs/s", ">= 3,000 jobs/s", median >= 3000, pauses, details)


def profile_drain(engine: sa.Engine, database_url: str, work_dir: Path, sizes: Sizes, profile_path: Path) -> str:
    """Drain once with the supervisor under cProfile and return its top functions as text."""
    with running_supervisor(engine, database_url, work_dir, "drain-profiled",
                            profile_path=profile_path) as supervisor:
        run = drain_once(engine, supervisor, sizes.drain_jobs)
        log(f"profiled drain: {run['rate']:.0f} jobs/s over {run['seconds']:.2f} s")
    stats = pstats.Stats(str(profile_path), stream=io.StringIO())
    summary = (f"{run['jobs']} jobs at {run['rate']:.0f} jobs/s over {run['seconds']:.2f} s under the profiler; "
               "the profile covers the whole process, start-up and shutdown included")
    lines = [summary, "", "by cumulative time:", *profile_rows(stats, 3, 30),
             "", "by own time:", *profile_rows(stats, 2, 20)]
    return "\n".join(lines)


def short_path(path: str) -> str:
    """Return ``path`` relative to site-packages, the standard library or the repository."""
    for marker in ("site-packages/", f"python{sys.version_info.major}.{sys.version_info.minor}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    if path.startswith(str(REPO_ROOT)):
        return os.path.relpath(path, REPO_ROOT)
    return path


def profile_rows(stats: pstats.Stats, column: int, count: int) -> list[str]:
    """Return the ``count`` functions with the largest value in ``column`` (2: own time, 3: cumulative)."""
    entries = sorted(stats.stats.items(), key=lambda item: item[1][column], reverse=True)[:count]
    rows = [f"{'calls':>9} {'own s':>7} {'cum s':>7}  function"]
    for (path, line, name), (_primitive, calls, own, cumulative, _callers) in entries:
        where = f"{short_path(path)}:{line}({name})" if line else name
        rows.append(f"{calls:>9} {own:>7.3f} {cumulative:>7.3f}  {where}")
    return rows


# 2. Pick-up latency ---------------------------------------------------------


def claim_time(engine: sa.Engine, job_id: int):
    """Return the server time of the job's latest claim (its "claimed" event).

    ``jobs.started_at`` is recorded later, once the supervisor has handed the
    job to a worker, so it does not mark the claim.
    """
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT max(created_at) FROM job_events WHERE job_id = :id AND kind = 'claimed'"),
            {"id": job_id},
        ).scalar_one()


def run_pickup(engine: sa.Engine, database_url: str, work_dir: Path, sizes: Sizes) -> Result:
    details: list[str] = []
    pipe = RunLogPipe(work_dir)

    def measure() -> tuple[tuple[float, float], float, float]:
        time.sleep(random.uniform(*IDLE_SECONDS))
        job = store.submit(engine, "noop", {"steps": 1, "run_log": pipe.path}, user=BENCH_USER).job
        committed = time.time()
        started = pipe.wait(job.id, "start", timeout=30)
        pipe.wait(job.id, "end", timeout=30)
        claimed = epoch(claim_time(engine, job.id))
        return (started - committed, claimed - committed), committed, started

    try:
        with load_window(details), running_supervisor(engine, database_url, work_dir, "pickup") as supervisor:
            for _ in range(PICKUP_WARMUP):
                measure()
            samples, excluded = collect_unpaused(supervisor, sizes.pickup_samples, measure)
            pauses = supervisor.throttle_pauses()
    finally:
        pipe.close()
    latencies = [latency for latency, _ in samples]
    to_claim = [claim for _, claim in samples]
    details += excluded_note(excluded)
    after_claim = [latency - claim for latency, claim in samples]
    p50, p95 = percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.95) * 1e3
    details.append(f"{len(latencies)} samples after {PICKUP_WARMUP} warm-up jobs; min {min(latencies) * 1e3:.2f} ms, "
                   f"max {max(latencies) * 1e3:.2f} ms")
    details.append(f"commit to the claim transaction's now(): p50 {percentile(to_claim, 0.5) * 1e3:.2f} ms, "
                   f"p95 {percentile(to_claim, 0.95) * 1e3:.2f} ms; from there to the body's start (claim "
                   f"statement, commit, dispatch, worker): p50 {percentile(after_claim, 0.5) * 1e3:.2f} ms, "
                   f"p95 {percentile(after_claim, 0.95) * 1e3:.2f} ms")
    return Result(f"2. pick-up latency, idle ({len(latencies)} samples)", f"p50 {p50:.2f} ms / p95 {p95:.2f} ms",
                  "<= 3 / <= 6 ms", p50 <= 3 and p95 <= 6, pauses, details)


# 3. CPU-bound makespan ------------------------------------------------------


def run_makespan(engine: sa.Engine, database_url: str, work_dir: Path, sizes: Sizes) -> Result:
    details: list[str] = []
    ideal = CPU_JOBS * CPU_JOB_SECONDS / WORKERS
    pickups: list[float] = []
    gaps: list[float] = []
    tails: list[float] = []
    pipe = RunLogPipe(work_dir)
    params = {"steps": 1, "step_seconds": CPU_JOB_SECONDS, "cpu": True, "run_log": pipe.path}

    def measure() -> tuple[tuple[float, float], float, float]:
        time.sleep(1.0)
        with engine.begin() as connection:
            ids = [store.submit(connection, "noop", params, user=BENCH_USER).job.id for _ in range(CPU_JOBS)]
        committed = time.time()
        bodies = {job_id: (pipe.wait(job_id, "start", timeout=60), pipe.wait(job_id, "end", timeout=60))
                  for job_id in ids}
        rows = [wait_for_status(engine, job_id, {"succeeded", "failed", "cancelled"}, timeout=60) for job_id in ids]
        if any(row["status"] != "succeeded" for row in rows):
            raise RuntimeError(f"not all {CPU_JOBS} CPU jobs succeeded: {[row['status'] for row in rows]}")
        first_claim = min(epoch(claim_time(engine, row["id"])) for row in rows)
        last_finish = max(epoch(row["finished_at"]) for row in rows)
        ratio = (last_finish - committed) / ideal
        log(f"makespan run: ratio {ratio:.4f}")
        # Where the time beyond the ideal goes: before the first body starts, between one body's end
        # and the next body's start on the same worker, and after the last body ends.
        pickups.append(min(start for start, _ in bodies.values()) - committed)
        by_worker: dict[int, list[tuple[float, float]]] = {}
        for job_id, body in bodies.items():
            by_worker.setdefault(pipe.pids[job_id], []).append(body)
        for worker_bodies in by_worker.values():
            worker_bodies.sort()
            gaps.extend(later[0] - earlier[1] for earlier, later in itertools.pairwise(worker_bodies))
        tails.append(last_finish - max(end for _, end in bodies.values()))
        return (ratio, (last_finish - first_claim) / ideal), committed, last_finish

    try:
        with load_window(details), running_supervisor(engine, database_url, work_dir, "makespan") as supervisor:
            samples, excluded = collect_unpaused(supervisor, sizes.makespan_runs, measure)
            pauses = supervisor.throttle_pauses()
    finally:
        pipe.close()
    ratios = [ratio for ratio, _ in samples]
    claim_ratios = [ratio for _, ratio in samples]
    details += excluded_note(excluded)
    median = statistics.median(ratios)
    details.append(f"ideal {ideal:.1f} s; ratio per run: " + ", ".join(f"{ratio:.4f}" for ratio in ratios))
    details.append(f"counted from the first claim instead of the commit: median {statistics.median(claim_ratios):.4f}")
    details.append(f"commit to the first body's start: p50 {percentile(pickups, 0.5) * 1e3:.1f} ms; one body's end "
                   f"to the next body's start on the same worker: p50 {percentile(gaps, 0.5) * 1e3:.1f} ms, "
                   f"p95 {percentile(gaps, 0.95) * 1e3:.1f} ms ({len(gaps)} hand-overs); last body's end to "
                   f"finished_at: p50 {percentile(tails, 0.5) * 1e3:.1f} ms (all runs, replaced ones included)")
    return Result(f"3. makespan ratio, {CPU_JOBS} x {CPU_JOB_SECONDS} s CPU jobs on 2 workers",
                  f"{median:.4f} ({median * ideal:.3f} s)", "<= 1.02", median <= 1.02, pauses, details)


# 4 and 5. Cancel latency ----------------------------------------------------


def cancel_samples(engine: sa.Engine, supervisor: SupervisorProcess, pipe: RunLogPipe, samples: int,
                   params: dict[str, Any], before_sample: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Start a job, cancel it 50 to 150 ms into its body and return the timings of each sample."""
    results = []
    for index in range(samples):
        if before_sample is not None:
            before_sample(index)
        job = store.submit(engine, "noop", {**params, "run_log": pipe.path}, user=BENCH_USER).job
        pipe.wait(job.id, "start", timeout=30)
        time.sleep(random.uniform(*IDLE_SECONDS))
        store.request_cancel(engine, job.id, by=BENCH_USER)
        committed = time.time()
        row = wait_for_status(engine, job.id, {"cancelled", "failed", "succeeded"}, timeout=30)
        if row["status"] != "cancelled":
            raise RuntimeError(f"job {job.id} ended {row['status']} instead of cancelled: {row['error']}")
        requested = [event for event in store.list_events(engine, job.id) if event.kind == "cancel_requested"]
        finished = epoch(row["finished_at"])
        results.append({"server": finished - epoch(requested[0].created_at), "client": finished - committed,
                        "stage": row["error"]["details"]["stage"]})
        supervisor.check_alive()
    return results


def run_cancel(engine: sa.Engine, database_url: str, work_dir: Path, sizes: Sizes) -> Result:
    details: list[str] = []
    pipe = RunLogPipe(work_dir)
    params = {"steps": 100_000, "step_seconds": 0.001}
    try:
        with load_window(details), running_supervisor(engine, database_url, work_dir, "cancel") as supervisor:
            samples = cancel_samples(engine, supervisor, pipe, sizes.cancel_samples, params)
            pauses = supervisor.throttle_pauses()
    finally:
        pipe.close()
    server = [sample["server"] * 1e3 for sample in samples]
    client = [sample["client"] * 1e3 for sample in samples]
    stages = sorted({sample["stage"] for sample in samples})
    p50 = percentile(server, 0.5)
    details.append(f"{len(samples)} samples; max {max(server):.2f} ms; stop stage {', '.join(stages)}")
    details.append(f"from this process's commit of the request instead: p50 {percentile(client, 0.5):.2f} ms, "
                   f"p95 {percentile(client, 0.95):.2f} ms")
    return Result(f"4. cancel, job checks every 1 ms ({len(samples)} samples)",
                  f"p50 {p50:.2f} ms / p95 {percentile(server, 0.95):.2f} ms", "p50 <= 20 ms", p50 <= 20,
                  pauses, details)


def run_ignored_cancel(engine: sa.Engine, database_url: str, work_dir: Path, sizes: Sizes) -> Result:
    details: list[str] = []
    pipe = RunLogPipe(work_dir)
    params = {"steps": 100_000, "step_seconds": 0.001, "ignore_cancel": True}
    settings = {"ANALYSIS_CANCEL_GRACE_SECONDS": str(CANCEL_GRACE_SECONDS)}
    try:
        with load_window(details), running_supervisor(engine, database_url, work_dir, "cancel-ignored",
                                                      settings) as supervisor:

            def wait_for_workers(index: int) -> None:
                # Each earlier sample's termination replaced one worker, so wait until the new one is ready.
                deadline = time.monotonic() + 60
                while len(supervisor.events("worker_started")) < WORKERS + index:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the replacement worker did not start within 60 s")
                    supervisor.check_alive()
                    time.sleep(0.05)
                time.sleep(0.2)

            samples = cancel_samples(engine, supervisor, pipe, sizes.ignored_cancel_samples, params, wait_for_workers)
            pauses = supervisor.throttle_pauses()
    finally:
        pipe.close()
    over = [(sample["server"] - CANCEL_GRACE_SECONDS) * 1e3 for sample in samples]
    stages = sorted({sample["stage"] for sample in samples})
    p50 = percentile(over, 0.5)
    details.append(f"{len(samples)} samples; over the grace period: min {min(over):.1f} ms, "
                   f"max {max(over):.1f} ms; stop stage {', '.join(stages)}")
    return Result(f"5. cancel, job ignores it, grace {CANCEL_GRACE_SECONDS:g} s ({len(samples)} samples)",
                  f"grace + {p50:.1f} ms (p95 + {percentile(over, 0.95):.1f} ms)", "grace + <= 100 ms",
                  p50 <= 100, pauses, details)


# 6. One progress call -------------------------------------------------------


def run_progress_call(sizes: Sizes) -> Result:
    details: list[str] = []
    writer = SlotWriter(create_array(1), 0)
    writer.begin_job(1, 1)
    # A known total, as noop sets one, so the clamp to the total runs too.
    writer.phase("steps", total=2 ** 62)
    progress = writer.progress

    def empty(completed: int) -> None:
        pass

    def time_calls(function: Callable[[int], None], first: int) -> float:
        started = time.perf_counter_ns()
        for completed in range(first, first + sizes.progress_calls):
            function(completed)
        return (time.perf_counter_ns() - started) / sizes.progress_calls

    per_call, baseline = [], []
    counter = 1
    with load_window(details):
        for _ in range(sizes.progress_call_repeats):
            per_call.append(time_calls(progress, counter))
            counter += sizes.progress_calls
            baseline.append(time_calls(empty, 0))
    median = statistics.median(per_call)
    details.append(f"{sizes.progress_call_repeats} repeats of {sizes.progress_calls:,} calls; "
                   f"min {min(per_call):.0f} ns, "
                   f"max {max(per_call):.0f} ns")
    details.append(f"the same loop calling an empty Python function: median {statistics.median(baseline):.0f} ns")
    return Result("6. SlotWriter.progress, one call", f"{median:.0f} ns", "<= 1,000 ns", median <= 1000, None, details)


# 7. Progress visible in Postgres --------------------------------------------


def progress_writes(engine: sa.Engine, pipe: RunLogPipe, job_id: int, steps: int) -> tuple[float, float, list]:
    """Poll the job's row until its body ends, and return body start, body end and the distinct progress writes."""
    started = pipe.wait(job_id, "start", timeout=30)
    writes: list[tuple[int, float]] = []
    seen = set()
    query = sa.text("SELECT status, progress_completed, progress_updated_at FROM jobs WHERE id = :id")
    deadline = time.monotonic() + steps * PROGRESS_STEP_SECONDS * 3 + 30
    with engine.connect() as connection:
        while (job_id, "end") not in pipe.arrivals:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish in time")
            row = connection.execute(query, {"id": job_id}).one()
            connection.rollback()
            if row.status == "running" and row.progress_updated_at is not None:
                key = (row.progress_completed, row.progress_updated_at)
                if key not in seen:
                    seen.add(key)
                    writes.append((row.progress_completed, epoch(row.progress_updated_at)))
            pipe.read(PROGRESS_POLL_SECONDS)
    return started, pipe.arrivals[(job_id, "end")], sorted(writes, key=lambda write: write[1])


def run_progress_visible(engine: sa.Engine, database_url: str, work_dir: Path, sizes: Sizes) -> Result:
    details: list[str] = []
    pipe = RunLogPipe(work_dir)
    delays, freshest, gaps, run_medians = [], [], [], []
    try:
        with load_window(details), running_supervisor(engine, database_url, work_dir, "progress") as supervisor:
            for _ in range(sizes.progress_runs):
                time.sleep(0.5)
                params = {"steps": sizes.progress_steps, "step_seconds": PROGRESS_STEP_SECONDS, "run_log": pipe.path}
                job = store.submit(engine, "noop", params, user=BENCH_USER).job
                started, ended, writes = progress_writes(engine, pipe, job.id, sizes.progress_steps)
                step = (ended - started) / sizes.progress_steps
                previous = 0
                run_delays = []
                for index, (completed, updated) in enumerate(writes):
                    if completed is None or completed <= previous:
                        continue
                    run_delays.append(updated - (started + (previous + 1) * step))
                    freshest.append(updated - (started + completed * step))
                    if index > 0:
                        gaps.append(updated - writes[index - 1][1])
                    previous = completed
                delays += run_delays
                run_medians.append(statistics.median(run_delays))
                log(f"progress run: {len(run_delays)} writes, median delay {run_medians[-1]:.3f} s")
            pauses = supervisor.throttle_pauses()
    finally:
        pipe.close()
    p50, p95 = percentile(delays, 0.5), percentile(delays, 0.95)
    details.append(f"{len(delays)} progress writes in {sizes.progress_runs} runs of {sizes.progress_steps} steps; "
                   f"median per run: " + ", ".join(f"{value:.3f} s" for value in run_medians)
                   + f"; max {max(delays):.3f} s")
    details.append("age of the newest step a write reveals, which is the supervisor's read of shared memory "
                   "to the row update plus up to one step: "
                   f"p50 {percentile(freshest, 0.5) * 1e3:.1f} ms, "
                   f"p95 {percentile(freshest, 0.95) * 1e3:.1f} ms")
    details.append(f"time between consecutive writes: p50 {percentile(gaps, 0.5):.3f} s, "
                   f"p95 {percentile(gaps, 0.95):.3f} s, max {max(gaps):.3f} s")
    return Result("7. progress visible in Postgres, interval 0.5 s", f"p50 {p50:.3f} s / p95 {p95:.3f} s",
                  "<= 0.6 s", p95 <= 0.6, pauses, details)


# Report ---------------------------------------------------------------------


def machine_lines(engine: sa.Engine) -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with engine.connect() as connection:
        version = connection.execute(sa.text("SHOW server_version")).scalar_one()
        commit = connection.execute(sa.text("SHOW synchronous_commit")).scalar_one()
    return [f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {psutil.cpu_count()} CPUs, {model}, {platform.system()} {platform.release()}",
            f"- PostgreSQL {version} (synchronous_commit {commit}), Python {platform.python_version()}",
            f"- load average at start: {load_average()}"]


def source_state() -> str:
    """Return the commit of the tree under test and whether its service code had uncommitted changes."""
    def git(*arguments: str) -> str:
        completed = subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return completed.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "supervisor", "analyses")
    state = f"{len(changed.splitlines())} uncommitted changes in supervisor/ and analyses/" if changed else "clean"
    return f"- source: commit {commit}, {state}"


def commit_milliseconds(engine: sa.Engine, samples: int = 200) -> tuple[float, float]:
    """Return the median ms of a round trip without a write, and of a one-row UPDATE with its commit."""
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE bench_commit (id int PRIMARY KEY, n int NOT NULL)"))
        connection.execute(sa.text("INSERT INTO bench_commit VALUES (1, 0)"))
    reads, writes = [], []
    with engine.connect() as connection:
        for _ in range(samples):
            started = time.perf_counter()
            connection.execute(sa.text("SELECT 1"))
            connection.commit()
            reads.append(time.perf_counter() - started)
            started = time.perf_counter()
            connection.execute(sa.text("UPDATE bench_commit SET n = n + 1 WHERE id = 1"))
            connection.commit()
            writes.append(time.perf_counter() - started)
        connection.execute(sa.text("DROP TABLE bench_commit"))
        connection.commit()
    return statistics.median(reads) * 1e3, statistics.median(writes) * 1e3


def busy_processes() -> list[str]:
    """Return the other processes that used more than 10 % of a CPU over one second."""
    own = {os.getpid()}
    processes = []
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        if process.pid in own:
            continue
        with contextlib.suppress(psutil.Error):
            process.cpu_percent(None)
            processes.append(process)
    time.sleep(1.0)
    busy = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            percent = process.cpu_percent(None)
            if percent > 10:
                command = " ".join(process.info["cmdline"] or [process.info["name"]])[:100]
                busy.append(f"{percent:.0f} % {command}")
    return busy


def render(results: list[Result], header: list[str], profile_text: str | None) -> str:
    lines = ["## Supervisor benchmark", "", *header, "",
             "| scenario | result | target | met? | throttle pauses |", "| --- | --- | --- | --- | ---: |"]
    for result in results:
        met = {True: "yes", False: "no", None: "-"}[result.met]
        pauses = "-" if result.throttle_pauses is None else str(result.throttle_pauses)
        lines.append(f"| {result.scenario} | {result.result} | {result.target} | {met} | {pauses} |")
    lines += ["", "### Details", ""]
    for result in results:
        lines.append(f"- {result.scenario}")
        lines += [f"  - {detail}" for detail in result.details]
    if profile_text:
        lines += ["", "### Profile of one drain (supervisor process)", "", "```", profile_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


SCENARIOS = ("drain", "pickup", "makespan", "cancel", "cancel-ignored", "progress-call", "progress-visible")


def main() -> int:
    parser = argparse.ArgumentParser(description="Measure the supervisor's overhead against a real Postgres.")
    parser.add_argument("--quick", action="store_true", help="fewer jobs and samples, for a check in about two minutes")
    parser.add_argument("--database-url",
                        help="Postgres server to create the scratch database on "
                             f"(default: ANALYSIS_DATABASE_URL, else {DEFAULT_SERVER_URL})")
    parser.add_argument("--only", action="append", choices=SCENARIOS,
                        help="scenario to run, repeatable (default: all)")
    parser.add_argument("--profile", type=Path,
                        help="also drain once under cProfile, save the profile to this file "
                             "and print its top functions")
    parser.add_argument("--output", type=Path, help="also write the markdown to this file")
    arguments = parser.parse_args()

    sizes = QUICK if arguments.quick else FULL
    chosen = arguments.only or list(SCENARIOS)
    server_url = arguments.database_url or os.environ.get("ANALYSIS_DATABASE_URL") or DEFAULT_SERVER_URL
    others = busy_processes()
    results: list[Result] = []
    profile_text = None
    with tempfile.TemporaryDirectory(prefix="bench_sup_") as temporary, scratch_database(server_url) as url:
        work_dir = Path(temporary)
        # No pre-ping, so each transaction of this script costs no extra round trip.
        engine = sa.create_engine(url, pool_pre_ping=False, connect_args={"application_name": BENCH_APPLICATION})
        try:
            header = machine_lines(engine)
            header.append(source_state())
            header.append("- other processes above 10 % of a CPU at start: " + ("; ".join(others) or "none"))
            read_ms, write_ms = commit_milliseconds(engine)
            header.append(f"- from this script: SELECT 1 and commit {read_ms:.2f} ms, one-row UPDATE and commit "
                          f"{write_ms:.2f} ms (medians of 200)")
            scenarios: dict[str, Callable[[], Result]] = {
                "drain": lambda: run_drain(engine, url, work_dir, sizes),
                "pickup": lambda: run_pickup(engine, url, work_dir, sizes),
                "makespan": lambda: run_makespan(engine, url, work_dir, sizes),
                "cancel": lambda: run_cancel(engine, url, work_dir, sizes),
                "cancel-ignored": lambda: run_ignored_cancel(engine, url, work_dir, sizes),
                "progress-call": lambda: run_progress_call(sizes),
                "progress-visible": lambda: run_progress_visible(engine, url, work_dir, sizes),
            }
            for name in SCENARIOS:
                if name not in chosen:
                    continue
                log(f"-- {name}")
                clear_jobs(engine)
                results.append(scenarios[name]())
                log(f"{results[-1].scenario}: {results[-1].result}")
            if arguments.profile:
                log("-- drain under cProfile")
                clear_jobs(engine)
                profile_text = profile_drain(engine, url, work_dir, sizes, arguments.profile.resolve())
        finally:
            engine.dispose()
    text = render(results, header, profile_text)
    print(text)
    if arguments.output:
        arguments.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
