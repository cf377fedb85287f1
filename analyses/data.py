"""Sensor readings: reading them from CSV files or Postgres, and resampling them onto a common grid.

Readings are long rows ``sensor_id, ts, value``. A missing reading has no row,
and nothing here fills one in except the bounded interpolation that
``resample`` documents.

Every analysis over readings takes the same data parameters (``DATA_PARAMS``
and ``SENSORS``), checks them with ``check_data_params`` at submit time and
loads its grid with ``load_grid`` when the body runs.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import gzip
import importlib.resources
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np

from analyses import registry
from analyses.errors import AnalysisError, InvalidParams, RetryableError

BUNDLED_READINGS = "vlinder_2022-09_slice.csv.gz"
BUNDLED_SENSORS = "vlinder_2022-09_slice_sensors.csv"

# The database URL never comes from job parameters, because parameters are
# stored with the job and a URL can carry a password. The worker's context
# provides the service's own database, where the readings table lives by
# default; this environment variable of the worker overrides it.
DATABASE_URL_ENV = "ANALYSIS_READINGS_DATABASE_URL"
DEFAULT_TABLE = "readings"
TABLE_NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Bounds the grid at 160 MB of float64 so that a one-second grid over a long
# window fails at once with a clear message instead of exhausting memory.
MAX_GRID_CELLS = 20_000_000

# Rows read between two cancel checks; about 20 ms of CSV parsing.
_ROWS_PER_CHECK = 20_000

SOURCES = ("bundled", "csv", "table")

SOURCE = registry.Param(
    "source", "string",
    "where the readings come from: 'bundled' (the VLINDER slice shipped in analyses/data), "
    "'csv' (the file csv_path) or 'table' (the Postgres table named by table)",
    default="bundled", choices=SOURCES,
)
CSV_PATH = registry.Param(
    "csv_path", "string",
    "absolute path on the worker host of a CSV file, plain or gzip-compressed (.gz), with the header "
    "sensor_id,ts,value; required with source 'csv'",
    max_length=4096,
)
TABLE = registry.Param(
    "table", "string",
    f"Postgres table (name or schema.name) with columns sensor_id text, ts timestamptz, value double "
    f"precision, used with source 'table' (default '{DEFAULT_TABLE}'); it is read from the service's "
    f"database, or from the URL in the worker's environment variable {DATABASE_URL_ENV} when that is set",
    max_length=127,
)
SENSORS = registry.Param(
    "sensors", "string_list",
    "sensor ids to include (default: every sensor with readings in the time window)",
    max_length=1000,
)
START = registry.Param(
    "start", "string",
    "start of the time window (inclusive), ISO-8601 with a UTC offset, e.g. 2022-09-01T00:00:00Z "
    "(default: the first reading)",
    max_length=64,
)
END = registry.Param(
    "end", "string",
    "end of the time window (exclusive), ISO-8601 with a UTC offset (default: just after the last reading)",
    max_length=64,
)
RESAMPLE_SECONDS = registry.Param(
    "resample_seconds", "integer",
    "spacing of the common time grid, in seconds; grid times are multiples of it counted from "
    "1970-01-01T00:00:00Z",
    default=300, minimum=1, maximum=86_400,
)
MAX_GAP_SECONDS = registry.Param(
    "max_gap_seconds", "integer",
    "longest time between two readings, in seconds, that resampling bridges by linear interpolation; "
    "grid times inside a longer gap stay missing",
    default=900, minimum=0, maximum=7 * 86_400,
)

# The data parameters every analysis takes. SENSORS is separate because an
# analysis of one target sensor has no sensor list.
DATA_PARAMS = (SOURCE, CSV_PATH, TABLE, START, END, RESAMPLE_SECONDS, MAX_GAP_SECONDS)


class ReadingsError(ValueError):
    """The readings source contains something that cannot be read as readings."""


@dataclasses.dataclass
class Readings:
    """Readings per sensor, as read from a source.

    ``series`` maps a sensor id to ``(times, values)``: epoch seconds sorted
    ascending and the matching values, both float64, with no NaN. ``known``
    contains every sensor id the source has, also those without readings in
    the requested window, so that a caller can tell an unknown id from an idle
    sensor.
    """

    series: dict[str, tuple[np.ndarray, np.ndarray]]
    known: set[str]
    description: str


@dataclasses.dataclass
class Grid:
    """Readings of several sensors resampled onto one regular time grid.

    ``values[i, k]`` is sensor ``sensors[i]`` at epoch second ``times[k]``, or
    NaN where resampling found no reading (see ``resample``).
    ``readings_in_window[i]`` counts the raw readings behind row ``i``.
    """

    sensors: list[str]
    times: np.ndarray
    values: np.ndarray
    step_seconds: int
    readings_in_window: list[int]

    def row(self, sensor: str) -> np.ndarray:
        return self.values[self.sensors.index(sensor)]

    def time_iso(self, index: int) -> str:
        return format_timestamp(float(self.times[index]))

    def describe(self) -> dict[str, Any]:
        """Return the JSON description of the grid that every analysis summary includes."""
        return {
            "start": self.time_iso(0),
            "end": format_timestamp(float(self.times[-1] + self.step_seconds)),
            "resample_seconds": self.step_seconds,
            "n_times": int(self.times.size),
            "sensors": [
                {
                    "sensor": sensor,
                    "n_readings": self.readings_in_window[index],
                    "n_valid": int(np.count_nonzero(np.isfinite(self.values[index]))),
                }
                for index, sensor in enumerate(self.sensors)
            ],
        }


# ---------------------------------------------------------------------------
# Timestamps


def parse_timestamp(text: str, *, assume_utc: bool = False) -> float:
    """Return epoch seconds for an ISO-8601 timestamp, or raise ``ValueError``.

    Without ``assume_utc`` a timestamp must carry ``Z`` or an offset, because a
    local time is ambiguous on a service whose workers may run in another zone.
    """
    text = text.strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 timestamp such as 2022-09-01T00:00:00Z") from None
    if moment.tzinfo is None:
        if not assume_utc:
            raise ValueError(
                f"{text!r} has no UTC offset; append 'Z' for UTC or an offset such as +02:00"
            )
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_timestamp(seconds: float) -> str:
    """Return ``seconds`` since the epoch as ISO-8601 UTC with a ``Z`` suffix."""
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    # isoformat pads the year to four digits; strftime("%Y") does not on glibc.
    text = moment.replace(tzinfo=None).isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text + "Z"


# ---------------------------------------------------------------------------
# Parameter checks


def check_data_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check the data parameters against each other and return them normalised.

    ``start`` and ``end`` come back as UTC strings with a ``Z`` suffix, so two
    spellings of one instant give one deduplication key. Raises
    ``InvalidParams`` naming the field, the value and the fix.
    """
    checked = dict(params)
    source = checked.get("source", "bundled")

    csv_path = checked.get("csv_path")
    if source == "csv":
        if not csv_path:
            raise InvalidParams("csv_path", csv_path, "is required with source 'csv'")
        if not os.path.isabs(csv_path):
            raise InvalidParams(
                "csv_path", csv_path,
                "must be an absolute path, because the worker's working directory is not the submitter's",
            )
    elif csv_path is not None:
        raise InvalidParams("csv_path", csv_path, f"is used only with source 'csv' (source is {source!r})")

    table = checked.get("table")
    if source == "table":
        checked["table"] = check_table_name(table if table is not None else DEFAULT_TABLE)
    elif table is not None:
        raise InvalidParams("table", table, f"is used only with source 'table' (source is {source!r})")

    bounds = {}
    for field in ("start", "end"):
        if checked.get(field) is not None:
            try:
                bounds[field] = parse_timestamp(checked[field])
            except ValueError as error:
                raise InvalidParams(field, checked[field], str(error)) from None
            try:
                checked[field] = format_timestamp(bounds[field])
            except (ValueError, OverflowError, OSError):
                raise InvalidParams(field, checked[field], "is outside the supported years 1 to 9999 UTC") from None
    if "start" in bounds and "end" in bounds and bounds["start"] >= bounds["end"]:
        raise InvalidParams(
            "end", checked["end"], f"must be later than start ({checked['start']}); swap them or widen the window"
        )

    sensors = checked.get("sensors")
    if sensors is not None:
        _check_sensor_list("sensors", sensors)
    if "start" in bounds and "end" in bounds:
        _check_grid_size(bounds["start"], bounds["end"], checked.get("resample_seconds", 300), sensors)
    return checked


def _check_grid_size(start: float, end: float, step: int, sensors: list[str] | None) -> None:
    """Reject a window whose grid exceeds ``MAX_GRID_CELLS`` at submit, as ``resample`` would at run time.

    Without a sensor list the number of sensors is known only when the body
    reads the source, so only the length of one sensor's series is checked.
    """
    n_times = math.floor(end / step) - math.ceil(start / step) + 1
    if n_times > MAX_GRID_CELLS:
        raise InvalidParams(
            "resample_seconds", step,
            f"the window gives {n_times} grid times per sensor, over the limit of {MAX_GRID_CELLS}; "
            f"raise resample_seconds to at least {math.ceil((end - start) / MAX_GRID_CELLS)} or shorten the window",
        )
    if sensors is not None and n_times * len(sensors) > MAX_GRID_CELLS:
        raise InvalidParams(
            "sensors", f"<{len(sensors)} sensors>",
            f"{len(sensors)} sensors x {n_times} grid times is over the limit of {MAX_GRID_CELLS} grid cells; "
            "name fewer sensors, raise resample_seconds or shorten the window",
        )


def _check_sensor_list(field: str, sensors: list[str]) -> None:
    if not sensors:
        raise InvalidParams(field, sensors, "must name at least one sensor, or be left out to use every sensor")
    seen = set()
    for sensor in sensors:
        if not sensor.strip():
            raise InvalidParams(field, sensors, "must not contain empty sensor ids")
        if sensor in seen:
            raise InvalidParams(field, sensors, f"names sensor {sensor!r} twice")
        seen.add(sensor)


def check_table_name(table: str) -> str:
    """Return ``table`` if it is ``name`` or ``schema.name`` in lower-case SQL identifiers, else raise."""
    parts = table.split(".")
    if len(parts) > 2 or not all(TABLE_NAME_PATTERN.match(part) for part in parts):
        raise InvalidParams(
            "table", table,
            f"must be a table name or schema.name, each part matching {TABLE_NAME_PATTERN.pattern}",
        )
    return table


@dataclasses.dataclass(frozen=True)
class DataAnalysis(registry.Analysis):
    """An analysis over sensor readings.

    Its ``validate_params`` also checks the data parameters against each other
    and then runs ``check``, the analysis's own cross-field check, so that
    these mistakes fail at submit time like any other invalid parameter.
    """

    check: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # Same parameters, same result: a second submit returns the first job.
    deduplicate: bool = True
    # A rerun of a deterministic computation that hit its timeout would time
    # out again, so only lost workers and leases are retried.
    retry_codes: frozenset[str] = frozenset({"worker_died", "lease_expired"})
    timeout_seconds: float | None = 2 * 3600

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        validated = check_data_params(super().validate_params(params))
        if self.check is not None:
            validated = self.check(validated)
        return validated


# ---------------------------------------------------------------------------
# Reading


def bundled_readings_path() -> pathlib.Path:
    """Return the path of the bundled readings file (VLINDER, 1-15 September 2022)."""
    return pathlib.Path(str(importlib.resources.files("analyses") / "data" / BUNDLED_READINGS))


def bundled_sensors_path() -> pathlib.Path:
    """Return the path of the bundled sensors metadata file (station, quantity, unit, place)."""
    return pathlib.Path(str(importlib.resources.files("analyses") / "data" / BUNDLED_SENSORS))


def read_csv(
    path: str | os.PathLike,
    sensors: Iterable[str] | None = None,
    start: float | None = None,
    end: float | None = None,
    check_cancelled: Callable[[], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Readings:
    """Read readings from a CSV file with the header ``sensor_id,ts,value``.

    A name ending in ``.gz`` is read as gzip. Only rows of ``sensors`` (all
    when None) with ``start <= ts < end`` (epoch seconds) are kept. A
    timestamp without a UTC offset is read as UTC. An empty value or ``NaN``
    is a missing reading and is skipped. Raises ``OSError`` when the file
    cannot be opened and ``ReadingsError`` naming the line for content that is
    not readings: a bad header, timestamp or number, an infinite value or a
    second reading of a sensor at one time.
    """
    path = pathlib.Path(path)
    selected = set(sensors) if sensors is not None else None
    opener = gzip.open if path.name.endswith(".gz") else open
    timestamps: dict[str, float] = {}
    columns: dict[str, tuple[list[float], list[float]]] = {}
    known: set[str] = set()

    with opener(path, "rt", newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise ReadingsError(f"{path} is empty; expected the header sensor_id,ts,value") from None
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
            raise ReadingsError(f"{path} is not a UTF-8 CSV file: {error}") from None
        header = [name.strip().lstrip("\ufeff") for name in header]
        try:
            sensor_column, ts_column, value_column = (header.index(name) for name in ("sensor_id", "ts", "value"))
        except ValueError:
            # The header is not quoted: job errors are readable by every user,
            # and csv_path may name any file the worker can read.
            raise ReadingsError(
                f"{path}: the first line is not a header with the columns sensor_id, ts, value "
                f"({len(header)} columns found)"
            ) from None
        width = len(header)

        line = 1
        try:
            for row in reader:
                line += 1
                if line % _ROWS_PER_CHECK == 0:
                    if check_cancelled is not None:
                        check_cancelled()
                    if on_rows is not None:
                        on_rows(line)
                if not row:
                    continue
                if len(row) != width:
                    raise ReadingsError(f"{path} line {line}: expected {width} fields, found {len(row)}")
                sensor = row[sensor_column]
                known.add(sensor)
                if selected is not None and sensor not in selected:
                    continue

                text = row[ts_column]
                seconds = timestamps.get(text)
                if seconds is None:
                    try:
                        seconds = parse_timestamp(text, assume_utc=True)
                    except ValueError:
                        raise ReadingsError(
                            f"{path} line {line}: invalid timestamp in column ts; expected ISO-8601 such as "
                            "2022-09-01T00:05:00Z"
                        ) from None
                    timestamps[text] = seconds
                if (start is not None and seconds < start) or (end is not None and seconds >= end):
                    continue

                text = row[value_column].strip()
                if not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    raise ReadingsError(f"{path} line {line}: the value is not a number") from None
                if math.isnan(value):
                    continue
                if math.isinf(value):
                    raise ReadingsError(
                        f"{path} line {line}: the value is infinite; use an empty value for a missing reading"
                    )
                times, values = columns.setdefault(sensor, ([], []))
                times.append(seconds)
                values.append(value)
        except UnicodeDecodeError as error:
            raise ReadingsError(f"{path} line {line}: not UTF-8 text ({error})") from None
        except (gzip.BadGzipFile, EOFError, csv.Error) as error:
            raise ReadingsError(f"{path} line {line}: {error}") from None

    series = {sensor: _sorted_series(sensor, times, values, path) for sensor, (times, values) in columns.items()}
    return Readings(series=series, known=known, description=f"CSV file {path}")


def _sorted_series(sensor: str, times: list[float], values: list[float], origin: Any) -> tuple[np.ndarray, np.ndarray]:
    time_array = np.asarray(times, dtype=np.float64)
    value_array = np.asarray(values, dtype=np.float64)
    order = np.argsort(time_array, kind="stable")
    time_array = time_array[order]
    value_array = value_array[order]
    duplicates = np.flatnonzero(np.diff(time_array) == 0)
    if duplicates.size:
        when = format_timestamp(float(time_array[duplicates[0]]))
        raise ReadingsError(
            f"{origin}: sensor {sensor!r} has {duplicates.size} repeated timestamp(s), first at {when}; "
            "keep one reading per sensor and time"
        )
    return time_array, value_array


def _psycopg_conninfo(url: str) -> str:
    """Return ``url`` in the form psycopg accepts, or raise ``ValueError``.

    SQLAlchemy spells psycopg 3 URLs ``postgresql+psycopg://``, but libpq
    accepts only ``postgresql://`` and ``postgres://``.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ValueError("the readings database URL must start with postgresql:// or postgresql+psycopg://")
    return "postgresql://" + rest


def _describe_database(conninfo: str) -> str:
    """Return host, port and database of ``conninfo`` without user or password, for messages."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:  # A malformed URL is not echoed, because it may contain a password.
        return "the readings database (unparsable URL)"
    return f"database {parts.get('dbname', '?')} on {parts.get('host', 'localhost')}:{parts.get('port', 5432)}"


def read_table(
    url: str,
    table: str = DEFAULT_TABLE,
    sensors: Iterable[str] | None = None,
    start: float | None = None,
    end: float | None = None,
    check_cancelled: Callable[[], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
    batch_rows: int = 50_000,
    confirm: Iterable[str] = (),
) -> Readings:
    """Read readings from a Postgres table ``(sensor_id text, ts timestamptz, value double precision)``.

    ``url`` is a ``postgresql://`` or ``postgresql+psycopg://`` URL. ``table``
    is ``name`` or ``schema.name`` and must match ``TABLE_NAME_PATTERN`` per
    part. Sensors and the window ``start <= ts < end`` (epoch seconds) are
    bound parameters. A NULL or NaN value is a missing reading. Rows arrive in
    batches through a server-side cursor so that cancel checks run between
    batches. ``known`` of the result contains the sensors with readings, and
    those of ``sensors`` and ``confirm`` that have rows outside the window.

    Raises ``RetryableError`` when the database cannot be reached,
    ``InvalidParams`` on ``table`` when the table does not exist, and
    ``ReadingsError`` when its columns or values are not readings.
    """
    import psycopg
    from psycopg import sql

    check_table_name(table)
    try:
        conninfo = _psycopg_conninfo(url)
    except ValueError as error:
        raise AnalysisError(f"{DATABASE_URL_ENV}: {error}") from None
    where_database = _describe_database(conninfo)
    identifier = sql.Identifier(*table.split("."))

    conditions = [sql.SQL("TRUE")]
    arguments: dict[str, Any] = {}
    requested = list(dict.fromkeys(sensors)) if sensors is not None else None
    if requested is not None:
        conditions.append(sql.SQL("sensor_id = ANY(%(sensors)s)"))
        arguments["sensors"] = requested
    if start is not None:
        conditions.append(sql.SQL("ts >= %(start)s"))
        arguments["start"] = datetime.fromtimestamp(start, tz=UTC)
    if end is not None:
        conditions.append(sql.SQL("ts < %(end)s"))
        arguments["end"] = datetime.fromtimestamp(end, tz=UTC)
    query = sql.SQL(
        "SELECT sensor_id, EXTRACT(EPOCH FROM ts)::float8, value::float8 FROM {table} WHERE {conditions} "
        "ORDER BY sensor_id, ts"
    ).format(table=identifier, conditions=sql.SQL(" AND ").join(conditions))

    columns: dict[str, tuple[list[float], list[float]]] = {}
    try:
        connection = psycopg.connect(conninfo, connect_timeout=10)
    except psycopg.OperationalError as error:
        raise RetryableError(f"could not connect to {where_database}: {str(error).strip()}") from None

    rows_read = 0
    try:
        with connection, connection.transaction():
            with connection.cursor(name="analysis_readings") as cursor:
                cursor.execute(query, arguments)
                while True:
                    if check_cancelled is not None:
                        check_cancelled()
                    batch = cursor.fetchmany(batch_rows)
                    if not batch:
                        break
                    rows_read += len(batch)
                    if on_rows is not None:
                        on_rows(rows_read)
                    for sensor, seconds, value in batch:
                        if value is None or math.isnan(value):
                            continue
                        if math.isinf(value):
                            raise ReadingsError(
                                f"table {table}: sensor {sensor!r} has an infinite value at "
                                f"{format_timestamp(seconds)}; store NULL or no row for a missing reading"
                            )
                        times, values = columns.setdefault(sensor, ([], []))
                        times.append(seconds)
                        values.append(value)

            known = set(columns)
            missing = [sensor for sensor in dict.fromkeys([*(requested or []), *confirm]) if sensor not in known]
            if missing:
                existing = connection.execute(
                    sql.SQL("SELECT DISTINCT sensor_id FROM {table} WHERE sensor_id = ANY(%(sensors)s)").format(
                        table=identifier
                    ),
                    {"sensors": missing},
                ).fetchall()
                known.update(row[0] for row in existing)
    except psycopg.errors.UndefinedTable:
        raise InvalidParams(
            "table", table, f"table not found in {where_database}; create it or name an existing table"
        ) from None
    except (psycopg.errors.UndefinedColumn, psycopg.errors.DatatypeMismatch, psycopg.errors.CannotCoerce) as error:
        raise ReadingsError(
            f"table {table} in {where_database} does not have the columns sensor_id text, ts timestamptz, "
            f"value double precision: {str(error).strip()}"
        ) from None
    except psycopg.OperationalError as error:
        raise RetryableError(f"reading table {table} from {where_database} failed: {str(error).strip()}") from None
    finally:
        connection.close()

    series = {sensor: _sorted_series(sensor, times, values, f"table {table}") for sensor, (times, values) in columns.items()}
    return Readings(series=series, known=known, description=f"table {table} in {where_database}")


# ---------------------------------------------------------------------------
# Resampling


def grid_times(first: float, last: float, step: int, end: float | None = None) -> np.ndarray:
    """Return the multiples of ``step`` from ``first`` on: below ``end`` if given, else up to ``last``."""
    begin = math.ceil(first / step) * step
    if end is not None:
        stop = math.ceil(end / step) * step  # exclusive
    else:
        stop = math.floor(last / step) * step + step
    return np.arange(begin, stop, step, dtype=np.int64)


def resample_series(times: np.ndarray, values: np.ndarray, grid: np.ndarray, step: int, max_gap: float) -> np.ndarray:
    """Return the readings ``(times, values)`` resampled onto ``grid``.

    Each grid time ``g`` owns the cell ``[g - step/2, g + step/2)``. A cell
    with readings gets their mean, so a reading exactly on the grid is kept as
    it is and a coarser grid averages. An empty cell gets the linear
    interpolation between the last reading before it and the first after it
    when those two are at most ``max_gap`` seconds apart. Otherwise the value
    is NaN: no value is carried forward across a longer gap, nor extrapolated
    before the first or after the last reading.
    """
    out = np.full(grid.size, np.nan)
    if times.size == 0 or grid.size == 0:
        return out

    cells = np.floor((times - grid[0]) / step + 0.5).astype(np.int64)
    inside = (cells >= 0) & (cells < grid.size)
    counts = np.bincount(cells[inside], minlength=grid.size)
    sums = np.bincount(cells[inside], weights=values[inside], minlength=grid.size)
    filled = counts > 0
    out[filled] = sums[filled] / counts[filled]

    empty = np.flatnonzero(~filled)
    if empty.size and max_gap > 0:
        targets = grid[empty].astype(np.float64)
        after = np.searchsorted(times, targets, side="right")
        before = after - 1
        bridged = (before >= 0) & (after < times.size)
        empty, targets, after, before = empty[bridged], targets[bridged], after[bridged], before[bridged]
        span = times[after] - times[before]
        bridged = span <= max_gap
        empty, targets, after, before, span = (
            empty[bridged], targets[bridged], after[bridged], before[bridged], span[bridged],
        )
        weight = (targets - times[before]) / span
        out[empty] = values[before] + weight * (values[after] - values[before])
    return out


def resample(
    readings: Readings,
    sensors: list[str],
    step: int,
    max_gap: float,
    start: float | None = None,
    end: float | None = None,
    check_cancelled: Callable[[], None] | None = None,
    on_sensor: Callable[[int], None] | None = None,
) -> Grid:
    """Resample ``sensors`` of ``readings`` onto one grid of spacing ``step`` seconds.

    The grid runs from ``start`` (default: the earliest reading of any of the
    sensors) to ``end`` exclusive (default: the latest reading), at multiples
    of ``step`` seconds since the epoch. ``resample_series`` describes how a
    grid value is made. Raises ``ValueError`` when there is no reading at all
    or the grid would exceed ``MAX_GRID_CELLS``.
    """
    present = [readings.series[sensor][0] for sensor in sensors if sensor in readings.series]
    if not present:
        raise ValueError("there is no reading of the selected sensors in the time window")
    first = start if start is not None else min(float(times[0]) for times in present)
    last = max(float(times[-1]) for times in present)
    n_times = (math.floor((end if end is not None else last) / step) - math.ceil(first / step)) + 1
    if n_times * len(sensors) > MAX_GRID_CELLS:
        raise OverflowError(
            f"the grid would have {n_times} times x {len(sensors)} sensors, more than {MAX_GRID_CELLS} cells"
        )
    grid = grid_times(first, last, step, end)
    if grid.size == 0:
        raise ValueError("the time window is shorter than one grid step")

    values = np.full((len(sensors), grid.size), np.nan)
    counts = []
    empty = (np.empty(0), np.empty(0))
    for index, sensor in enumerate(sensors):
        if check_cancelled is not None:
            check_cancelled()
        times, series = readings.series.get(sensor, empty)
        values[index] = resample_series(times, series, grid, step, max_gap)
        counts.append(int(times.size))
        if on_sensor is not None:
            on_sensor(index + 1)
    return Grid(sensors=list(sensors), times=grid, values=values, step_seconds=step, readings_in_window=counts)


# ---------------------------------------------------------------------------
# Loading for an analysis body


def _unknown_sensor_message(unknown: list[str], readings: Readings, params: Mapping[str, Any]) -> str:
    hints = []
    for sensor in unknown[:5]:
        close = difflib.get_close_matches(sensor, readings.known, n=3)
        if close:
            hints.append(f"{sensor!r}: did you mean {', '.join(repr(c) for c in close)}?")
    source = params.get("source", "bundled")
    if source == "bundled":
        where = f"the bundled slice lists its {len(readings.known)} sensors in analyses/data/{BUNDLED_SENSORS}"
    elif source == "csv":
        where = f"the sensor_id column of {params.get('csv_path')} lists the {len(readings.known)} valid ids"
    else:
        table = params.get("table") or DEFAULT_TABLE
        where = f"list the valid ids with SELECT DISTINCT sensor_id FROM {table}"
    names = ", ".join(repr(sensor) for sensor in unknown[:10])
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    return " ".join([f"unknown sensor id(s) {names}{more} in {readings.description};", *hints, where])


def read_source(
    params: Mapping[str, Any],
    sensors: list[str] | None,
    start: float | None,
    end: float | None,
    context,
    target: str | None = None,
) -> Readings:
    """Read the readings that the data parameters select, raising service errors for bad sources.

    ``target`` is looked up in a table even when it has no readings in the
    window, so that the caller can tell an unknown id from an idle sensor.
    """
    source = params.get("source", "bundled")

    def progress(rows: int) -> None:
        context.progress(rows, message=f"{rows} rows read")

    try:
        if source == "table":
            url = os.environ.get(DATABASE_URL_ENV) or getattr(context, "database_url", None)
            if not url:
                raise AnalysisError(
                    f"source 'table' needs the readings database, but the job context has none; set "
                    f"{DATABASE_URL_ENV} in the worker's environment to a postgresql:// URL"
                )
            return read_table(url, params.get("table") or DEFAULT_TABLE, sensors, start, end,
                              context.check_cancelled, progress, confirm=[target] if target else [])
        path = bundled_readings_path() if source == "bundled" else pathlib.Path(params["csv_path"])
        try:
            return read_csv(path, sensors, start, end, context.check_cancelled, progress)
        except FileNotFoundError:
            if source == "bundled":
                raise AnalysisError(f"the bundled readings file {path} is missing; reinstall the package") from None
            raise InvalidParams("csv_path", str(path), "file not found on the worker host") from None
        except OSError as error:
            if source == "bundled":
                raise AnalysisError(f"could not read the bundled readings file {path}: {error}") from None
            raise InvalidParams("csv_path", str(path), f"could not be read: {error.strerror or error}") from None
    except ReadingsError as error:
        if source == "csv":
            raise InvalidParams("csv_path", params.get("csv_path"), str(error)) from None
        raise AnalysisError(str(error)) from None


def load_grid(
    params: Mapping[str, Any],
    context,
    sensors: list[str] | None,
    target: str | None = None,
) -> Grid:
    """Read and resample the readings an analysis requested, reporting phases on ``context``.

    ``sensors`` None means every sensor with readings in the window. A
    ``target``, when given, becomes row 0 of the grid. Unknown ids raise
    ``InvalidParams`` on ``target`` or ``sensors``. A target without readings
    in the window raises too, because no analysis of it is possible.
    """
    params = check_data_params(params)
    start = parse_timestamp(params["start"]) if params.get("start") else None
    end = parse_timestamp(params["end"]) if params.get("end") else None
    step = params.get("resample_seconds", RESAMPLE_SECONDS.default)
    max_gap = params.get("max_gap_seconds", MAX_GAP_SECONDS.default)

    requested = None
    if sensors is not None:
        requested = list(dict.fromkeys(([target] if target else []) + list(sensors)))

    context.phase("load")
    readings = read_source(params, requested, start, end, context, target)

    if target is not None and target not in readings.known:
        raise InvalidParams("target", target, _unknown_sensor_message([target], readings, params))
    if sensors is not None:
        unknown = [sensor for sensor in sensors if sensor not in readings.known]
        if unknown:
            raise InvalidParams("sensors", sensors, _unknown_sensor_message(unknown, readings, params))
        chosen = requested
    else:
        chosen = sorted(readings.series)
        if target is not None:
            chosen = [target] + [sensor for sensor in chosen if sensor != target]
    if target is not None and target not in readings.series:
        raise InvalidParams(
            "target", target,
            f"has no readings between {params.get('start') or 'the first reading'} and "
            f"{params.get('end') or 'the last reading'}; widen the window or pick another sensor",
        )
    if not chosen:
        field = "start" if start is not None else "sensors"
        raise InvalidParams(field, params.get(field), "no sensor has readings in the time window; widen the window")

    context.phase("resample", total=len(chosen))
    try:
        grid = resample(readings, chosen, step, max_gap, start, end, context.check_cancelled, context.progress)
    except OverflowError as error:
        raise InvalidParams(
            "resample_seconds", step, f"{error}; raise resample_seconds or narrow the time window or sensor list"
        ) from None
    except ValueError as error:
        if start is not None:
            field = "start"
        elif sensors is not None:
            field = "sensors"
        else:
            field = "source"
        raise InvalidParams(field, params.get(field), f"{error}; widen the time window") from None
    context.logger.info(
        "loaded %d sensors x %d grid times from %s", len(grid.sensors), grid.times.size, readings.description
    )
    return grid


def steps_from_minutes(params: Mapping[str, Any], field: str) -> int:
    """Return the parameter ``field`` (minutes) as a whole number of grid steps, rounded down."""
    step = params.get("resample_seconds", RESAMPLE_SECONDS.default)
    return math.floor(params[field] * 60 / step + 1e-9)
