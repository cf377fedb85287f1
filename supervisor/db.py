"""Database connections, the schema revision check and migrations.

Connection settings come from one URL. With none configured, an embedded
Postgres in the user's data folder serves instead (``supervisor.embedded``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import alembic.util
import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Engine, make_url

from supervisor import config as config_module
from supervisor import embedded
from supervisor.errors import ConfigError, DatabaseUnavailable, SchemaOutOfDate, ServiceError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def normalise_url(raw: str, source: str = "ANALYSIS_DATABASE_URL") -> str:
    """Return ``raw`` with the psycopg 3 driver named, or raise ``ConfigError`` naming ``source``."""
    try:
        url = make_url(raw)
    except sa.exc.ArgumentError:
        raise ConfigError(
            f"the database URL from {source} is not a valid URL; expected postgresql://user@host:5432/database"
        ) from None
    if url.get_backend_name() != "postgresql":
        raise ConfigError(
            f"database URL {redact(raw)!r} (from {source}) is not a Postgres URL; "
            "expected postgresql://user@host:5432/database"
        )
    if url.get_driver_name() not in ("psycopg", "psycopg2", ""):
        raise ConfigError(
            f"database URL {redact(raw)!r} (from {source}) names driver {url.get_driver_name()!r}; "
            "use postgresql://"
        )
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def redact(raw: str | URL) -> str:
    """Return the URL with its password hidden, for messages and logs."""
    try:
        return make_url(raw).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparsable URL>"


def resolve_url(settings: config_module.Config) -> str:
    """Return the configured database URL, starting the embedded server when none is set."""
    if settings.database_url:
        return normalise_url(settings.database_url, settings.sources["database_url"])
    if settings.database_url_from_file:
        return normalise_url(settings.database_url_from_file, f"database_url_file {settings.database_url_file}")
    return embedded.start(settings.effective_data_dir)


def create_engine(url: str, settings: config_module.Config | None = None, **engine_options) -> Engine:
    """Create an engine whose sessions carry the service's timeouts.

    ``statement_timeout`` bounds a stuck query, and
    ``idle_in_transaction_session_timeout`` makes the server release the row
    locks of a client that died mid-transaction. ``pool_pre_ping`` replaces
    connections broken by a server restart instead of failing the next query.
    JIT compilation is off: every query here touches a few rows, and the
    claim statement's estimated cost crosses ``jit_above_cost``, so JIT
    would spend tens of milliseconds compiling a query that runs in one.
    """
    engine_options.setdefault("pool_pre_ping", True)
    engine_options.setdefault("pool_size", 5)
    return sa.create_engine(url, connect_args=_connect_args(settings), **engine_options)


def _connect_args(settings: config_module.Config | None) -> dict[str, object]:
    settings = settings or config_module.load({})
    options = (
        f"-c statement_timeout={settings.statement_timeout_ms} "
        f"-c idle_in_transaction_session_timeout={settings.idle_in_transaction_timeout_ms} "
        "-c jit=off"
    )
    return {"options": options, "application_name": "analysis-jobs", "connect_timeout": 10}


def libpq_url(url: str | URL) -> str:
    """Return a SQLAlchemy URL as a libpq URL for psycopg and psql."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def connect_driver(url: str | URL, settings: config_module.Config | None = None) -> psycopg.Connection:
    """Open a psycopg connection in autocommit mode, outside the engine's pool, with its session settings."""
    return psycopg.connect(libpq_url(url), autocommit=True, **_connect_args(settings))


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic reads options through configparser, which treats % specially.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@functools.cache
def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("postgresql+psycopg://"))
    head = script.get_current_head()
    assert head is not None, "migrations/versions holds no revision"
    return head


def current_revision(engine: Engine) -> str | None:
    """Return the database's schema revision, or None for an empty database."""
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except sa.exc.OperationalError as error:
        raise DatabaseUnavailable(
            f"cannot connect to the database at {redact(engine.url)}: {error.orig}; "
            "check that the server is running and the database URL (`analysisctl config show`) is right"
        ) from error


def check_schema(engine: Engine) -> None:
    """Raise ``SchemaOutOfDate`` unless the database is at this version's head revision."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaOutOfDate(
            f"the database at {redact(engine.url)} has no job tables; run `analysisctl db upgrade` to create them"
        )
    script = ScriptDirectory.from_config(alembic_config("postgresql+psycopg://"))
    try:
        known = script.get_revision(current) is not None
    except alembic.util.CommandError:
        known = False
    if not known:
        raise SchemaOutOfDate(
            f"the database is at revision {current}, which this version does not know "
            "(a newer version migrated it); upgrade analysis-jobs"
        )
    raise SchemaOutOfDate(
        f"the database schema is at revision {current} but this version needs {head}; "
        "run `analysisctl db upgrade`"
    )


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``; re-running at head changes nothing."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def connect(settings: config_module.Config | None = None, *, check: bool = True, **engine_options) -> Engine:
    """Return an engine for the configured database, checked to be at head when ``check``."""
    settings = settings or config_module.load()
    engine = create_engine(resolve_url(settings), settings, **engine_options)
    if check:
        try:
            check_schema(engine)
        except ServiceError:
            engine.dispose()
            raise
    return engine
