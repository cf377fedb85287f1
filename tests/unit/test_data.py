"""Tests for reading, checking and resampling sensor readings (analyses.data)."""

from __future__ import annotations

import csv
import gzip
import math
import socket
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyses import data, registry
from analyses.errors import AnalysisError, Cancelled, InvalidParams, RetryableError
from tests.unit.analysis_context import FakeContext, run_analysis, write_readings_csv

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# ---------------------------------------------------------------------------
# Timestamps and parameter checks


def test_parse_timestamp_accepts_z_and_offsets():
    assert data.parse_timestamp("2022-09-01T00:00:00Z") == 1661990400.0
    assert data.parse_timestamp("2022-09-01T02:00:00+02:00") == 1661990400.0
    assert data.parse_timestamp("2022-09-01 00:00:00+00:00") == 1661990400.0


def test_parse_timestamp_rejects_missing_offset():
    with pytest.raises(ValueError, match="no UTC offset; append 'Z'"):
        data.parse_timestamp("2022-09-01T00:00:00")
    assert data.parse_timestamp("2022-09-01T00:00:00", assume_utc=True) == 1661990400.0


def test_check_params_normalises_timestamps():
    checked = data.check_data_params({"start": "2022-09-01T02:00:00+02:00", "end": "2022-09-02T00:00:00.5Z"})
    assert checked["start"] == "2022-09-01T00:00:00Z"
    assert checked["end"] == "2022-09-02T00:00:00.500000Z"


def test_check_params_start_after_end():
    with pytest.raises(InvalidParams) as caught:
        data.check_data_params({"start": "2022-09-05T00:00:00Z", "end": "2022-09-01T00:00:00Z"})
    assert caught.value.field == "end"
    assert "must be later than start (2022-09-05T00:00:00Z)" in caught.value.reason
    assert "2022-09-01T00:00:00Z" in str(caught.value)


def test_check_params_equal_start_and_end():
    with pytest.raises(InvalidParams) as caught:
        data.check_data_params({"start": "2022-09-01T00:00:00Z", "end": "2022-09-01T00:00:00Z"})
    assert caught.value.field == "end"


@pytest.mark.parametrize("text", ["yesterday", "2022-13-01T00:00:00Z", "2022-09-01T25:00Z", ""])
def test_check_params_bad_timestamp(text):
    with pytest.raises(InvalidParams) as caught:
        data.check_data_params({"start": text})
    assert caught.value.field == "start"
    assert "ISO-8601" in caught.value.reason
    assert "2022-09-01T00:00:00Z" in caught.value.reason


def test_check_params_naive_timestamp_names_fix():
    with pytest.raises(InvalidParams) as caught:
        data.check_data_params({"end": "2022-09-01T00:00:00"})
    assert caught.value.field == "end"
    assert "append 'Z'" in caught.value.reason


def test_check_params_csv_needs_absolute_path():
    with pytest.raises(InvalidParams, match="is required with source 'csv'") as caught:
        data.check_data_params({"source": "csv"})
    assert caught.value.field == "csv_path"
    with pytest.raises(InvalidParams, match="must be an absolute path"):
        data.check_data_params({"source": "csv", "csv_path": "readings.csv"})
    with pytest.raises(InvalidParams, match="used only with source 'csv'"):
        data.check_data_params({"source": "bundled", "csv_path": "/tmp/readings.csv"})


@pytest.mark.parametrize("table", ["Readings", "readings; drop table x", "a.b.c", "1readings", "x" * 64, "public."])
def test_check_params_bad_table_name(table):
    with pytest.raises(InvalidParams) as caught:
        data.check_data_params({"source": "table", "table": table})
    assert caught.value.field == "table"
    assert "schema.name" in caught.value.reason


def test_check_params_table_default_and_schema():
    assert data.check_data_params({"source": "table"})["table"] == "readings"
    assert data.check_data_params({"source": "table", "table": "public.readings"})["table"] == "public.readings"
    with pytest.raises(InvalidParams, match="used only with source 'table'"):
        data.check_data_params({"source": "bundled", "table": "readings"})


def test_check_params_sensor_list():
    with pytest.raises(InvalidParams, match="at least one sensor"):
        data.check_data_params({"sensors": []})
    with pytest.raises(InvalidParams, match="names sensor 'a' twice"):
        data.check_data_params({"sensors": ["a", "b", "a"]})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_registry_rejects_non_finite_numbers(value):
    with pytest.raises(InvalidParams, match="finite number") as caught:
        registry.get("relationship-matrix").validate_params({"max_lag_minutes": value})
    assert caught.value.field == "max_lag_minutes"


def test_every_data_analysis_checks_cross_fields_at_submit():
    for name in ("relationship-matrix", "related-sensors", "spike-matching", "co-occurrence", "matrix-profile"):
        analysis = registry.get(name)
        params = {"start": "2022-09-05T00:00:00Z", "end": "2022-09-01T00:00:00Z"}
        if name in ("related-sensors", "matrix-profile"):
            params["target"] = "vlinder02.temp"
        with pytest.raises(InvalidParams) as caught:
            analysis.validate_params(params)
        assert caught.value.field == "end", name
        assert analysis.deduplicate, name


# ---------------------------------------------------------------------------
# CSV reading


def test_read_csv_plain_and_gzip_agree(tmp_path):
    path = write_readings_csv(tmp_path / "r.csv", {"a": ([0, 300, 600], [1.0, 2.0, 3.0]), "b": ([0], [5.0])})
    with open(path, "rb") as source, gzip.open(tmp_path / "r.csv.gz", "wb") as target:
        target.write(source.read())
    plain = data.read_csv(path)
    packed = data.read_csv(tmp_path / "r.csv.gz")
    assert plain.known == packed.known == {"a", "b"}
    for sensor in ("a", "b"):
        np.testing.assert_array_equal(plain.series[sensor][0], packed.series[sensor][0])
        np.testing.assert_array_equal(plain.series[sensor][1], packed.series[sensor][1])


def test_read_csv_filters_sensors_and_window(tmp_path):
    path = write_readings_csv(tmp_path / "r.csv", {"a": ([0, 300, 600, 900], [1, 2, 3, 4]), "b": ([0], [5])})
    origin = data.parse_timestamp("2024-01-01T00:00:00Z")
    readings = data.read_csv(path, sensors=["a"], start=origin + 300, end=origin + 900)
    assert set(readings.series) == {"a"}
    assert readings.known == {"a", "b"}
    np.testing.assert_array_equal(readings.series["a"][1], [2.0, 3.0])


def test_read_csv_skips_empty_and_nan_values(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text(
        "sensor_id,ts,value\n"
        "a,2024-01-01T00:00:00Z,1.5\n"
        "a,2024-01-01T00:05:00Z,\n"
        "a,2024-01-01T00:10:00Z,NaN\n"
        "a,2024-01-01T00:15:00,2.5\n"
    )
    times, values = data.read_csv(path).series["a"]
    np.testing.assert_array_equal(values, [1.5, 2.5])
    assert times[1] - times[0] == 900.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("a,2024-01-01T00:00:00Z,inf\n", "line 2: the value is infinite"),
        ("a,2024-01-01T00:00:00Z,1\na,not-a-time,2\n", "line 3: invalid timestamp in column ts"),
        ("a,2024-01-01T00:00:00Z,abc\n", "line 2: the value is not a number"),
        ("a,2024-01-01T00:00:00Z\n", "line 2: expected 3 fields, found 2"),
        ("a,2024-01-01T00:00:00Z,1\na,2024-01-01T00:00:00+00:00,2\n", "repeated timestamp"),
    ],
)
def test_read_csv_rejects_bad_content(tmp_path, body, expected):
    path = tmp_path / "r.csv"
    path.write_text("sensor_id,ts,value\n" + body)
    with pytest.raises(data.ReadingsError, match=expected):
        data.read_csv(path)


def test_read_csv_rejects_bad_header(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("sensor,time,reading\n")
    with pytest.raises(data.ReadingsError, match="not a header with the columns sensor_id, ts, value"):
        data.read_csv(path)


def test_csv_source_errors_name_csv_path(tmp_path):
    with pytest.raises(InvalidParams, match="file not found") as caught:
        run_analysis("relationship-matrix", {"source": "csv", "csv_path": str(tmp_path / "missing.csv")})
    assert caught.value.field == "csv_path"
    path = tmp_path / "bad.csv"
    path.write_text("sensor_id,ts,value\na,2024-01-01T00:00:00Z,inf\n")
    with pytest.raises(InvalidParams, match="line 2") as caught:
        run_analysis("relationship-matrix", {"source": "csv", "csv_path": str(path)})
    assert caught.value.field == "csv_path"


# ---------------------------------------------------------------------------
# Resampling


def test_resample_known_gap_is_not_filled():
    # Readings every 300 s, then nothing from 600 s to 1800 s (a 1200 s gap),
    # then a 600 s gap between 2100 s and 2700 s.
    times = np.array([0, 300, 600, 1800, 2100, 2700], dtype=float)
    values = np.array([0.0, 1.0, 2.0, 6.0, 7.0, 9.0])
    grid = np.arange(0, 3300, 300)
    result = data.resample_series(times, values, grid, 300, max_gap=900)
    # 900, 1200 and 1500 lie in the 1200 s gap, longer than max_gap, so they
    # stay missing; 3000 comes after the last reading.
    expected_missing = [False, False, False, True, True, True, False, False, False, False, True]
    np.testing.assert_array_equal(np.isnan(result), expected_missing)
    # 2400 lies in the 600 s gap: linear interpolation between 7 and 9.
    assert result[8] == pytest.approx(8.0)
    # Readings on the grid are kept as they are.
    np.testing.assert_array_equal(result[[0, 1, 2, 6, 7, 9]], [0.0, 1.0, 2.0, 6.0, 7.0, 9.0])


def test_resample_gap_bridged_when_allowed():
    times = np.array([0, 600, 1800], dtype=float)
    values = np.array([0.0, 2.0, 6.0])
    grid = np.arange(0, 2100, 300)
    bridged = data.resample_series(times, values, grid, 300, max_gap=1200)
    np.testing.assert_allclose(bridged, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    strict = data.resample_series(times, values, grid, 300, max_gap=0)
    np.testing.assert_array_equal(np.isnan(strict), [False, True, False, True, True, True, False])


def test_resample_never_extrapolates():
    times = np.array([600, 900], dtype=float)
    values = np.array([1.0, 2.0])
    grid = np.arange(0, 1800, 300)
    result = data.resample_series(times, values, grid, 300, max_gap=10_000)
    np.testing.assert_array_equal(np.isnan(result), [True, True, False, False, True, True])


def test_resample_coarser_grid_averages_cells():
    times = np.arange(0, 3600, 300, dtype=float)
    values = np.arange(12, dtype=float)
    grid = np.array([0, 1800, 3600])
    result = data.resample_series(times, values, grid, 1800, max_gap=0)
    # Cell of 1800 is [900, 2700): readings 3..8.
    assert result[1] == pytest.approx(np.mean(np.arange(3, 9)))
    assert result[0] == pytest.approx(np.mean([0, 1, 2]))
    assert result[2] == pytest.approx(np.mean([9, 10, 11]))


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=1, max_value=4000), min_size=1, max_size=40),
    max_gap=st.integers(min_value=0, max_value=3000),
    step=st.sampled_from([60, 300, 450, 900]),
)
def test_resample_fills_only_within_max_gap(gaps, max_gap, step):
    times = np.cumsum([0] + gaps).astype(float)
    values = np.sin(times / 1000.0)
    grid = np.arange(0, int(times[-1]) + step, step)
    result = data.resample_series(times, values, grid, step, max_gap)
    for index, point in enumerate(grid):
        if np.isnan(result[index]):
            continue
        in_cell = (times >= point - step / 2) & (times < point + step / 2)
        if in_cell.any():
            assert result[index] == pytest.approx(values[in_cell].mean())
            continue
        before = times[times <= point].max()
        after = times[times > point].min()
        assert after - before <= max_gap
        assert min(values[times == before][0], values[times == after][0]) - 1e-12 <= result[index]
        assert result[index] <= max(values[times == before][0], values[times == after][0]) + 1e-12


def test_resample_rejects_huge_grid(tmp_path):
    path = write_readings_csv(tmp_path / "r.csv", {"a": ([0, 86400 * 365], [1, 2]), "b": ([0], [1])})
    with pytest.raises(InvalidParams, match="raise resample_seconds") as caught:
        run_analysis("relationship-matrix", {"source": "csv", "csv_path": path, "resample_seconds": 1})
    assert caught.value.field == "resample_seconds"


# ---------------------------------------------------------------------------
# The bundled slice


def _bundled_sensor_counts() -> dict[str, int]:
    with open(data.bundled_sensors_path(), newline="", encoding="utf-8") as handle:
        return {row["sensor_id"]: int(row["n_values"]) for row in csv.DictReader(handle)}


def test_bundled_slice_matches_its_metadata():
    grid = data.load_grid({"max_gap_seconds": 0}, FakeContext(), None)
    counts = _bundled_sensor_counts()
    assert grid.sensors == sorted(counts)
    assert len(grid.sensors) == 31
    # 15 days of 5-minute slots.
    assert grid.times.size == 4320
    assert grid.time_iso(0) == "2022-09-01T00:00:00Z"
    assert grid.time_iso(4319) == "2022-09-15T23:55:00Z"
    # With max_gap_seconds=0 the grid contains exactly the readings: none made up, none lost.
    for sensor in grid.sensors:
        assert np.count_nonzero(np.isfinite(grid.row(sensor))) == counts[sensor], sensor


def test_bundled_slice_default_gap_fills_only_short_gaps():
    strict = data.load_grid({"max_gap_seconds": 0, "sensors": ["vlinder02.temp"]}, FakeContext(), ["vlinder02.temp"])
    bridged = data.load_grid({"sensors": ["vlinder02.temp"]}, FakeContext(), ["vlinder02.temp"])
    both = np.isfinite(strict.values[0])
    np.testing.assert_array_equal(strict.values[0][both], bridged.values[0][both])
    # 2022-09-10 17:10 and 17:15 are missing (a 15-minute gap): bridged by the default 900 s.
    index = int(np.flatnonzero(strict.times == data.parse_timestamp("2022-09-10T17:10:00Z"))[0])
    assert np.isnan(strict.values[0][index])
    assert np.isfinite(bridged.values[0][index])
    # The outage 2022-09-07 07:05 to 09-08 14:05 stays missing.
    index = int(np.flatnonzero(strict.times == data.parse_timestamp("2022-09-07T12:00:00Z"))[0])
    assert np.isnan(bridged.values[0][index])


def test_load_window_and_grid_alignment():
    params = {"start": "2022-09-03T00:02:00Z", "end": "2022-09-04T00:00:00Z", "resample_seconds": 600}
    grid = data.load_grid(data.check_data_params(params), FakeContext(), ["vlinder02.temp"])
    assert grid.time_iso(0) == "2022-09-03T00:10:00Z"
    assert grid.time_iso(grid.times.size - 1) == "2022-09-03T23:50:00Z"
    assert grid.describe()["end"] == "2022-09-04T00:00:00Z"


def test_load_unknown_sensor_names_fix():
    with pytest.raises(InvalidParams) as caught:
        data.load_grid({}, FakeContext(), ["vlinder02.temp", "vlinder02.tmp", "nope"])
    assert caught.value.field == "sensors"
    assert "unknown sensor id(s) 'vlinder02.tmp', 'nope'" in caught.value.reason
    assert "did you mean 'vlinder02.temp'" in caught.value.reason
    assert data.BUNDLED_SENSORS in caught.value.reason


def test_load_unknown_target_names_target_field():
    with pytest.raises(InvalidParams) as caught:
        data.load_grid({}, FakeContext(), None, target="vlinder99.temp")
    assert caught.value.field == "target"


def test_load_target_without_readings_in_window():
    params = data.check_data_params({"start": "2022-09-07T12:00:00Z", "end": "2022-09-07T13:00:00Z"})
    with pytest.raises(InvalidParams, match="has no readings between") as caught:
        data.load_grid(params, FakeContext(), [], target="vlinder02.temp")
    assert caught.value.field == "target"


def test_load_reports_phases_and_cancels():
    context = FakeContext()
    data.load_grid({}, context, ["vlinder02.temp", "vlinder02.rh"])
    assert [name for name, _ in context.phases] == ["load", "resample"]
    assert context.phases[1] == ("resample", 2)
    assert context.cancel_checks > 0
    with pytest.raises(Cancelled):
        data.load_grid({}, FakeContext(cancel_after_progress=1, cancel_phase="load"), None)


# ---------------------------------------------------------------------------
# Postgres table


def _postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def readings_database():
    """Yield the URL of a scratch database with a ``readings`` table holding four bundled sensors."""
    if not _postgres_available():
        pytest.skip("no Postgres server answers on 127.0.0.1:5432")
    import psycopg

    name = f"analysis_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    sensors = ["vlinder19.temp", "vlinder20.temp", "vlinder02.temp", "vlinder02.globe_temp"]
    try:
        readings = data.read_csv(data.bundled_readings_path(), sensors=sensors)
        with psycopg.connect(url) as connection:
            connection.execute("CREATE SCHEMA sensors")
            for table in ("readings", "sensors.readings"):
                connection.execute(
                    f"CREATE TABLE {table} (sensor_id text, ts timestamptz, value double precision, "
                    "PRIMARY KEY (sensor_id, ts))"
                )
            with (
                connection.cursor() as cursor,
                cursor.copy("COPY readings (sensor_id, ts, value) FROM STDIN") as copy,
            ):
                for sensor, (times, values) in readings.series.items():
                    for seconds, value in zip(times, values):
                        copy.write_row((sensor, data.format_timestamp(seconds), value))
            connection.execute("INSERT INTO sensors.readings SELECT * FROM readings WHERE sensor_id = 'vlinder19.temp'")
            connection.execute("INSERT INTO readings VALUES ('vlinder19.temp', '2022-09-20T00:00:00Z', 'NaN')")
        yield url
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_read_table_equals_csv(readings_database):
    sensors = ["vlinder19.temp", "vlinder02.globe_temp"]
    start = data.parse_timestamp("2022-09-03T00:00:00Z")
    end = data.parse_timestamp("2022-09-06T00:00:00Z")
    from_table = data.read_table(readings_database.replace("postgresql://", "postgresql+psycopg://"),
                                 "readings", sensors, start, end)
    from_csv = data.read_csv(data.bundled_readings_path(), sensors, start, end)
    assert set(from_table.series) == set(sensors)
    for sensor in sensors:
        np.testing.assert_array_equal(from_table.series[sensor][0], from_csv.series[sensor][0])
        np.testing.assert_array_equal(from_table.series[sensor][1], from_csv.series[sensor][1])


def test_read_table_schema_qualified(readings_database):
    readings = data.read_table(readings_database, "sensors.readings")
    assert set(readings.series) == {"vlinder19.temp"}


def test_table_source_runs_analysis(readings_database, monkeypatch):
    monkeypatch.delenv(data.DATABASE_URL_ENV, raising=False)
    params = {"sensors": ["vlinder19.temp", "vlinder20.temp"], "end": "2022-09-16T00:00:00Z"}
    context = FakeContext(database_url=readings_database.replace("postgresql://", "postgresql+psycopg://"))
    from_table, _ = run_analysis("relationship-matrix", {**params, "source": "table"}, context)
    from_bundle, _ = run_analysis("relationship-matrix", params)
    assert from_table["top_pairs"] == from_bundle["top_pairs"]
    assert from_table["top_pairs"][0]["pearson"] == pytest.approx(0.982, abs=0.005)


def test_table_source_environment_overrides_context(readings_database, monkeypatch):
    monkeypatch.setenv(data.DATABASE_URL_ENV, readings_database)
    context = FakeContext(database_url="postgresql://postgres@127.0.0.1:1/unreachable")
    summary, _ = run_analysis(
        "relationship-matrix", {"source": "table", "sensors": ["vlinder19.temp", "vlinder20.temp"]}, context
    )
    assert summary["pairs"]["computed"] == 1


def test_table_source_unknown_table_and_sensor(readings_database, monkeypatch):
    monkeypatch.setenv(data.DATABASE_URL_ENV, readings_database)
    with pytest.raises(InvalidParams, match="table not found") as caught:
        run_analysis("relationship-matrix", {"source": "table", "table": "no_such_table"})
    assert caught.value.field == "table"
    with pytest.raises(InvalidParams, match="SELECT DISTINCT sensor_id FROM readings") as caught:
        run_analysis("relationship-matrix", {"source": "table", "sensors": ["vlinder19.temp", "vlinder99.temp"]})
    assert caught.value.field == "sensors"


def test_table_source_sensor_outside_window_is_known(readings_database):
    # vlinder19.temp exists, so a window without its readings is no unknown-sensor error.
    readings = data.read_table(readings_database, "readings", ["vlinder19.temp"],
                               start=data.parse_timestamp("2030-01-01T00:00:00Z"))
    assert readings.known == {"vlinder19.temp"}
    assert readings.series == {}


def test_table_source_idle_target_is_not_unknown(readings_database):
    # Every sensor is read (no sensor list), and the target has no reading in the window.
    context = FakeContext(database_url=readings_database)
    params = {"source": "table", "target": "vlinder19.temp", "start": "2030-01-01T00:00:00Z"}
    with pytest.raises(InvalidParams, match="has no readings between") as caught:
        run_analysis("related-sensors", params, context)
    assert caught.value.field == "target"
    with pytest.raises(InvalidParams, match="unknown sensor id") as caught:
        run_analysis("related-sensors", {**params, "target": "vlinder99.temp"}, context)
    assert caught.value.field == "target"


def test_table_source_without_url(monkeypatch):
    monkeypatch.delenv(data.DATABASE_URL_ENV, raising=False)
    with pytest.raises(AnalysisError, match=data.DATABASE_URL_ENV) as caught:
        run_analysis("relationship-matrix", {"source": "table"})
    assert not caught.value.retryable


def test_table_source_unreachable_is_retryable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe socket is closed.
    with pytest.raises(RetryableError, match=f"could not connect to database x on 127.0.0.1:{port}") as caught:
        data.read_table(f"postgresql://postgres:secret@127.0.0.1:{port}/x")
    assert "secret" not in str(caught.value)


def test_table_url_scheme_checked():
    with pytest.raises(AnalysisError, match="must start with postgresql://"):
        data.read_table("mysql://127.0.0.1/x")
