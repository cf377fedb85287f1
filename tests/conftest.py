"""Shared fixtures: one scratch database per test run, emptied before each test.

The server is the one ``ANALYSIS_DATABASE_URL`` names when it is set, and the
embedded Postgres otherwise (started in a temporary folder, so the user's own
data folder is never touched). Each run creates its own database with a
unique name and drops it at the end.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import make_url

from supervisor import config, db, embedded, logs

TABLES = ("job_results", "job_events", "jobs", "supervisors", "readings", "job_limits")

# The noop analysis's fault-injection parameters (shell commands, run logs,
# abrupt exits) are what these tests exercise; supervisors and workers they
# start inherit this.
os.environ.setdefault("ANALYSIS_ALLOW_FAULT_INJECTION", "1")


def _server_url() -> str:
    raw = os.environ.get("ANALYSIS_DATABASE_URL")
    if raw:
        return db.normalise_url(raw)
    # Per user, because the server's files belong to the user who started it.
    default = Path(tempfile.gettempdir()) / f"analysis-jobs-test-{os.getuid()}"
    data_dir = Path(os.environ.get("ANALYSIS_TEST_DATA_DIR") or default)
    return embedded.start(data_dir, database="postgres")


class ScratchDatabases:
    """Creates databases on the test server and drops them at the end of the run."""

    def __init__(self, server_url: str):
        self.server_url = server_url
        self.created: list[str] = []

    def create(self, prefix: str = "analysis_test") -> str:
        name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(db.libpq_url(self.server_url), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with psycopg.connect(db.libpq_url(self.server_url), autocommit=True) as connection:
            for name in self.created:
                connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def restore_root_logger():
    """The root logger; handlers that ``supervisor.logs.configure`` installs are removed afterwards.

    pytest's own capture handlers come and go with each test phase, so only
    other handlers present before the test are put back.
    """
    root = logging.getLogger()
    before = [handler for handler in root.handlers if not type(handler).__module__.startswith("_pytest")]
    level = root.level
    yield root
    for handler in list(root.handlers):
        if isinstance(handler.formatter, (logs.JsonFormatter, logs.TextFormatter)):
            root.removeHandler(handler)
    for handler in before:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def scratch_databases():
    databases = ScratchDatabases(_server_url())
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def database_url(scratch_databases) -> str:
    """URL of this run's database, migrated to head."""
    url = scratch_databases.create()
    db.upgrade(url)
    return url


@pytest.fixture(scope="session")
def settings(database_url, tmp_path_factory) -> config.Config:
    environ = {"ANALYSIS_DATABASE_URL": database_url,
               "ANALYSIS_DATA_DIR": str(tmp_path_factory.mktemp("data"))}
    return config.load(environ)


@pytest.fixture(scope="session")
def session_engine(database_url, settings):
    engine = db.create_engine(database_url, settings, pool_size=10, max_overflow=60)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(session_engine):
    """The run's database engine, with every table emptied first."""
    with session_engine.begin() as connection:
        connection.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    return session_engine


def pytest_report_header(config):
    try:
        url = _server_url()
        with psycopg.connect(db.libpq_url(url)) as connection:
            version = connection.execute("SHOW server_version").fetchone()[0]
        source = "ANALYSIS_DATABASE_URL" if os.environ.get("ANALYSIS_DATABASE_URL") else "embedded"
        return [f"postgres: {version} ({source}: {db.redact(url)})"]
    except Exception as error:  # the header must never stop the run
        return [f"postgres: unavailable ({error})"]
