"""A fingerprint of every job-store table, to check that a rejected request changed nothing."""

from __future__ import annotations

import sqlalchemy as sa

# Each table's rows as text in a fixed order, hashed: any change to any column
# of any row changes the digest, and the count shows inserts and deletes.
_TABLES = {
    "jobs": "id",
    "job_events": "job_id, seq",
    "job_results": "id",
    "supervisors": "id",
    "job_limits": "scope, name",
    "readings": "sensor_id, ts",
}


def snapshot(engine: sa.Engine) -> dict[str, tuple[int, str]]:
    """Return (row count, md5 of all rows) per table, read by ``engine``, which must see every row."""
    fingerprint = {}
    with engine.connect() as connection:
        for table, order in _TABLES.items():
            fingerprint[table] = tuple(connection.execute(sa.text(
                f"SELECT count(*), md5(COALESCE(string_agg(t::text, E'\\n' ORDER BY {order}), '')) FROM {table} t"
            )).one())
    return fingerprint
