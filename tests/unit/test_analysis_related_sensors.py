"""Tests for the related-sensors analysis."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from analyses import registry, stats
from analyses.errors import Cancelled, InvalidParams
from tests.unit.analysis_context import (
    FakeContext,
    assert_json_finite,
    run_analysis,
    write_readings_csv,
)


def _related(summary, sensor):
    for entry in summary["related"]:
        if entry["sensor"] == sensor:
            return entry
    raise AssertionError(f"{sensor} not ranked")


@pytest.fixture(scope="module")
def bundled_temp():
    """Rank every bundled sensor against vlinder02.temp with a 3-hour lag bound."""
    summary, context = run_analysis("related-sensors", {"target": "vlinder02.temp", "max_lag_minutes": 180})
    return summary, context


def _leader_follower_csv(tmp_path, lead_steps):
    rng = np.random.default_rng(12)
    offsets = np.arange(2000) * 300
    driver = rng.normal(size=2000 + lead_steps).cumsum()
    # target[t] = driver[t - lead_steps]: the driver changes lead_steps earlier.
    target = driver[: 2000] + rng.normal(size=2000) * 0.3
    leader = driver[lead_steps:]
    noise = rng.normal(size=2000)
    return write_readings_csv(tmp_path / "r.csv", {
        "target": (offsets, target), "leader": (offsets, leader), "noise": (offsets, noise),
    })


def test_positive_lag_means_other_sensor_leads(tmp_path):
    path = _leader_follower_csv(tmp_path, lead_steps=6)
    summary, context = run_analysis(
        "related-sensors", {"source": "csv", "csv_path": path, "target": "target", "max_lag_minutes": 60}
    )
    first = summary["related"][0]
    assert first["sensor"] == "leader"
    assert first["rank"] == 1
    assert first["lag_minutes"] == 30.0
    assert first["r"] > 0.9
    assert summary["related"][1]["sensor"] == "noise"
    assert abs(summary["related"][1]["r"]) < abs(first["r"])
    assert context.arrays["lag_correlation"].shape == (2, 25)
    assert summary["array_rows"] == ["leader", "noise"]
    assert_json_finite(summary)


def test_correlation_at_lag_equals_scipy(tmp_path):
    path = _leader_follower_csv(tmp_path, lead_steps=4)
    summary, context = run_analysis(
        "related-sensors", {"source": "csv", "csv_path": path, "target": "target", "max_lag_minutes": 30}
    )
    from analyses import data

    grid = data.load_grid({"source": "csv", "csv_path": path}, FakeContext(), ["leader"], target="target")
    target, leader = grid.values
    left, right = stats.shifted_pair(leader, target, 4)
    expected = scipy.stats.pearsonr(left, right).statistic
    assert _related(summary, "leader")["r"] == pytest.approx(expected, abs=1e-12)
    curve = context.arrays["lag_correlation"][0]
    assert curve[4 + 6] == pytest.approx(expected, abs=1e-12)


def test_significance_fields(tmp_path):
    path = _leader_follower_csv(tmp_path, lead_steps=2)
    summary, _ = run_analysis(
        "related-sensors", {"source": "csv", "csv_path": path, "target": "target", "max_lag_minutes": 20}
    )
    leader = _related(summary, "leader")
    assert 3 < leader["n_eff"] < leader["overlap"]
    assert 0 <= leader["p_value"] <= leader["p_value_adjusted"] <= 1
    assert leader["p_value_adjusted"] == pytest.approx(min(1.0, leader["p_value"] * 9))
    expected = stats.correlation_p_value(leader["r"], leader["n_eff"])
    assert leader["p_value"] == pytest.approx(expected)


def test_constant_target_gives_reasons(tmp_path):
    offsets = np.arange(300) * 300
    path = write_readings_csv(tmp_path / "r.csv", {
        "target": (offsets, np.full(300, 7.0)), "other": (offsets, np.sin(offsets / 4000.0)),
    })
    summary, _ = run_analysis("related-sensors", {"source": "csv", "csv_path": path, "target": "target"})
    assert summary["related"] == []
    (entry,) = summary["undefined"]
    assert entry["sensor"] == "other"
    assert entry["status"] == "constant"
    assert "undefined" in entry["reason"]
    assert_json_finite(summary)


def test_unknown_target_and_submit_checks():
    with pytest.raises(InvalidParams) as caught:
        run_analysis("related-sensors", {"target": "vlinder02.tmp"})
    assert caught.value.field == "target"
    assert "did you mean 'vlinder02.temp'" in caught.value.reason
    analysis = registry.get("related-sensors")
    with pytest.raises(InvalidParams, match="is required"):
        analysis.validate_params({})
    with pytest.raises(InvalidParams, match="besides the target"):
        analysis.validate_params({"target": "vlinder02.temp", "sensors": ["vlinder02.temp"]})


def test_target_in_sensor_list_is_skipped():
    summary, _ = run_analysis(
        "related-sensors", {"target": "vlinder19.temp", "sensors": ["vlinder19.temp", "vlinder20.temp"]}
    )
    assert [entry["sensor"] for entry in summary["related"]] == ["vlinder20.temp"]


def test_cancel_mid_run_raises():
    analysis = registry.get("related-sensors")
    for phase in ("lags", "significance"):
        context = FakeContext(cancel_after_progress=2, cancel_phase=phase)
        with pytest.raises(Cancelled):
            analysis.body(analysis.validate_params({"target": "vlinder02.temp"}), context)
        assert context.current_phase == phase
        assert context.progress_after_cancel <= 1


# ---------------------------------------------------------------------------
# The bundled VLINDER data


def test_bundled_globe_temperature_leads_air_temperature(bundled_temp):
    summary, _ = bundled_temp
    globe = _related(summary, "vlinder02.globe_temp")
    # Sunlight warms the black globe before the air: the air temperature best
    # matches the globe about 80 minutes later, r = 0.92 there against 0.85 at lag 0.
    assert 60 <= globe["lag_minutes"] <= 90
    assert globe["r"] == pytest.approx(0.92, abs=0.02)
    assert globe["r_at_zero_lag"] == pytest.approx(0.85, abs=0.02)
    assert globe["p_value"] < 0.001


def test_bundled_ranking_and_effective_sample_size(bundled_temp):
    summary, _ = bundled_temp
    ranked = [entry["sensor"] for entry in summary["related"]]
    # Air temperatures and the globe thermometer of the same region come first.
    assert set(ranked[:4]) == {"vlinder19.temp", "vlinder20.temp", "vlinder02.globe_temp", "vlinder21.temp"}
    correlations = [abs(entry["r"]) for entry in summary["related"]]
    assert correlations == sorted(correlations, reverse=True)
    # Smooth diurnal series: 15 days of 5-minute readings hold only tens of
    # independent values, far fewer than the ~3700 pairs.
    for entry in summary["related"][:4]:
        assert 5 < entry["n_eff"] < 100
    assert summary["undefined"] == []
    assert_json_finite(summary)


def test_bundled_humidity_is_negative_at_target_station(bundled_temp):
    summary, _ = bundled_temp
    rh = _related(summary, "vlinder02.rh")
    assert rh["r"] == pytest.approx(-0.86, abs=0.02)
