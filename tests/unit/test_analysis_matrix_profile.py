"""Tests for the matrix-profile analysis against a naive computation and stumpy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from analyses import data, matrix_profile, registry
from analyses.errors import Cancelled, InvalidParams
from tests.unit.analysis_context import (
    FakeContext,
    assert_json_finite,
    run_analysis,
    write_readings_csv,
)


def naive_distances(series: np.ndarray, window: int, zone: int) -> np.ndarray:
    """Return the full distance matrix by the definition, with inf for excluded pairs."""
    count = series.size - window + 1
    subsequences = [series[i : i + window] for i in range(count)]
    distances = np.full((count, count), np.inf)
    for i in range(count):
        for j in range(count):
            a, b = subsequences[i], subsequences[j]
            if abs(i - j) <= zone or not (np.isfinite(a).all() and np.isfinite(b).all()):
                continue
            a_constant, b_constant = np.ptp(a) == 0, np.ptp(b) == 0
            if a_constant and b_constant:
                distances[i, j] = 0.0
            elif a_constant or b_constant:
                distances[i, j] = math.sqrt(window)
            else:
                distances[i, j] = np.linalg.norm((a - a.mean()) / a.std() - (b - b.mean()) / b.std())
    return distances


def _check_against_naive(series, window):
    zone = matrix_profile.exclusion_zone(window)
    profile = matrix_profile.matrix_profile(series, window)
    expected = naive_distances(series, window, zone)
    best = expected.min(axis=1)
    np.testing.assert_array_equal(np.isinf(profile.distances), np.isinf(best))
    finite = np.isfinite(best)
    np.testing.assert_allclose(profile.distances[finite], best[finite], rtol=0, atol=1e-9)
    for i in np.flatnonzero(finite):
        neighbour = profile.indices[i]
        assert abs(i - neighbour) > zone
        assert expected[i, neighbour] == pytest.approx(best[i], abs=1e-9)
    assert (profile.indices[~finite] == -1).all()


@pytest.mark.parametrize(("length", "window"), [(120, 3), (200, 10), (300, 32), (64, 60)])
def test_profile_equals_naive_random(length, window):
    rng = np.random.default_rng(length + window)
    _check_against_naive(rng.normal(size=length).cumsum(), window)


@pytest.mark.parametrize("window", [4, 12])
def test_profile_equals_naive_with_gaps(window):
    rng = np.random.default_rng(17)
    series = rng.normal(size=250).cumsum() + 1000.0
    series[[30, 31, 32, 100, 180]] = np.nan
    series[200:] = np.nan
    _check_against_naive(series, window)


def test_profile_equals_naive_with_constant_segments():
    rng = np.random.default_rng(18)
    series = rng.normal(size=200)
    series[20:40] = 3.0
    series[120:135] = 3.0
    series[160:166] = -1.0
    _check_against_naive(series, 8)


def test_profile_single_constant_segment_uses_sqrt_window():
    rng = np.random.default_rng(19)
    series = rng.normal(size=100)
    series[40:48] = 0.5
    profile = matrix_profile.matrix_profile(series, 8)
    assert profile.constant.sum() == 1
    assert profile.distances[40] == pytest.approx(math.sqrt(8))


def _stumpy_profile(series, window):
    import stumpy

    # stumpy divides by the zero standard deviation of NaN subsequences before
    # masking them, which numpy reports as a RuntimeWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stumpy.stump(series, window)
    return result[:, 0].astype(float), result[:, 1].astype(np.int64)


@pytest.mark.slow  # stumpy compiles its kernels with numba on first use
@pytest.mark.parametrize(("sensor", "window"), [("vlinder02.temp", 36), ("vlinder21.rain", 12)])
def test_profile_matches_stumpy_on_bundled_data(sensor, window):
    # vlinder21.rain is 0 most of the time, so it has many constant
    # subsequences and exercises that convention; both series have gaps.
    grid = data.load_grid({}, FakeContext(), [sensor])
    series = grid.values[0]
    profile = matrix_profile.matrix_profile(series, window)
    expected, expected_index = _stumpy_profile(series, window)
    assert np.isnan(series).any()
    np.testing.assert_array_equal(np.isinf(profile.distances), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(profile.distances[finite], expected[finite], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(profile.indices[~finite], expected_index[~finite])
    if sensor.endswith("rain"):
        assert profile.constant.sum() > 100


def _planted_csv(tmp_path):
    rng = np.random.default_rng(20)
    series = rng.normal(size=1500) * 0.3
    pattern = np.sin(np.linspace(0, 3 * np.pi, 40)) * 3
    series[200:240] += pattern
    series[1100:1140] += pattern
    offsets = np.arange(1500) * 300
    return write_readings_csv(tmp_path / "r.csv", {"s": (offsets, series)})


def test_motif_and_discord_found(tmp_path):
    path = _planted_csv(tmp_path)
    summary, context = run_analysis(
        "matrix-profile", {"source": "csv", "csv_path": path, "target": "s", "window": 40, "top_k": 2}
    )
    motif = summary["motifs"][0]
    # Noise may make a shift by a few points match slightly better, but the
    # pair is always the two planted copies, 900 points apart.
    first, second = sorted([motif["index"], motif["neighbor_index"]])
    assert 190 <= first <= 210
    assert second - first == 900
    assert motif["time"] == data.format_timestamp(data.parse_timestamp("2024-01-01T00:00:00Z") + motif["index"] * 300)
    assert len(summary["motifs"]) == 2
    assert abs(summary["motifs"][1]["index"] - motif["index"]) >= 40
    assert summary["exclusion_zone"] == 10
    assert summary["window_minutes"] == 200.0
    assert context.arrays["profile"].shape == (1461,)
    assert context.arrays["profile_index"][motif["index"]] == motif["neighbor_index"]
    assert_json_finite(summary)


def test_discord_found(tmp_path):
    # A periodic signal gives every subsequence a close neighbour one period
    # away, except those that overlap the one distorted cycle at 600..650.
    rng = np.random.default_rng(21)
    offsets = np.arange(1200)
    series = np.sin(offsets * 2 * np.pi / 50) + rng.normal(size=1200) * 0.05
    series[600:650] = np.sin(offsets[600:650] * 2 * np.pi / 25)
    path = write_readings_csv(tmp_path / "r.csv", {"s": (offsets * 300, series)})
    summary, _ = run_analysis("matrix-profile", {"source": "csv", "csv_path": path, "target": "s", "window": 50})
    discord = summary["discords"][0]
    assert 551 <= discord["index"] <= 649
    assert discord["distance"] > 3 * max(motif["distance"] for motif in summary["motifs"])


def test_progress_and_phases(tmp_path):
    path = _planted_csv(tmp_path)
    _, context = run_analysis("matrix-profile", {"source": "csv", "csv_path": path, "target": "s", "window": 40})
    assert [name for name, _ in context.phases] == ["load", "resample", "matrix-profile", "save"]
    done = [completed for phase, completed, _ in context.progress_calls if phase == "matrix-profile"]
    assert done == sorted(done)
    totals = {total for phase, _, total in context.progress_calls if phase == "matrix-profile"}
    assert len(totals) == 1
    assert done[-1] == totals.pop()


def test_window_longer_than_series():
    params = {"target": "vlinder02.temp", "window": 300, "start": "2022-09-01T00:00:00Z", "end": "2022-09-01T12:00:00Z"}
    with pytest.raises(InvalidParams, match=r"longer than the series \(144 grid points") as caught:
        run_analysis("matrix-profile", params)
    assert caught.value.field == "window"


def test_window_longer_than_gap_free_run():
    # The outage 2022-09-07 07:05 to 09-08 14:05 splits this window of time in two runs.
    params = {"target": "vlinder02.temp", "window": 100, "start": "2022-09-07T00:00:00Z", "end": "2022-09-08T20:00:00Z"}
    with pytest.raises(InvalidParams, match="longest run without a gap is") as caught:
        run_analysis("matrix-profile", params)
    assert caught.value.field == "window"


def test_submit_checks():
    analysis = registry.get("matrix-profile")
    with pytest.raises(InvalidParams, match="is required"):
        analysis.validate_params({})
    with pytest.raises(InvalidParams, match=">= 3"):
        analysis.validate_params({"target": "vlinder02.temp", "window": 2})
    with pytest.raises(InvalidParams, match="unknown parameter"):
        analysis.validate_params({"target": "vlinder02.temp", "sensors": ["vlinder02.temp"]})


def test_cancel_mid_run_raises(monkeypatch):
    monkeypatch.setattr(matrix_profile, "_CELLS_PER_CHUNK", 50_000)
    analysis = registry.get("matrix-profile")
    context = FakeContext(cancel_after_progress=3, cancel_phase="matrix-profile")
    with pytest.raises(Cancelled):
        analysis.body(analysis.validate_params({"target": "vlinder02.temp"}), context)
    assert context.current_phase == "matrix-profile"
    assert context.progress_after_cancel <= 1


def test_bundled_daily_cycle_is_a_motif():
    # Air temperature repeats its diurnal shape: the best 3-hour motifs match
    # another day at nearly the same time of day.
    summary, _ = run_analysis("matrix-profile", {"target": "vlinder02.temp", "window": 36, "top_k": 3})
    for motif in summary["motifs"]:
        assert motif["distance"] < 1.0
        hours = abs(motif["index"] - motif["neighbor_index"]) * 5 / 60
        assert min(hours % 24, 24 - hours % 24) < 3
    assert summary["discords"][0]["distance"] > summary["motifs"][0]["distance"]
    assert_json_finite(summary)
