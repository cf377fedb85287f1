"""Fixtures for integration tests: real supervisor processes and login roles of each access role."""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from cli.main import app
from supervisor import access, config, db
from supervisor.loop import Supervisor
from tests.integration.supervisor_harness import FAST_SETTINGS, SupervisorProcess, pid_exists, wait_for


def resume(pid: int) -> None:
    """Send SIGCONT, so a process a test stopped can handle the SIGTERM that ends it."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


@pytest.fixture
def cli(engine, database_url, tmp_path):
    """Invoke analysisctl in this process against the emptied test database; returns the typer Result."""
    runner = CliRunner(env={
        "ANALYSIS_DATABASE_URL": database_url,
        "ANALYSIS_DATA_DIR": str(tmp_path / "data"),
        "ANALYSIS_CONFIG": None,
        "ANALYSIS_POLL_SECONDS": "0.2",
        "ANALYSIS_WORKERS": None,
        "ANALYSIS_RESULTS_DIR": None,
        # Wide enough that rich does not wrap usage errors inside a fragment.
        "COLUMNS": "400",
    })

    def invoke(*args: str, env: dict | None = None):
        return runner.invoke(app, list(args), env=env)

    return invoke


@pytest.fixture
def local_supervisor(engine, database_url, tmp_path):
    """A supervisor with one worker in this process, so a test can drive its loop and read its state."""
    environ = {**FAST_SETTINGS, "ANALYSIS_DATABASE_URL": database_url, "ANALYSIS_DATA_DIR": str(tmp_path),
               "ANALYSIS_WORKERS": "1", "ANALYSIS_CONFIG": ""}
    supervisor = Supervisor(config.load(environ), engine)
    supervisor.start()
    yield supervisor
    supervisor.shutdown()


@pytest.fixture
def start_supervisor(engine, database_url, tmp_path):
    """Start supervisors on this test's data folder, and resume and stop them at the end."""
    started: list[SupervisorProcess] = []

    def start(workers: int = 2, **settings) -> SupervisorProcess:
        log_path = tmp_path / f"supervisor-{len(started)}.log"
        process = SupervisorProcess(database_url, tmp_path / "data", workers, log_path, **settings)
        started.append(process)
        process.wait_ready(engine)
        return process

    yield start
    for process in started:
        workers = process.worker_pids()
        for pid in [process.pid, *workers]:
            resume(pid)
        process.stop()
        for pid in workers:
            wait_for(lambda pid=pid: not pid_exists(pid), 10, f"worker {pid} to exit")


@dataclasses.dataclass(frozen=True)
class Login:
    """A login role made for this test run, with an engine and a URL that connect as it."""

    name: str
    url: str
    engine: sa.Engine


@pytest.fixture(scope="session")
def logins(database_url, settings):
    """Login roles of this test run, by part: two analysts, an operator, a supervisor and one without a role.

    Roles belong to the whole cluster, so each name carries the run's pid and
    a random suffix, and every role is dropped at the end. Each role gets a
    random password, so the tests also work on a server that requires one.
    """
    prefix = f"aj_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    groups = {"alice": access.ANALYST_ROLE, "bob": access.ANALYST_ROLE, "operator": access.OPERATOR_ROLE,
              "supervisor": access.SUPERVISOR_ROLE, "nobody": None}
    password = uuid.uuid4().hex
    created: dict[str, Login] = {}
    admin = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(admin, autocommit=True) as connection:
            for part, group in groups.items():
                name = f"{prefix}_{part}"
                statement = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name),
                                                                               sql.Literal(password))
                if group is not None:
                    statement += sql.SQL(" IN ROLE {}").format(sql.Identifier(group))
                connection.execute(statement)
                url = make_url(database_url).set(username=name, password=password).render_as_string(
                    hide_password=False)
                created[part] = Login(name, url, db.create_engine(url, settings, pool_size=2))
        yield created
    finally:
        for login in created.values():
            login.engine.dispose()
        with psycopg.connect(admin, autocommit=True) as connection:
            for login in created.values():
                connection.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(login.name)))
