"""Alembic environment: runs migrations online against the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from supervisor.schema import metadata

config = context.config


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        context.configure(connection=connectable, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
        return

    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as connection:
        # A session-level lock serialises concurrent `db upgrade` runs, such as
        # two supervisors starting at once against a fresh database.
        connection.exec_driver_sql("SELECT pg_advisory_lock(727274)")
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=True)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.exec_driver_sql("SELECT pg_advisory_unlock(727274)")
            connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `analysisctl db upgrade`")
run_migrations_online()
