"""Tests for spike detection and the spike-matching and co-occurrence analyses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from analyses import events, registry
from analyses.errors import Cancelled, InvalidParams
from tests.unit.analysis_context import (
    FakeContext,
    assert_json_finite,
    run_analysis,
    write_readings_csv,
)


def _naive_z(series, window, index):
    half = window // 2
    values = series[max(0, index - half) : index + half + 1]
    values = values[np.isfinite(values)]
    if not np.isfinite(series[index]) or values.size < window // 2 + 1:
        return math.nan
    median = np.median(values)
    deviation = np.abs(values - median)
    mad = np.median(deviation)
    scale = 1.4826 * mad if mad > 0 else math.sqrt(math.pi / 2) * deviation.mean()
    return 0.0 if scale == 0 else (series[index] - median) / scale


@pytest.mark.parametrize("window", [3, 7, 25])
def test_robust_z_matches_naive(window):
    rng = np.random.default_rng(13)
    series = np.round(rng.normal(size=400), 1)
    series[rng.random(400) < 0.15] = np.nan
    series[200:230] = 1.0
    scores = events.robust_z_scores(series, window)
    for index in range(series.size):
        expected = _naive_z(series, window, index)
        if math.isnan(expected):
            assert math.isnan(scores[index]), index
        else:
            assert scores[index] == pytest.approx(expected, abs=1e-12), index


def test_detects_planted_spikes_and_merges_runs():
    rng = np.random.default_rng(14)
    series = rng.normal(size=500)
    series[[100, 300, 301]] += [12.0, -15.0, -14.0]
    found = events.detect_events("s", series, threshold=6, window=25, difference=False, direction="both")
    np.testing.assert_array_equal(found.starts, [100, 300])
    np.testing.assert_array_equal(found.ends, [100, 301])
    assert found.peaks[1] in (300, 301)
    up = events.detect_events("s", series, threshold=6, window=25, difference=False, direction="up")
    np.testing.assert_array_equal(up.starts, [100])
    down = events.detect_events("s", series, threshold=6, window=25, difference=False, direction="down")
    np.testing.assert_array_equal(down.starts, [300])


def test_difference_finds_step():
    series = np.concatenate([np.zeros(100), np.full(100, 5.0)]) + np.sin(np.arange(200)) * 0.1
    stepped = events.detect_events("s", series, threshold=5, window=11, difference=True, direction="up")
    np.testing.assert_array_equal(stepped.starts, [100])
    assert stepped.peak_values[0] == pytest.approx(5.0, abs=0.3)


def test_zero_mad_rain_onset_is_spike():
    # A mostly dry gauge: more than half of every window is 0, so MAD = 0 and
    # the mean absolute deviation sets the scale.
    rain = np.zeros(200)
    rain[[50, 120, 121, 122]] = [0.2, 0.4, 1.0, 0.2]
    found = events.detect_events("rain", rain, threshold=3.5, window=25, difference=False, direction="up")
    np.testing.assert_array_equal(found.starts, [50, 120])
    # The 0.2 mm after the 1.0 mm burst is only 2.5 scale units above the
    # median, because the burst itself widens the scale.
    np.testing.assert_array_equal(found.ends, [50, 121])
    assert found.detectable.all()


def test_missing_values_are_not_events():
    series = np.zeros(60)
    series[30] = np.nan
    series[10] = 100.0
    found = events.detect_events("s", series, threshold=3.5, window=5, difference=False, direction="both")
    np.testing.assert_array_equal(found.starts, [10])
    assert not found.detectable[30]


def test_within_tolerance():
    matched = events.within(np.array([0, 10, 20]), np.array([3, 21]), tolerance=2)
    np.testing.assert_array_equal(matched, [False, False, True])
    np.testing.assert_array_equal(events.within(np.array([5]), np.array([], dtype=np.int64), 3), [False])


def _spike_csv(tmp_path):
    rng = np.random.default_rng(15)
    offsets = np.arange(1000) * 300
    a = rng.normal(size=1000)
    b = rng.normal(size=1000)
    c = rng.normal(size=1000)
    a[[100, 400, 700]] += 20
    b[[101, 400, 900]] += 20  # one step after a, together with a, alone
    c[[500]] += 20
    return write_readings_csv(tmp_path / "r.csv", {"a": (offsets, a), "b": (offsets, b), "c": (offsets, c)})


def test_spike_matching_tolerance(tmp_path):
    path = _spike_csv(tmp_path)
    params = {"source": "csv", "csv_path": path, "threshold": 8}
    summary, context = run_analysis("spike-matching", {**params, "tolerance_minutes": 5})
    counts = {entry["sensor"]: entry["n_events"] for entry in summary["events"]}
    assert counts == {"a": 3, "b": 3, "c": 1}
    (pair,) = summary["pairs"]
    assert (pair["a"], pair["b"], pair["a_matched"], pair["b_matched"]) == ("a", "b", 2, 2)
    assert context.arrays["match_counts"].tolist() == [[3, 2, 0], [2, 3, 0], [0, 0, 1]]
    assert summary["incidents"]["count"] == 2
    assert summary["incidents"]["top"][0]["sensors"] == ["a", "b"]
    assert context.arrays["events"].shape == (7, 6)
    assert_json_finite(summary)

    strict, _ = run_analysis("spike-matching", {**params, "tolerance_minutes": 0})
    (pair,) = strict["pairs"]
    assert pair["a_matched"] == 1


def test_co_occurrence_counts_and_chance(tmp_path):
    path = _spike_csv(tmp_path)
    summary, context = run_analysis(
        "co-occurrence", {"source": "csv", "csv_path": path, "threshold": 8, "window_minutes": 10, "top_n": 100}
    )
    pair = next(entry for entry in summary["pairs"] if (entry["a"], entry["b"]) == ("a", "b"))
    assert pair["co_occurring"] == 2
    # b's events at 101, 400 and 900 each cover 5 grid points (+-2), and the
    # windows do not overlap, so they cover 15 of the 1000 points.
    coverage = 15 / 1000
    assert pair["expected"] == pytest.approx(3 * coverage)
    assert pair["lift"] == pytest.approx(2 / (3 * coverage))
    assert pair["p_value"] == pytest.approx(scipy.stats.binom.sf(1, 3, coverage), rel=1e-9)
    assert context.arrays["co_occurring"][0, 1] == 2
    no_link = next(entry for entry in summary["pairs"] if (entry["a"], entry["b"]) == ("a", "c"))
    assert no_link["co_occurring"] == 0
    assert no_link["lift"] == 0.0
    assert_json_finite(summary)


def test_co_occurrence_without_events_gives_reason(tmp_path):
    offsets = np.arange(300) * 300
    rng = np.random.default_rng(16)
    quiet = rng.normal(size=300)
    busy = rng.normal(size=300)
    busy[150] += 30
    path = write_readings_csv(tmp_path / "r.csv", {"quiet": (offsets, quiet), "busy": (offsets, busy)})
    summary, context = run_analysis("co-occurrence", {"source": "csv", "csv_path": path, "threshold": 10})
    assert summary["pairs_without_lift"] == 2
    for entry in summary["pairs"]:
        assert entry["lift"] is None
        assert "no event" in entry["reason"]
    assert np.isnan(context.arrays["lift"]).all()
    assert_json_finite(summary)


def test_change_after_events():
    values = np.arange(20, dtype=float)
    values[10:] += 5  # a jump between 9 and 10
    result = events.change_after_events(values, np.array([10]), window=2)
    # values[12] - values[9] = 17 - 9
    assert result.mean == 8.0
    assert result.n == 1
    changes = values[1 + 2 :] - values[: 20 - 3]
    assert result.baseline_mean == pytest.approx(changes.mean())
    assert result.baseline_sd == pytest.approx(changes.std(ddof=1))
    assert result.z == pytest.approx((8.0 - changes.mean()) / changes.std(ddof=1))


def test_near_events_mask():
    mask = events.near_events(np.array([0, 10]), 15, window=2)
    np.testing.assert_array_equal(np.flatnonzero(mask), [0, 1, 2, 8, 9, 10, 11, 12])


def test_window_checks():
    analysis = registry.get("spike-matching")
    with pytest.raises(InvalidParams, match="must be odd") as caught:
        analysis.validate_params({"window": 24})
    assert caught.value.field == "window"
    with pytest.raises(InvalidParams, match="longer than the series") as caught:
        run_analysis("co-occurrence", {"window": 4001, "start": "2022-09-01T00:00:00Z", "end": "2022-09-02T00:00:00Z"})
    assert caught.value.field == "window"


@pytest.mark.parametrize(("name", "phase"), [("spike-matching", "detect"), ("co-occurrence", "pairs")])
def test_cancel_mid_run_raises(name, phase):
    analysis = registry.get(name)
    context = FakeContext(cancel_after_progress=2, cancel_phase=phase)
    with pytest.raises(Cancelled):
        analysis.body(analysis.validate_params({}), context)
    assert context.current_phase == phase
    assert context.progress_after_cancel <= 1


# ---------------------------------------------------------------------------
# The bundled VLINDER data


def _pair(summary, a, b):
    return next(entry for entry in summary["pairs"] if (entry["a"], entry["b"]) == (a, b))


def test_bundled_wind_and_gust_spikes_co_occur():
    # Gusts ride on the wind: spikes of one come with spikes of the other.
    summary, _ = run_analysis("co-occurrence", {"sensors": ["vlinder02.wind", "vlinder02.gust"], "window_minutes": 10})
    pair = _pair(summary, "vlinder02.gust", "vlinder02.wind")
    assert pair["lift"] > 3
    assert pair["p_value"] < 1e-6


def test_bundled_rain_onsets_come_together_across_stations():
    # Rain fronts cross Flanders within hours: onsets at the coast (vlinder21)
    # and in Brussels (vlinder20) fall within 30 minutes of each other 2.5 times
    # more often than chance.
    summary, _ = run_analysis("co-occurrence", {"sensors": ["vlinder20.rain", "vlinder21.rain"], "direction": "up"})
    pair = _pair(summary, "vlinder21.rain", "vlinder20.rain")
    assert pair["lift"] > 2
    assert pair["p_value"] < 0.01


@pytest.mark.parametrize(("station", "min_rise"), [("vlinder02", 2.0), ("vlinder19", 1.5)])
def test_bundled_rain_onset_raises_humidity(station, min_rise):
    # Rain onsets come with rising humidity. Measured here as rh 30 minutes
    # after an onset minus rh just before it: +2.6 points at vlinder02 and
    # +1.9 at vlinder19, against a mean change of 0.0 over all times.
    summary, _ = run_analysis("co-occurrence", {"sensors": [f"{station}.rain", f"{station}.rh"], "direction": "up"})
    change = _pair(summary, f"{station}.rain", f"{station}.rh")["b_change_after_a"]
    assert change["mean"] > min_rise
    assert abs(change["baseline_mean"]) < 0.1
    assert change["z"] > 3
    assert change["n"] >= 20


def test_bundled_spike_matching_pairs_wind_with_gust():
    summary, _ = run_analysis("spike-matching", {"sensors": ["vlinder02.wind", "vlinder02.gust", "vlinder21.pressure"]})
    top = summary["pairs"][0]
    assert {top["a"], top["b"]} == {"vlinder02.wind", "vlinder02.gust"}
    assert top["a_matched_fraction"] > 0.4
    assert top["b_matched_fraction"] > 0.4
    assert_json_finite(summary)
