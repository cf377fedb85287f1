"""Rate and ETA guards: never negative, infinite or NaN."""

from __future__ import annotations

import math

import pytest

from supervisor import rates


@pytest.mark.parametrize(
    ("completed", "total", "elapsed"),
    [(None, 10, 5.0), (0, 10, 5.0), (5, 10, 0.0), (5, 10, -1.0)],
)
def test_estimate_unknown_without_progress(completed, total, elapsed):
    assert rates.estimate(completed, total, elapsed) == (None, None)


def test_estimate_rate_and_eta():
    rate, eta = rates.estimate(5, 15, 10.0)

    assert rate == 0.5
    assert eta == 20.0


def test_estimate_without_total_has_no_eta():
    assert rates.estimate(5, None, 10.0) == (0.5, None)


def test_estimate_past_total_is_zero_eta():
    assert rates.estimate(20, 10, 10.0)[1] == 0


def test_estimate_tiny_elapsed_stays_finite():
    rate, eta = rates.estimate(1, 10**18, 1e-300)

    assert rate is None or math.isfinite(rate)
    assert eta is None or math.isfinite(eta)


@pytest.mark.parametrize(
    ("completed", "total", "expected"),
    [(5, 10, 50.0), (15, 10, 100.0), (-1, 10, 0.0), (5, None, None), (5, 0, None)],
)
def test_percent_clamped(completed, total, expected):
    assert rates.percent(completed, total) == expected
