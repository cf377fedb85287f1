"""Measure the job store's queries on a table of a million finished jobs.

Creates a scratch database on the server and migrates it to head. Loads
``--finished`` finished jobs (default 1,000,000), ``--queued`` queued jobs
(default 1,000) and 16 running ones, then runs ``VACUUM (ANALYZE)``. For each
query the service makes, prints the ``EXPLAIN (ANALYZE, BUFFERS)`` plan and
the median wall-clock time of ``--runs`` executions as Markdown. The scratch
database is dropped at the end.

The SQL is not copied here. Each query is captured from a call of the real
function in ``supervisor.store``, ``runs`` or ``sweeps`` (see
``capture_statements``), and for the statements that change rows only their
row-selecting ``SELECT ... FOR UPDATE SKIP LOCKED`` part is measured, inside a
transaction that is rolled back. Nothing in the loaded data changes.

Usage::

    ANALYSIS_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/bench_store_indexes.py > bench/out/store.md

Without ``ANALYSIS_DATABASE_URL`` (or ``--server-url``) the embedded server is
started in a temporary folder, as the tests do.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import make_url

from supervisor import db, embedded, runs, store, sweeps
from supervisor.transitions import Status, sources  # noqa: E402

SUPERVISOR_ID = uuid.UUID("00000000-0000-4000-8000-00000000be0c")
# Statements the captured functions would run are replaced by this one, so
# capturing reads and writes nothing.
EMPTY_QUERY = "SELECT 1 WHERE false"
# The part of a sweep or claim statement that picks the rows it then changes.
LOCKING_SELECT = re.compile(r"WITH\s+\w+\s+AS\s+\(\s*(SELECT\b.*?FOR UPDATE SKIP LOCKED)\s*\)", re.DOTALL)
# In a statement of several CTEs: the first CTE that changes rows, and every CTE name.
WRITING_CTE = re.compile(r",\s*\w+\s+AS\s+\(\s*(?:UPDATE|INSERT|DELETE)\b")
CTE_NAME = re.compile(r"(\w+)\s+AS\s+(?:NOT\s+)?(?:MATERIALIZED\s+)?\(")

# Loads `finished` finished jobs with ids in submission order over 90 days.
# Status: 90 % succeeded, 6 % failed, 3 % cancelled, 1 % expired before they
# started. Results expire 7 days after a success, so older successes are
# 'expired' too. Analyses and users are skewed the way a controller that
# submits most jobs itself would skew them.
LOAD_FINISHED = """
INSERT INTO jobs (analysis, params, job_key, status, priority, submitted_by, created_at, updated_at,
                  started_at, finished_at, attempt, max_attempts, run_after, start_by, error, result,
                  results_expire_at, event_seq)
SELECT analysis, '{"steps": 10}'::jsonb,
       CASE WHEN r_key < 0.3 THEN 'key-' || g END,
       CASE WHEN outcome = 'success' AND finished + interval '7 days' > now() THEN 'succeeded'
            WHEN outcome = 'success' THEN 'expired'
            ELSE outcome END,
       0, submitted_by, created, finished,
       CASE WHEN outcome = 'expired' THEN NULL ELSE created + interval '1 second' END,
       finished,
       CASE WHEN outcome = 'expired' THEN 0 ELSE 1 END, 3, created,
       CASE WHEN outcome = 'expired' THEN created + interval '1 minute' END,
       CASE WHEN outcome = 'failed' THEN '{"code": "analysis_error", "message": "injected"}'::jsonb
            WHEN outcome = 'cancelled' THEN '{"code": "cancelled", "message": "cancelled"}'::jsonb END,
       CASE WHEN outcome = 'success' THEN '{"rows": 10}'::jsonb END,
       CASE WHEN outcome = 'success' THEN finished + interval '7 days' END,
       3
FROM (
    SELECT g, r_key, created,
           created + make_interval(secs => 1 + r_duration * 600) AS finished,
           CASE WHEN r_outcome < 0.90 THEN 'success' WHEN r_outcome < 0.96 THEN 'failed'
                WHEN r_outcome < 0.99 THEN 'cancelled' ELSE 'expired' END AS outcome,
           CASE WHEN r_analysis < 0.40 THEN 'matrix-profile' WHEN r_analysis < 0.65 THEN 'correlation'
                WHEN r_analysis < 0.85 THEN 'anomaly-scan' WHEN r_analysis < 0.95 THEN 'spectral'
                ELSE 'noop' END AS analysis,
           CASE WHEN r_user < 0.5 THEN 'controller'
                ELSE 'user-' || lpad(floor(40 * r_user2 * r_user2)::int::text, 2, '0') END AS submitted_by
    FROM (
        SELECT g, random() AS r_key, random() AS r_duration, random() AS r_outcome, random() AS r_analysis,
               random() AS r_user, random() AS r_user2,
               now() - interval '90 days' - interval '1 hour' + (interval '90 days' * g / :finished) AS created
        FROM generate_series(1, :finished) AS g
    ) AS draws
) AS job
"""

# Successes whose results expired a moment ago: what the results sweep finds
# when it runs every minute. Counted in the finished total.
RESULTS_DUE = 50
LOAD_RESULTS_DUE = """
INSERT INTO jobs (analysis, params, status, submitted_by, created_at, updated_at, started_at, finished_at,
                  attempt, max_attempts, result, results_expire_at, event_seq)
SELECT 'correlation', '{}'::jsonb, 'succeeded', 'controller', now() - interval '7 days 10 minutes',
       now() - interval '7 days', now() - interval '7 days 9 minutes', now() - interval '7 days',
       1, 3, '{"rows": 1}'::jsonb, now() - interval '30 seconds', 3
FROM generate_series(1, :count)
"""

# Queued jobs of the last hour: 5 % at priority 10 and 5 % at -10, 5 % in
# retry backoff, 10 % with a start-by deadline of which a tenth has passed.
LOAD_QUEUED = """
INSERT INTO jobs (analysis, params, job_key, status, priority, submitted_by, created_at, updated_at,
                  attempt, max_attempts, run_after, start_by)
SELECT 'matrix-profile', '{"steps": 10}'::jsonb, 'queued-' || g, 'queued',
       CASE WHEN r_priority < 0.05 THEN 10 WHEN r_priority < 0.10 THEN -10 ELSE 0 END,
       CASE WHEN r_user < 0.5 THEN 'controller' ELSE 'user-' || lpad((g % 40)::text, 2, '0') END,
       now() - interval '1 hour' + interval '1 hour' * g / :queued,
       now() - interval '1 hour' + interval '1 hour' * g / :queued,
       0, 3,
       CASE WHEN r_backoff < 0.05 THEN now() + interval '5 minutes' ELSE now() - interval '1 hour' END,
       CASE WHEN r_deadline < 0.01 THEN now() - interval '1 minute'
            WHEN r_deadline < 0.10 THEN now() + interval '1 day' END
FROM (
    SELECT g, random() AS r_priority, random() AS r_user, random() AS r_backoff, random() AS r_deadline
    FROM generate_series(1, :queued) AS g
) AS draws
"""

# Two supervisors with 8 slots each. Two of the leases expired a moment ago.
RUNNING = 16
LOAD_RUNNING = """
INSERT INTO jobs (analysis, params, status, submitted_by, created_at, updated_at, started_at, attempt,
                  max_attempts, lease_owner, lease_expires_at, attempt_token, event_seq)
SELECT 'spectral', '{}'::jsonb, 'running', 'controller', now() - interval '2 minutes', now(),
       now() - interval '1 minute', 1, 3,
       CASE WHEN g % 2 = 0 THEN CAST(:owner_a AS uuid) ELSE CAST(:owner_b AS uuid) END,
       CASE WHEN g <= 2 THEN now() - interval '10 seconds' ELSE now() + interval '30 seconds' END,
       gen_random_uuid(), 2
FROM generate_series(1, :count) AS g
"""


@dataclasses.dataclass(frozen=True)
class Query:
    """One statement the service runs, as the function that runs it."""

    name: str
    function: str
    call: Callable[[sa.Connection], Any]
    # Index of the statement among those the call runs.
    statement: int = 0
    # The (SQL, parameters) to measure, for a call that sends its statements
    # through the driver, where SQLAlchemy's events do not see them.
    sql: Callable[[], tuple[str, dict]] | None = None

    def captured(self, engine: sa.Engine) -> tuple[str, dict]:
        if self.sql is not None:
            return self.sql()
        return capture_statements(engine, self.call)[self.statement]


def claim_statement() -> tuple[str, dict]:
    """Return the fair claim statement and its parameters for 8 free slots.

    With 41 users waiting, the one-pair statement does not apply and
    ``claim_jobs`` runs this one, in a pipeline after the claim lock.
    """
    return runs._CLAIM_SQL, {"limit": 8, "owner": SUPERVISOR_ID, "lease": 30.0, "starting": 0,
                             "sources": list(sources(Status.RUNNING)), "channel": store.CHANGES_CHANNEL,
                             "notify": True}


QUERIES = (
    Query("claim (8 free slots)", "runs.claim_jobs",
          lambda connection: runs.claim_jobs(connection, SUPERVISOR_ID, 8, lease_seconds=30), sql=claim_statement),
    Query("list, all jobs, newest first", "store.list_jobs",
          lambda connection: store.list_jobs(connection, limit=50)),
    Query("list by status = failed", "store.list_jobs",
          lambda connection: store.list_jobs(connection, status="failed", limit=50)),
    Query("list by status = queued", "store.list_jobs",
          lambda connection: store.list_jobs(connection, status="queued", limit=50)),
    Query("list by analysis = spectral", "store.list_jobs",
          lambda connection: store.list_jobs(connection, analysis="spectral", limit=50)),
    Query("list by user = user-30", "store.list_jobs",
          lambda connection: store.list_jobs(connection, user="user-30", limit=50)),
    Query("list by user = user-30, page before id 500000", "store.list_jobs",
          lambda connection: store.list_jobs(connection, user="user-30", limit=50, before_id=500_000)),
    Query("list by analysis and status", "store.list_jobs",
          lambda connection: store.list_jobs(connection, analysis="spectral", status="failed", limit=50)),
    Query("expired-lease recovery", "sweeps.recover_expired_leases",
          sweeps.recover_expired_leases),
    Query("start-by expiry", "sweeps.expire_jobs", sweeps.expire_jobs, statement=0),
    Query("results expiry", "sweeps.expire_jobs", sweeps.expire_jobs, statement=1),
    Query("prune selection (older than 30 days, batch 1000)", "sweeps.prune_jobs",
          lambda connection: sweeps.prune_jobs(connection, older_than_seconds=30 * 86400, batch_size=1000)),
)


def capture_statements(engine: sa.Engine, call: Callable[[sa.Connection], Any]) -> list[tuple[str, dict]]:
    """Return the (SQL, parameters) pairs that ``call`` sends, without running any of them.

    Each statement is swapped for one that returns no rows, so the function
    takes its "nothing to do" path and sends all of its statements that run
    in that case. The transaction is rolled back.
    """
    captured: list[tuple[str, dict]] = []

    def swap(connection, cursor, statement, parameters, context, executemany):
        captured.append((statement, dict(parameters or {})))
        return EMPTY_QUERY, {}

    with engine.connect() as connection:
        sa.event.listen(connection, "before_cursor_execute", swap, retval=True)
        with connection.begin():
            call(connection)
            connection.rollback()
    return captured


def measured_sql(statement: str) -> str:
    """Return the row-selecting part of a statement that changes rows, or the statement itself."""
    writing = WRITING_CTE.search(statement)
    if writing and statement.lstrip().upper().startswith("WITH RECURSIVE"):
        # The claim: every CTE before the first one that writes, then a
        # SELECT of the ids it would claim, which the last of them contains
        # as one array.
        names = CTE_NAME.findall(statement[:writing.start()])
        return f"{statement[:writing.start()]} SELECT unnest(ids) AS id FROM {names[-1]}"
    match = LOCKING_SELECT.search(statement)
    if match:
        return match.group(1)
    stripped = statement.strip()
    if not stripped.upper().startswith("SELECT"):
        raise ValueError(f"no SELECT to measure in: {stripped[:200]}")
    return stripped


def dedent_sql(text: str) -> str:
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    indents = [len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()]
    cut = min(indents) if indents else 0
    return "\n".join([lines[0].strip(), *[line[cut:] for line in lines[1:]]])


def run_query(engine: sa.Engine, text: str, parameters: dict, runs_count: int) -> tuple[list[str], list[float], int]:
    """Return the EXPLAIN (ANALYZE, BUFFERS) lines, the wall-clock times in ms and the row count."""
    with engine.connect() as connection:
        # Warm-up, so every timed run finds the same pages in shared buffers.
        with connection.begin() as transaction:
            rows = len(connection.exec_driver_sql(text, parameters).all())
            transaction.rollback()
        timings = []
        for _ in range(runs_count):
            with connection.begin() as transaction:
                start = time.perf_counter()
                connection.exec_driver_sql(text, parameters).all()
                timings.append((time.perf_counter() - start) * 1000)
                transaction.rollback()
        with connection.begin() as transaction:
            plan = connection.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + text, parameters).scalars().all()
            transaction.rollback()
    return plan, timings, rows


# psycopg 3 prepares a statement on its 6th execution on one connection
# (prepare_threshold = 5), and PostgreSQL plans the first 5 executions of a
# prepared statement with custom plans before it may switch to a generic one.
# So calls 11 to 15 are the first that can get a generic plan. list_jobs'
# "CAST(:x AS text) IS NULL OR column = :x" filters use an index only in a
# custom plan.
REPEATED_CALLS = 15
REPEATED_QUERIES = (
    Query("list by user with no jobs", "store.list_jobs",
          lambda connection: store.list_jobs(connection, user="nobody", limit=50)),
    Query("list by status = failed", "store.list_jobs",
          lambda connection: store.list_jobs(connection, status="failed", limit=50)),
)


def repeated_timings(engine: sa.Engine, call: Callable[[sa.Connection], Any]) -> list[float]:
    """Return the wall-clock times in ms of REPEATED_CALLS calls on one connection."""
    timings = []
    with engine.connect() as connection:
        for _ in range(REPEATED_CALLS):
            start = time.perf_counter()
            call(connection)
            timings.append((time.perf_counter() - start) * 1000)
            connection.rollback()
    return timings


def generic_plan(engine: sa.Engine, text: str, parameters: dict) -> tuple[list[str], float]:
    """Return the EXPLAIN (ANALYZE, BUFFERS) lines and the time in ms of the statement's generic plan."""
    names: list[str] = []

    def placeholder(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    numbered = re.sub(r"%\((\w+)\)s", placeholder, text)
    arguments = sql.SQL(", ").join(sql.Literal(parameters[name]) for name in names)
    with engine.connect() as connection:
        cursor = connection.connection.driver_connection.cursor()
        cursor.execute("SET plan_cache_mode = force_generic_plan")
        cursor.execute(f"PREPARE measured AS {numbered}")
        execute = sql.SQL("EXECUTE measured ({})").format(arguments)
        start = time.perf_counter()
        cursor.execute(execute)
        cursor.fetchall()
        elapsed = (time.perf_counter() - start) * 1000
        cursor.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + execute)
        plan = [row[0] for row in cursor.fetchall()]
        cursor.execute("DEALLOCATE measured")
        cursor.execute("RESET plan_cache_mode")
        connection.rollback()
    return plan, elapsed


# Database setup ------------------------------------------------------------


def server_url(argument: str | None) -> str:
    raw = argument or os.environ.get("ANALYSIS_DATABASE_URL")
    if raw:
        return db.normalise_url(raw)
    return embedded.start(Path(tempfile.gettempdir()) / "analysis-jobs-bench", database="postgres")


def create_database(url: str) -> tuple[str, str]:
    name = f"analysis_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db.libpq_url(url), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, make_url(url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str, name: str) -> None:
    with psycopg.connect(db.libpq_url(url), autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def load(engine: sa.Engine, finished: int, queued: int) -> dict[str, float]:
    """Insert the jobs, then VACUUM (ANALYZE); return the seconds each step took."""
    seconds = {}
    start = time.perf_counter()
    with engine.begin() as connection:
        connection.execute(sa.text(LOAD_FINISHED), {"finished": finished - RESULTS_DUE})
        connection.execute(sa.text(LOAD_RESULTS_DUE), {"count": RESULTS_DUE})
        connection.execute(sa.text(LOAD_QUEUED), {"queued": queued})
        connection.execute(sa.text(LOAD_RUNNING), {"count": RUNNING, "owner_a": str(uuid.uuid4()),
                                                   "owner_b": str(uuid.uuid4())})
    seconds["insert"] = time.perf_counter() - start
    start = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("VACUUM (ANALYZE) jobs")
    seconds["vacuum_analyze"] = time.perf_counter() - start
    return seconds


# Report ----------------------------------------------------------------------


def machine_lines(engine: sa.Engine) -> list[str]:
    cpu = "unknown"
    memory = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with engine.connect() as connection:
        version = connection.exec_driver_sql("SHOW server_version").scalar_one()
        shared_buffers = connection.exec_driver_sql("SHOW shared_buffers").scalar_one()
        work_mem = connection.exec_driver_sql("SHOW work_mem").scalar_one()
    return [
        f"- CPU: {cpu}, {usable} usable cores",
        f"- Memory: {memory}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}, SQLAlchemy {sa.__version__}, psycopg {psycopg.__version__}",
        (f"- PostgreSQL {version} (shared_buffers {shared_buffers}, work_mem {work_mem}), "
         "client and server on the same machine"),
    ]


def table_lines(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        counts = connection.exec_driver_sql(
            "SELECT status, count(*) FROM jobs GROUP BY status ORDER BY count(*) DESC"
        ).all()
        sizes = connection.exec_driver_sql(
            "SELECT pg_size_pretty(pg_table_size('jobs')), pg_size_pretty(pg_indexes_size('jobs'))"
        ).one()
    lines = ["| status | rows |", "| --- | ---: |"]
    lines += [f"| {status} | {count:,} |" for status, count in counts]
    lines.append("")
    lines.append(f"Table size {sizes[0]}, all indexes {sizes[1]}.")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-url", help="Postgres server to create the scratch database on "
                                             "(default: ANALYSIS_DATABASE_URL, else the embedded server)")
    parser.add_argument("--finished", type=int, default=1_000_000, help="finished jobs to load")
    parser.add_argument("--queued", type=int, default=1_000, help="queued jobs to load")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per query; the median is reported")
    arguments = parser.parse_args()

    url = server_url(arguments.server_url)
    name, database_url = create_database(url)
    print(f"scratch database {name} on {db.redact(url)}", file=sys.stderr)
    # Without the service's 30 s statement_timeout, because the load took 10 s
    # on the 2-core machine of RESULTS-store.md and may take longer elsewhere.
    engine = sa.create_engine(database_url, connect_args={"application_name": "analysis-jobs-bench"})
    try:
        db.upgrade(database_url)
        load_seconds = load(engine, arguments.finished, arguments.queued)
        print(f"loaded in {load_seconds['insert']:.1f} s, vacuumed in {load_seconds['vacuum_analyze']:.1f} s",
              file=sys.stderr)

        out = ["## Machine", "", *machine_lines(engine), "", "## Data", "",
               (f"Loaded in {load_seconds['insert']:.1f} s; `VACUUM (ANALYZE) jobs` took "
                f"{load_seconds['vacuum_analyze']:.1f} s."), "", *table_lines(engine), "", "## Summary", "",
               "| query | function | rows | median ms | min ms | max ms |",
               "| --- | --- | ---: | ---: | ---: | ---: |"]
        details = ["## Plans", ""]
        for query in QUERIES:
            statement, parameters = query.captured(engine)
            text = measured_sql(statement)
            plan, timings, rows = run_query(engine, text, parameters, arguments.runs)
            print(f"{query.name}: median {statistics.median(timings):.2f} ms", file=sys.stderr)
            out.append(f"| {query.name} | `{query.function}` | {rows} | {statistics.median(timings):.2f} | "
                       f"{min(timings):.2f} | {max(timings):.2f} |")
            bound = {key: value for key, value in parameters.items() if f"%({key})s" in text}
            details += [f"### {query.name}", "", f"`{query.function}`, parameters `{bound}`", "",
                        "```sql", dedent_sql(text), "```", "", "```", *plan, "```", ""]

        out += ["", "## Repeated calls", "",
                (f"`store.list_jobs` called {REPEATED_CALLS} times on one connection, against the same "
                 "statement run once with `plan_cache_mode = force_generic_plan`."), "",
                "| query | calls 1-5 median ms | calls 11-15 median ms | forced generic plan ms |",
                "| --- | ---: | ---: | ---: |"]
        for query in REPEATED_QUERIES:
            timings = repeated_timings(engine, query.call)
            statement, parameters = query.captured(engine)
            plan, elapsed = generic_plan(engine, measured_sql(statement), parameters)
            out.append(f"| {query.name} | {statistics.median(timings[:5]):.2f} | "
                       f"{statistics.median(timings[10:]):.2f} | {elapsed:.2f} |")
            details += [f"### Forced generic plan: {query.name}", "", "```", *plan, "```", ""]
        print("\n".join(out + [""] + details))
    finally:
        engine.dispose()
        drop_database(url, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
