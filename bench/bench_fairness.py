"""Simulate the claim order on a real Postgres and report how long jobs wait.

No worker runs: a discrete-event loop keeps a simulated clock, a number of
slots and each job's duration. Whenever a slot frees, it finishes that job
with the real ``runs.succeed_run`` and claims the next with the real
``runs.claim_jobs``, so the order comes from the service's own claim
statement. Jobs are inserted with the queue key a submit at that simulated
time would give them. Each scenario also runs with a plain claim in queue
key order and no fairness (what the service did before), as a baseline.

Scenarios:

- flood: user A submits 1,000 jobs of 2 s at t=0; user B submits 5 at t=5 s;
  2 slots. Reports B's waits and checks that A's jobs keep their order.
- aging: one user submits a job of priority 0 at t=1 s and a stream of jobs of
  priority 5 that outruns the 2 slots (one every 0.9 s, 2 s each, until
  t=1,500 s). Reports the low-priority job's wait against the bound that the
  aging gives: 5 points x 60 s of overtaking, plus the backlog ahead of it.
- limits: users A, B and C each submit 100 jobs of 1 s at t=0; 4 slots;
  user A may run 1 at a time. Reports the largest number of A's jobs
  running at once and each user's mean wait.

Usage::

    .venv/bin/python bench/bench_fairness.py --output bench/RESULTS-fairness.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import make_url

from supervisor import db, runs, store

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
OWNER = uuid.UUID("00000000-0000-4000-8000-0000000fa1e5")

# The claim order the service used before fair scheduling: priority, then
# age, for everyone alike.
PRIORITY_CLAIM = sa.text(
    """
    UPDATE jobs SET status = 'running', attempt = attempt + 1, attempt_token = gen_random_uuid(),
        lease_owner = :owner, lease_expires_at = now() + interval '1 hour', started_at = now()
    WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority DESC, id LIMIT 1
                FOR UPDATE SKIP LOCKED)
    RETURNING *
    """
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    name = f"bench_fair_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    libpq = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(db.normalise_url(server_url)).set(database=name).render_as_string(hide_password=False)
    try:
        db.upgrade(url)
        yield url
    finally:
        with psycopg.connect(libpq, autocommit=True) as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclasses.dataclass(frozen=True)
class Arrival:
    at: float
    user: str
    priority: int
    duration: float


@dataclasses.dataclass
class Outcome:
    submitted: dict[int, float] = dataclasses.field(default_factory=dict)
    started: dict[int, float] = dataclasses.field(default_factory=dict)
    user: dict[int, str] = dataclasses.field(default_factory=dict)
    priority: dict[int, int] = dataclasses.field(default_factory=dict)
    peak_running: dict[str, int] = dataclasses.field(default_factory=dict)
    claim_seconds: list[float] = dataclasses.field(default_factory=list)

    def waits(self, user: str | None = None, priority: int | None = None) -> list[float]:
        return [self.started[job] - self.submitted[job] for job in self.started
                if (user is None or self.user[job] == user) and (priority is None or self.priority[job] == priority)]


def fair_claim(engine: sa.Engine) -> store.Job | None:
    jobs = runs.claim_jobs(engine, OWNER, 1, lease_seconds=3600)
    return jobs[0] if jobs else None


def priority_claim(engine: sa.Engine) -> store.Job | None:
    with engine.begin() as connection:
        row = connection.execute(PRIORITY_CLAIM, {"owner": OWNER}).first()
    return store.Job.from_row(row) if row is not None else None


def simulate(engine: sa.Engine, arrivals: list[Arrival], slots: int,
             claim: Callable[[sa.Engine], store.Job | None], until: float) -> Outcome:
    """Run the event loop until ``until`` simulated seconds or until nothing is left."""
    with engine.begin() as connection:
        connection.execute(sa.text("TRUNCATE job_results, job_events, jobs RESTART IDENTITY"))
    outcome = Outcome()
    durations: dict[int, float] = {}
    pending = sorted(arrivals, key=lambda arrival: arrival.at)
    next_arrival = 0
    # (free at, slot, job, token)
    busy: list[tuple[float, int, int, uuid.UUID]] = []
    idle = list(range(slots))
    running_by_user: dict[str, int] = {}

    def fill(clock: float) -> None:
        while idle:
            started = time.perf_counter()
            job = claim(engine)
            outcome.claim_seconds.append(time.perf_counter() - started)
            if job is None:
                return
            slot = idle.pop()
            outcome.started[job.id] = clock
            running_by_user[job.submitted_by] = running_by_user.get(job.submitted_by, 0) + 1
            outcome.peak_running[job.submitted_by] = max(outcome.peak_running.get(job.submitted_by, 0),
                                                         running_by_user[job.submitted_by])
            heapq.heappush(busy, (clock + durations[job.id], slot, job.id, job.attempt_token))

    while True:
        arrival_at = pending[next_arrival].at if next_arrival < len(pending) else float("inf")
        finish_at = busy[0][0] if busy else float("inf")
        clock = min(arrival_at, finish_at)
        if clock == float("inf") or clock > until:
            break
        if arrival_at <= finish_at:
            batch = []
            while next_arrival < len(pending) and pending[next_arrival].at == clock:
                batch.append(pending[next_arrival])
                next_arrival += 1
            with engine.begin() as connection:
                for arrival in batch:
                    job_id = connection.execute(sa.text(
                        "INSERT INTO jobs (analysis, params, submitted_by, max_attempts, priority, queue_key) "
                        "VALUES ('noop', '{}', :user, 1, :priority, :key) RETURNING id"),
                        {"user": arrival.user, "priority": arrival.priority,
                         "key": clock - arrival.priority * store.PRIORITY_STEP_SECONDS}).scalar_one()
                    outcome.submitted[job_id] = clock
                    outcome.user[job_id] = arrival.user
                    outcome.priority[job_id] = arrival.priority
                    durations[job_id] = arrival.duration
        else:
            _, slot, job_id, token = heapq.heappop(busy)
            runs.succeed_run(engine, job_id, token, {})
            running_by_user[outcome.user[job_id]] -= 1
            idle.append(slot)
        fill(clock)
    return outcome


def flood(engine, claim) -> Outcome:
    arrivals = [Arrival(0.0, "A", 0, 2.0) for _ in range(1000)] + [Arrival(5.0, "B", 0, 2.0) for _ in range(5)]
    # Long enough for B's five jobs under either claim order.
    return simulate(engine, arrivals, slots=2, claim=claim, until=1100.0)


def aging(engine, claim) -> Outcome:
    arrivals = [Arrival(1.0, "A", 0, 2.0)]
    arrivals += [Arrival(round(0.9 * index, 3), "A", 5, 2.0) for index in range(int(1500 / 0.9))]
    return simulate(engine, arrivals, slots=2, claim=claim, until=2000.0)


def limits(engine, claim) -> Outcome:
    arrivals = [Arrival(0.0, user, 0, 1.0) for user in ("A", "B", "C") for _ in range(100)]
    store.set_limit(engine, "user", "A", 1)
    try:
        return simulate(engine, arrivals, slots=4, claim=claim, until=1000.0)
    finally:
        store.clear_limit(engine, "user", "A")


def seconds(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s (max {max(values):.1f} s)" if values else "never started"


def report(engine: sa.Engine) -> list[str]:
    lines = ["| scenario | measure | fair claim | before: priority, then age |", "| --- | --- | --- | --- |"]
    claim_times: list[float] = []

    log("flood")
    fair, before = flood(engine, fair_claim), flood(engine, priority_claim)
    claim_times += fair.claim_seconds
    a_order = sorted((job for job in fair.started if fair.user[job] == "A"), key=fair.started.get)
    lines.append(f"| flood | B's wait, median (max) | {seconds(fair.waits('B'))} | {seconds(before.waits('B'))} |")
    lines.append(f"| flood | A's jobs started in submit order | {a_order == sorted(a_order)} | - |")

    log("aging")
    fair, before = aging(engine, fair_claim), aging(engine, priority_claim)
    claim_times += fair.claim_seconds
    lines.append(f"| aging | priority-0 job's wait behind priority-5 stream | {seconds(fair.waits(priority=0))} "
                 f"| {seconds(before.waits(priority=0))} |")

    log("limits")
    fair = limits(engine, fair_claim)
    before = limits(engine, priority_claim)
    claim_times += fair.claim_seconds
    lines.append(f"| limits | most of A's jobs running at once (limit 1) | {fair.peak_running.get('A')} "
                 f"| {before.peak_running.get('A')} |")
    for user in ("A", "B", "C"):
        lines.append(f"| limits | {user}'s mean wait | {statistics.fmean(fair.waits(user)):.1f} s "
                     f"| {statistics.fmean(before.waits(user)):.1f} s |")
    lines.append("")
    lines.append(f"Claim statement, one job per call, with up to 1,700 queued jobs: median "
                 f"{statistics.median(claim_times) * 1000:.2f} ms over {len(claim_times)} calls "
                 f"(wall clock, including the commit).")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help=f"Postgres server for the scratch database "
                                               f"(default: ANALYSIS_DATABASE_URL, else {DEFAULT_SERVER_URL})")
    parser.add_argument("--output", type=Path, help="also write the markdown to this file")
    arguments = parser.parse_args()
    server_url = arguments.database_url or os.environ.get("ANALYSIS_DATABASE_URL") or DEFAULT_SERVER_URL
    with scratch_database(server_url) as url:
        engine = db.create_engine(url, pool_pre_ping=False)
        try:
            with engine.connect() as connection:
                version = connection.execute(sa.text("SHOW server_version")).scalar_one()
            lines = [f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
                     f"- PostgreSQL {version}; simulated time, real claim statements", "", *report(engine)]
        finally:
            engine.dispose()
    text = "\n".join(lines) + "\n"
    print(text)
    if arguments.output:
        arguments.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
