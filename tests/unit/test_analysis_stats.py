"""Tests for the numpy-only statistics (analyses.stats) against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats

from analyses import stats


@pytest.mark.parametrize("a", [0.5, 1.0, 2.5, 30.0, 1500.0])
@pytest.mark.parametrize("b", [0.5, 1.0, 7.0, 400.0])
def test_incomplete_beta_matches_scipy(a, b):
    for x in (0.0, 1e-6, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        expected = scipy.special.betainc(a, b, x)
        assert stats.regularized_incomplete_beta(a, b, x) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("df", [1.0, 2.5, 3.0, 10.0, 57.3, 1000.0, 40000.0])
def test_student_t_p_matches_scipy(df):
    for t in (0.0, 0.1, 1.0, 2.0, 5.0, -5.0, 30.0):
        expected = 2 * scipy.stats.t.sf(abs(t), df)
        assert stats.student_t_two_sided_p(t, df) == pytest.approx(expected, rel=1e-8, abs=1e-300)


def test_normal_p_matches_scipy():
    for z in (0.0, 0.5, 1.96, -3.0, 8.0):
        assert stats.normal_two_sided_p(z) == pytest.approx(2 * scipy.stats.norm.sf(abs(z)), rel=1e-12)


@pytest.mark.parametrize("n", [1, 5, 40, 300, 5000])
@pytest.mark.parametrize("p", [0.001, 0.1, 0.5, 0.9])
def test_binomial_tail_matches_scipy(n, p):
    for k in sorted({0, 1, n // 3, n // 2, n, n + 1}):
        expected = scipy.stats.binom.sf(k - 1, n, p)
        assert stats.binomial_upper_tail(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-250)


def test_rank_average_matches_scipy():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 20, size=200).astype(float)
    np.testing.assert_allclose(stats.rank_average(values), scipy.stats.rankdata(values))


def _with_gaps(rng, rows, length, fraction=0.2):
    values = rng.normal(size=(rows, length)).cumsum(axis=1) + rng.normal(size=(rows, 1)) * 100
    values[rng.random(values.shape) < fraction] = np.nan
    return values


def test_pearson_matrix_matches_scipy_pairwise():
    rng = np.random.default_rng(1)
    values = _with_gaps(rng, 5, 400)
    result = stats.pearson_matrix(values, values)
    for i in range(5):
        for j in range(5):
            both = np.isfinite(values[i]) & np.isfinite(values[j])
            assert result.overlap[i, j] == np.count_nonzero(both)
            expected = scipy.stats.pearsonr(values[i][both], values[j][both]).statistic
            assert result.r[i, j] == pytest.approx(expected, abs=1e-12)


def test_pearson_matrix_large_offset_keeps_precision():
    # Station pressure in Pa: values near 101,000 that vary by a few hundred.
    rng = np.random.default_rng(2)
    base = 101_000 + rng.normal(size=2000).cumsum()
    other = base + rng.normal(size=2000) * 3
    result = stats.pearson_matrix(base[None], other[None])
    assert result.r[0, 0] == pytest.approx(scipy.stats.pearsonr(base, other).statistic, abs=1e-12)


def test_pearson_matrix_constant_and_no_overlap():
    values = np.array([
        [1.0, 2.0, 3.0, 4.0, np.nan, np.nan],
        [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
        [np.nan, np.nan, np.nan, np.nan, 1.0, 2.0],
    ])
    result = stats.pearson_matrix(values, values)
    assert np.isnan(result.r[0, 1])
    assert result.constant[0, 1]
    assert result.overlap[0, 2] == 0
    assert np.isnan(result.r[0, 2])
    assert not result.constant[0, 2]
    assert result.r[0, 0] == pytest.approx(1.0)


def test_spearman_matches_scipy_with_ties_and_gaps():
    rng = np.random.default_rng(4)
    x = np.round(rng.normal(size=500), 1)
    y = np.round(x + rng.normal(size=500), 1)
    x[rng.random(500) < 0.1] = np.nan
    y[rng.random(500) < 0.1] = np.nan
    rho, count = stats.spearman_pairwise(x, y)
    both = np.isfinite(x) & np.isfinite(y)
    assert count == np.count_nonzero(both)
    assert rho == pytest.approx(scipy.stats.spearmanr(x[both], y[both]).statistic, abs=1e-12)


def test_spearman_constant_is_none():
    assert stats.spearman_pairwise(np.ones(10), np.arange(10.0)) == (None, 10)


def test_lagged_pearson_finds_lead_with_sign():
    rng = np.random.default_rng(5)
    driver = rng.normal(size=3000).cumsum()
    follower = np.full(3000, np.nan)
    follower[7:] = driver[:-7] + rng.normal(size=2993) * 0.5
    result = stats.lagged_pearson(driver[None], follower[None], max_lag=20, min_overlap=100, keep_curves=True)
    # driver[t] matches follower[t + 7]: the driver changes 7 steps earlier.
    assert result.lag[0, 0] == 7
    assert result.r[0, 0] > result.r0[0, 0]
    assert result.curves.shape == (41, 1, 1)
    assert result.curves[7 + 20, 0, 0] == pytest.approx(result.r[0, 0])
    reverse = stats.lagged_pearson(follower[None], driver[None], max_lag=20, min_overlap=100)
    assert reverse.lag[0, 0] == -7


def test_lagged_pearson_matches_shifted_scipy():
    rng = np.random.default_rng(6)
    values = _with_gaps(rng, 3, 600)
    result = stats.lagged_pearson(values, values, max_lag=5, min_overlap=50, keep_curves=True)
    for lag in range(-5, 6):
        left, right = stats.shifted_pair(values[0], values[2], lag)
        both = np.isfinite(left) & np.isfinite(right)
        expected = scipy.stats.pearsonr(left[both], right[both]).statistic
        assert result.curves[lag + 5, 0, 2] == pytest.approx(expected, abs=1e-12)


def test_lagged_pearson_blocks_agree(monkeypatch):
    rng = np.random.default_rng(7)
    values = _with_gaps(rng, 9, 300)
    whole = stats.lagged_pearson(values, values, max_lag=3, min_overlap=10)
    monkeypatch.setattr(stats, "_BLOCK_MULTIPLY_ADDS", 5 * 300 * 9 * 2)
    checks = []
    blocked = stats.lagged_pearson(values, values, max_lag=3, min_overlap=10, check_cancelled=lambda: checks.append(1))
    np.testing.assert_array_equal(whole.lag, blocked.lag)
    np.testing.assert_allclose(whole.r, blocked.r, atol=1e-14)
    assert len(checks) == 7 * 5


def test_autocorrelation_matches_direct_with_gaps():
    rng = np.random.default_rng(8)
    x = rng.normal(size=1000).cumsum()
    x[rng.random(1000) < 0.15] = np.nan
    result = stats.autocorrelation(x, 50)
    centred = x - np.nanmean(x)
    variance = np.nanmean(centred**2)
    for lag in (0, 1, 7, 50):
        a, b = centred[: centred.size - lag], centred[lag:]
        both = np.isfinite(a) & np.isfinite(b)
        assert result[lag] == pytest.approx(np.mean(a[both] * b[both]) / variance, abs=1e-9)


def test_effective_sample_size_white_noise_and_ar1():
    rng = np.random.default_rng(9)
    n = 20000
    white = rng.normal(size=(2, n))
    acf = [stats.autocorrelation(row, n // 5) for row in white]
    assert stats.effective_sample_size(acf[0], acf[1], n) == pytest.approx(n, rel=0.1)

    # For two independent AR(1) series with coefficient phi, Bartlett's sum
    # gives n (1 - phi^2) / (1 + phi^2).
    phi = 0.8
    ar = np.zeros((2, n))
    for t in range(1, n):
        ar[:, t] = phi * ar[:, t - 1] + white[:, t]
    acf = [stats.autocorrelation(row, n // 5) for row in ar]
    expected = n * (1 - phi**2) / (1 + phi**2)
    assert stats.effective_sample_size(acf[0], acf[1], n) == pytest.approx(expected, rel=0.15)


def test_correlation_p_value_matches_scipy_for_independent_samples():
    rng = np.random.default_rng(10)
    x = rng.normal(size=60)
    y = 0.3 * x + rng.normal(size=60)
    result = scipy.stats.pearsonr(x, y)
    assert stats.correlation_p_value(result.statistic, 60) == pytest.approx(result.pvalue, rel=1e-9)


def test_correlation_p_value_edges():
    assert stats.correlation_p_value(0.5, 3.0) is None
    assert stats.correlation_p_value(1.0, 10.0) == 0.0
    assert stats.correlation_p_value(0.0, 10.0) == pytest.approx(1.0)
    assert math.isfinite(stats.correlation_p_value(0.999999, 3.5))
