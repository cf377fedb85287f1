"""Tests for the relationship-matrix analysis."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

from analyses import registry
from analyses.errors import Cancelled, InvalidParams
from tests.unit.analysis_context import (
    FakeContext,
    assert_json_finite,
    run_analysis,
    write_readings_csv,
)

TEMPS = ["vlinder19.temp", "vlinder20.temp", "vlinder21.temp"]
PRESSURES = [f"vlinder{n}.pressure" for n in ("01", "02", "05", "11", "18", "19", "20", "21", "27", "28")]


@pytest.fixture(scope="module")
def bundled():
    """Run the matrix once over every bundled sensor with a 2-hour lag search."""
    summary, context = run_analysis("relationship-matrix", {"max_lag_minutes": 120, "top_n": 1000})
    return summary, context


def _pair(summary, a, b):
    for entry in summary["top_pairs"]:
        if {entry["a"], entry["b"]} == {a, b}:
            return entry
    raise AssertionError(f"pair {a} / {b} not in top_pairs")


def _synthetic(tmp_path):
    rng = np.random.default_rng(11)
    offsets = np.arange(500) * 300
    base = rng.normal(size=500).cumsum()
    series = {
        "a": base + rng.normal(size=500),
        "b": base * 2 + rng.normal(size=500) * 3,
        "c": rng.normal(size=500),
    }
    series["a"][rng.random(500) < 0.2] = np.nan
    series["b"][100:140] = np.nan
    path = write_readings_csv(tmp_path / "r.csv", {name: (offsets, values) for name, values in series.items()})
    return path, series


def test_matrix_equals_scipy_on_aligned_data(tmp_path):
    path, series = _synthetic(tmp_path)
    summary, context = run_analysis(
        "relationship-matrix", {"source": "csv", "csv_path": path, "max_gap_seconds": 0, "min_overlap": 10}
    )
    assert summary["sensors"] == ["a", "b", "c"]
    pearson = context.arrays["pearson"]
    spearman = context.arrays["spearman"]
    for i, j in itertools.combinations(range(3), 2):
        x, y = series["abc"[i]], series["abc"[j]]
        both = np.isfinite(x) & np.isfinite(y)
        assert context.arrays["overlap"][i, j] == np.count_nonzero(both)
        assert pearson[i, j] == pytest.approx(scipy.stats.pearsonr(x[both], y[both]).statistic, abs=1e-12)
        assert spearman[i, j] == pytest.approx(scipy.stats.spearmanr(x[both], y[both]).statistic, abs=1e-12)
        assert pearson[j, i] == pearson[i, j]
    np.testing.assert_allclose(np.diag(pearson), 1.0)
    assert summary["pairs"] == {"total": 3, "computed": 3, "insufficient_overlap": 0, "constant": 0}
    assert_json_finite(summary)


def test_insufficient_overlap_is_null_with_reason(tmp_path):
    offsets = np.arange(200) * 300
    path = write_readings_csv(tmp_path / "r.csv", {
        "early": (offsets[:120], np.sin(offsets[:120] / 5000.0)),
        "late": (offsets[50:], np.cos(offsets[50:] / 7000.0)),
        "whole": (offsets, np.sin(offsets / 9000.0)),
    })
    summary, context = run_analysis(
        "relationship-matrix", {"source": "csv", "csv_path": path, "max_gap_seconds": 0, "min_overlap": 100}
    )
    assert summary["pairs"]["insufficient_overlap"] == 1
    (entry,) = summary["undefined_pairs"]
    assert {entry["a"], entry["b"]} == {"early", "late"}
    assert entry["overlap"] == 70
    assert entry["status"] == "insufficient_overlap"
    assert "only 70 grid times" in entry["reason"]
    assert "min_overlap=100" in entry["reason"]
    i, j = summary["sensors"].index("early"), summary["sensors"].index("late")
    assert np.isnan(context.arrays["pearson"][i, j])
    assert context.arrays["status"][i, j] == 1
    assert summary["status_codes"]["1"] == "insufficient_overlap"
    assert all(pair["pearson"] is not None for pair in summary["top_pairs"])
    assert_json_finite(summary)


def test_constant_sensor_is_null_with_reason(tmp_path):
    offsets = np.arange(200) * 300
    path = write_readings_csv(tmp_path / "r.csv", {
        "flat": (offsets, np.full(200, 4.2)),
        "wave": (offsets, np.sin(offsets / 5000.0)),
    })
    summary, context = run_analysis("relationship-matrix", {"source": "csv", "csv_path": path, "max_lag_minutes": 30})
    assert summary["top_pairs"] == []
    (entry,) = summary["undefined_pairs"]
    assert entry["status"] == "constant"
    assert "constant" in entry["reason"]
    assert context.arrays["status"][0, 1] == 2
    assert np.isnan(context.arrays["pearson"][0, 1])
    assert np.isnan(context.arrays["pearson_best_lag"][0, 1])
    assert_json_finite(summary)


def test_needs_two_sensors():
    with pytest.raises(InvalidParams, match="at least two sensors") as caught:
        run_analysis("relationship-matrix", {"sensors": ["vlinder02.temp"]})
    assert caught.value.field == "sensors"


def test_phases_and_progress():
    summary, context = run_analysis("relationship-matrix", {"sensors": TEMPS, "max_lag_minutes": 10})
    assert [name for name, _ in context.phases] == ["load", "resample", "pearson", "spearman", "save"]
    assert ("pearson", 5) in context.phases
    assert ("pearson", 5, None) in context.progress_calls
    assert ("spearman", 3, None) in context.progress_calls
    assert set(summary["arrays"]) == {
        "pearson", "spearman", "overlap", "status", "best_lag_minutes", "pearson_best_lag", "overlap_best_lag"
    }


def test_cancel_mid_run_raises():
    analysis = registry.get("relationship-matrix")
    for phase in ("pearson", "spearman"):
        context = FakeContext(cancel_after_progress=2, cancel_phase=phase)
        with pytest.raises(Cancelled):
            analysis.body(analysis.validate_params({"max_lag_minutes": 60}), context)
        assert context.current_phase == phase
        assert context.progress_after_cancel <= 1


# ---------------------------------------------------------------------------
# Relationships in the bundled VLINDER data. Expected values come from plain
# Pearson r on the raw 5-minute readings. The default grid also bridges gaps
# of up to 15 minutes, which changes r of the pairs below by at most 0.002.


def test_bundled_brussels_stations_agree(bundled):
    summary, _ = bundled
    # vlinder19 and vlinder20 are 0.7 km apart in central Brussels: r = 0.982.
    assert _pair(summary, "vlinder19.temp", "vlinder20.temp")["pearson"] == pytest.approx(0.982, abs=0.005)


def test_bundled_brussels_against_coast(bundled):
    summary, _ = bundled
    # De Haan (vlinder21) is on the coast, about 100 km away: r = 0.84, lower than within Brussels.
    coast = _pair(summary, "vlinder19.temp", "vlinder21.temp")["pearson"]
    assert coast == pytest.approx(0.84, abs=0.02)
    assert coast < _pair(summary, "vlinder19.temp", "vlinder20.temp")["pearson"] - 0.1


def test_bundled_all_pressures_agree(bundled):
    summary, _ = bundled
    # Every barometer measures the same synoptic pressure: r >= 0.96 for every pair,
    # including vlinder05, which has only 143 readings (187 grid values).
    for a, b in itertools.combinations(PRESSURES, 2):
        assert _pair(summary, a, b)["pearson"] >= 0.96, (a, b)


def test_bundled_wind_and_gust(bundled):
    summary, _ = bundled
    # Gust is the peak of the same wind: r = 0.968 at the windy coast station.
    assert _pair(summary, "vlinder21.wind", "vlinder21.gust")["pearson"] == pytest.approx(0.97, abs=0.01)


@pytest.mark.parametrize("station", ["vlinder02", "vlinder19", "vlinder20"])
def test_bundled_temperature_against_humidity(bundled, station):
    summary, _ = bundled
    # Relative humidity falls as the same air warms: r between -0.83 and -0.87 inland.
    assert -0.88 <= _pair(summary, f"{station}.temp", f"{station}.rh")["pearson"] <= -0.83


def test_bundled_globe_leads_air_temperature(bundled):
    summary, _ = bundled
    entry = _pair(summary, "vlinder02.globe_temp", "vlinder02.temp")
    # Sorted ids put globe_temp first, so a positive lag means the globe changes first.
    assert entry["a"] == "vlinder02.globe_temp"
    assert 60 <= entry["best_lag_minutes"] <= 90
    assert entry["pearson_at_best_lag"] == pytest.approx(0.92, abs=0.02)
    assert entry["pearson"] == pytest.approx(0.85, abs=0.02)


def test_bundled_spearman_equals_scipy(bundled):
    summary, context = bundled
    from analyses import data

    grid = data.load_grid({}, FakeContext(), summary["sensors"])
    sensors = summary["sensors"]
    for a, b in [("vlinder19.temp", "vlinder20.temp"), ("vlinder02.rain", "vlinder02.rh")]:
        i, j = sensors.index(a), sensors.index(b)
        x, y = grid.values[i], grid.values[j]
        both = np.isfinite(x) & np.isfinite(y)
        expected = scipy.stats.spearmanr(x[both], y[both]).statistic
        assert context.arrays["spearman"][i, j] == pytest.approx(expected, abs=1e-12)


def test_bundled_sparse_sensor_reported_not_zeroed():
    # vlinder05 reports 143 times in 15 days, 187 grid values after bridging short gaps.
    summary, context = run_analysis(
        "relationship-matrix", {"sensors": ["vlinder05.pressure", "vlinder02.pressure"], "min_overlap": 200}
    )
    (entry,) = summary["undefined_pairs"]
    assert entry["overlap"] == 187
    assert entry["status"] == "insufficient_overlap"
    assert np.isnan(context.arrays["pearson"][0, 1])
    assert_json_finite(summary)


def test_bundled_summary_is_strict_json(bundled):
    summary, _ = bundled
    assert_json_finite(summary)
    assert summary["pairs"]["total"] == 31 * 30 // 2
