"""Bulk-load sensor readings from a CSV file into a readings table.

The file has a header naming the columns ``sensor_id``, ``ts`` and
``value`` (in any order) and may be gzip-compressed. Every row is validated
before anything is written, and a file with any bad row loads nothing:

- ``sensor_id``: 1 to 256 characters, no NUL, no leading or trailing spaces;
- ``ts``: ISO-8601 with a time zone (``2022-09-01T00:00:00Z``, ``...+02:00``);
- ``value``: a finite decimal number (no NaN, no infinity, no empty value).

Two rows with the same sensor and the same instant are an error, even when
written in different time zones, because the table's key is (sensor_id, ts).
Rows whose (sensor_id, ts) already exists in the table are rejected too,
unless ``replace`` is set. With ``replace``, every existing reading of the
sensors in the file is deleted first, so the file becomes their complete
series. Readings of other sensors are kept.

The rows are sent with COPY into a temporary table and inserted from there,
all in one transaction, so conflicts can be reported by line number.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import gzip
import io
import math
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import Engine

COLUMNS = ("sensor_id", "ts", "value")
DEFAULT_TABLE = "readings"
MAX_SENSOR_ID_LENGTH = 256
# Problems listed in an error message; the rest are only counted.
MAX_PROBLEMS_SHOWN = 20
TABLE_NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
BUNDLED_READINGS = Path(__file__).resolve().parent / "data" / "vlinder_2022-09_slice.csv.gz"

_GZIP_MAGIC = b"\x1f\x8b"
# A decimal number as CSV exports write it; float() alone would also accept
# "nan", "inf", "1_000" and surrounding spaces.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class ReadingsError(ValueError):
    """The readings cannot be loaded, and nothing was written.

    ``problems`` lists up to ``MAX_PROBLEMS_SHOWN`` messages, each starting
    with its line number; ``problem_count`` counts them all.
    """

    def __init__(self, message: str, problems: list[str] | None = None, problem_count: int = 0):
        self.problems = problems or []
        self.problem_count = problem_count or len(self.problems)
        self.summary = message
        super().__init__(self._render())

    def _render(self) -> str:
        if not self.problems:
            return self.summary
        lines = [self.summary, *(f"  {problem}" for problem in self.problems)]
        hidden = self.problem_count - len(self.problems)
        if hidden > 0:
            lines.append(f"  ... and {hidden} more")
        return "\n".join(lines)


@dataclasses.dataclass
class Readings:
    """Validated rows of a readings file, in file order, with their line numbers."""

    path: Path
    lines: list[int]
    sensor_ids: list[str]
    timestamps: list[dt.datetime]
    values: list[float]

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def sensors(self) -> set[str]:
        return set(self.sensor_ids)


@dataclasses.dataclass(frozen=True)
class LoadSummary:
    table: str
    rows: int
    sensors: int
    first_ts: dt.datetime | None
    last_ts: dt.datetime | None
    # Existing readings deleted because ``replace`` was set.
    replaced_rows: int
    # Time spent in ``load_readings``, including validation when it read the file.
    seconds: float


def check_table_name(name: str) -> str:
    """Return ``name`` if it is a plain lower-case identifier, else raise ``ReadingsError``."""
    if not isinstance(name, str) or not TABLE_NAME_PATTERN.match(name):
        raise ReadingsError(
            f"invalid table name {name!r}: use 1 to 63 characters from a-z, 0-9 and _, "
            "not starting with a digit"
        )
    return name


# Reading and validation ---------------------------------------------------


@dataclasses.dataclass
class _Columns:
    sensor_id: int
    ts: int
    value: int


def _open_text(path: Path) -> io.TextIOBase:
    try:
        with open(path, "rb") as probe:
            compressed = probe.read(2) == _GZIP_MAGIC
    except FileNotFoundError:
        raise ReadingsError(f"readings file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise ReadingsError(f"{str(path)!r} is a directory; pass a CSV file") from None
    except OSError as error:
        raise ReadingsError(f"cannot read readings file {str(path)!r}: {error.strerror or error}") from None
    # utf-8-sig drops the byte order mark that spreadsheet exports add.
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _header(reader, path: Path) -> _Columns:
    try:
        header = next(reader)
    except StopIteration:
        raise ReadingsError(f"{path} is empty; expected a header line: sensor_id,ts,value") from None
    names = [name.strip() for name in header]
    missing = [column for column in COLUMNS if column not in names]
    unknown = [name for name in names if name not in COLUMNS]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if missing or unknown or duplicated:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing)}")
        if unknown:
            details.append(f"unknown {', '.join(repr(name) for name in unknown)}")
        if duplicated:
            details.append(f"repeated {', '.join(duplicated)}")
        raise ReadingsError(
            f"{path} line 1: the header must name the columns sensor_id, ts and value "
            f"({'; '.join(details)}); found {','.join(header)!r}"
        )
    return _Columns(names.index("sensor_id"), names.index("ts"), names.index("value"))


def _check_sensor_id(text: str) -> str | None:
    if not text.strip():
        return "empty sensor_id"
    if len(text) > MAX_SENSOR_ID_LENGTH:
        return f"sensor_id is {len(text)} characters long, over the limit of {MAX_SENSOR_ID_LENGTH}"
    if "\x00" in text:
        return f"sensor_id {text!r} contains a NUL character"
    if text != text.strip():
        return f"sensor_id {text!r} has leading or trailing spaces"
    return None


def _parse_ts(text: str) -> tuple[dt.datetime | None, str | None]:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None, f"invalid ts {text!r}: expected ISO-8601 such as 2022-09-01T00:00:00Z"
    if moment.tzinfo is None:
        return None, f"ts {text!r} has no time zone; add Z or an offset such as +02:00"
    return moment, None


def _parse_value(text: str) -> tuple[float | None, str | None]:
    if not text:
        return None, "empty value; leave out rows without a reading"
    if not _NUMBER.fullmatch(text):
        return None, f"invalid value {text!r}: expected a finite decimal number such as 17.9 or -1.5e3"
    number = float(text)
    if not math.isfinite(number):
        return None, f"value {text!r} is out of range for a double-precision number"
    return number, None


def _rows(reader, path: Path) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """Yield (line number, fields, read error) per record; line numbers count physical lines."""
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield reader.line_num, None, f"malformed CSV: {error}"
            continue
        except UnicodeDecodeError:
            raise ReadingsError(
                f"{path} is not valid UTF-8 (after line {reader.line_num}); save it as UTF-8"
            ) from None
        except (EOFError, gzip.BadGzipFile, OSError) as error:
            raise ReadingsError(
                f"{path} is not a complete gzip file (after line {reader.line_num}): {error}"
            ) from None
        yield reader.line_num, fields, None


def read_readings(path: Path | str) -> Readings:
    """Read and validate a readings CSV; raise ``ReadingsError`` listing bad rows by line.

    NOTE: the rows and a set of their keys are held in memory: a peak of
    about 300 bytes per row (tracemalloc, bundled file), so a file of 10
    million rows needs about 3 GB.
    """
    path = Path(path)
    readings = Readings(path, [], [], [], [])
    problems: list[str] = []
    problem_count = 0
    first_line_of: dict[tuple[str, dt.datetime], int] = {}

    def problem(line: int, message: str) -> None:
        nonlocal problem_count
        problem_count += 1
        if len(problems) < MAX_PROBLEMS_SHOWN:
            problems.append(f"line {line}: {message}")

    with _open_text(path) as text:
        reader = csv.reader(text, strict=True)
        try:
            columns = _header(reader, path)
        except UnicodeDecodeError:
            # The reader decodes ahead in blocks, so a bad byte in the first
            # few kilobytes surfaces here.
            raise ReadingsError(f"{path} is not valid UTF-8 (near the start); save it as UTF-8") from None
        except (EOFError, gzip.BadGzipFile, csv.Error) as error:
            raise ReadingsError(f"{path} line 1: cannot read the header: {error}") from None
        for line, fields, read_error in _rows(reader, path):
            if read_error is not None:
                problem(line, read_error)
                continue
            if not fields:
                continue  # a blank line
            if len(fields) != len(COLUMNS):
                problem(line, f"expected 3 fields (sensor_id, ts, value), found {len(fields)}")
                continue
            sensor_id = fields[columns.sensor_id]
            message = _check_sensor_id(sensor_id)
            moment, ts_message = _parse_ts(fields[columns.ts].strip())
            value, value_message = _parse_value(fields[columns.value].strip())
            errors = [text for text in (message, ts_message, value_message) if text]
            if errors:
                problem(line, "; ".join(errors))
                continue
            key = (sensor_id, moment)
            first = first_line_of.setdefault(key, line)
            if first != line:
                problem(line, f"duplicate reading of {sensor_id!r} at {moment.isoformat()} (first on line {first})")
                continue
            readings.lines.append(line)
            readings.sensor_ids.append(sys.intern(sensor_id))
            readings.timestamps.append(moment)
            readings.values.append(value)

    if problem_count:
        raise ReadingsError(
            f"{path}: {problem_count} invalid row(s); nothing was loaded. Fix these lines and load the file again:",
            problems, problem_count,
        )
    return readings


# Loading -------------------------------------------------------------------


def _check_table(cursor: psycopg.Cursor, table: str) -> None:
    exists = cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]
    if not exists:
        raise ReadingsError(
            f"table {table!r} does not exist; create it with columns sensor_id text, ts timestamptz and "
            f"value double precision, or load into the default table {DEFAULT_TABLE!r} "
            "(created by `analysisctl db upgrade`)"
        )
    columns = {
        row[0]
        for row in cursor.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            (table,),
        )
    }
    missing = [column for column in COLUMNS if column not in columns]
    if missing:
        raise ReadingsError(f"table {table!r} has no column {', '.join(missing)}; "
                            "a readings table needs sensor_id, ts and value")


def _conflicts(cursor: psycopg.Cursor, table: str) -> None:
    rows = cursor.execute(
        sql.SQL(
            "SELECT l.line, l.sensor_id, l.ts, count(*) OVER () FROM pg_temp.readings_load l "
            "JOIN {} t ON t.sensor_id = l.sensor_id AND t.ts = l.ts ORDER BY l.line LIMIT %s"
        ).format(sql.Identifier(table)),
        (MAX_PROBLEMS_SHOWN,),
    ).fetchall()
    if rows:
        total = rows[0][3]
        problems = [f"line {line}: {sensor_id!r} at {ts.isoformat()} is already in the table"
                    for line, sensor_id, ts, _ in rows]
        raise ReadingsError(
            f"{total} reading(s) already exist in table {table!r}; nothing was loaded. "
            "Pass --replace to replace the readings of the sensors in the file:",
            problems, total,
        )


def load_readings(engine: Engine, source: Path | str | Readings, *, table: str = DEFAULT_TABLE,
                  replace: bool = False) -> LoadSummary:
    """Validate ``source`` and insert its rows into ``table`` in one transaction.

    Raises ``ReadingsError`` (and writes nothing) when a row is invalid, the
    table is missing, or, without ``replace``, a reading already exists.
    """
    started = time.perf_counter()
    check_table_name(table)
    readings = source if isinstance(source, Readings) else read_readings(source)
    target = sql.Identifier(table)

    with engine.begin() as connection:
        driver: psycopg.Connection = connection.connection.driver_connection
        with driver.cursor() as cursor:
            # A large file can take longer than the session's statement
            # timeout, which guards the service's short queries.
            cursor.execute("SET LOCAL statement_timeout = 0")
            _check_table(cursor, table)
            cursor.execute(
                "CREATE TEMPORARY TABLE readings_load (line integer, sensor_id text, ts timestamptz, "
                "value double precision) ON COMMIT DROP"
            )
            with cursor.copy("COPY pg_temp.readings_load (line, sensor_id, ts, value) FROM STDIN "
                             "(FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text", "timestamptz", "float8"])
                for row in zip(readings.lines, readings.sensor_ids, readings.timestamps, readings.values,
                               strict=True):
                    copy.write_row(row)

            replaced = 0
            if replace:
                cursor.execute(
                    sql.SQL("DELETE FROM {} WHERE sensor_id IN (SELECT DISTINCT sensor_id FROM pg_temp.readings_load)")
                    .format(target)
                )
                replaced = cursor.rowcount
            else:
                _conflicts(cursor, table)
            try:
                cursor.execute(
                    sql.SQL("INSERT INTO {} (sensor_id, ts, value) SELECT sensor_id, ts, value "
                            "FROM pg_temp.readings_load").format(target)
                )
            except psycopg.errors.UniqueViolation as error:
                raise ReadingsError(
                    f"another load inserted some of these readings into {table!r} at the same time "
                    f"({error.diag.message_detail}); nothing was loaded, run the load again"
                ) from None

    return LoadSummary(
        table=table,
        rows=len(readings),
        sensors=len(readings.sensors),
        first_ts=min(readings.timestamps) if readings.timestamps else None,
        last_ts=max(readings.timestamps) if readings.timestamps else None,
        replaced_rows=replaced,
        seconds=time.perf_counter() - started,
    )
