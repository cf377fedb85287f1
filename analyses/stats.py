"""Statistics for the analyses, in numpy and the standard library only.

Workers must not need scipy, so the distribution tails here are computed from
the regularised incomplete beta function. The tests compare every function
with its scipy counterpart.

Arrays use NaN for a missing value. Correlations are pairwise-complete: a
pair of series is compared on the times where both have a value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

# A series whose variance over the compared times is below this fraction of
# its mean square around the series mean counts as constant. The threshold is
# far above the rounding error of the sums, which grows roughly like
# sqrt(n) * 1e-16 (an estimate: 1e-13 for a million values).
CONSTANT_TOLERANCE = 1e-10


# ---------------------------------------------------------------------------
# Distribution tails


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """Return I_x(a, b), the regularised incomplete beta function, for a, b > 0 and 0 <= x <= 1.

    Evaluates the continued fraction with the modified Lentz method and uses
    the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges
    slowly. The tests find it within 1e-9 relative of scipy.special.betainc.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"a and b must be positive, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b
    return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    # The arguments here converge within a few hundred terms; the limit only
    # stops a runaway loop.
    for m in range(1, 100_000):
        m2 = 2 * m
        numerator = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        result *= d * c
        numerator = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        result *= delta
        if abs(delta - 1.0) < 1e-15:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def student_t_two_sided_p(t: float, df: float) -> float:
    """Return P(|T| >= |t|) for Student's t distribution with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def normal_two_sided_p(z: float) -> float:
    """Return P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """Return P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return regularized_incomplete_beta(k, n - k + 1, p)


# ---------------------------------------------------------------------------
# Ranks and single-pair correlation


def rank_average(values: np.ndarray) -> np.ndarray:
    """Return the 1-based ranks of ``values`` (finite, 1-D), giving tied values their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.empty(ordered.size, dtype=bool)
    starts_group[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_group[1:])
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], ordered.size)
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(ordered.size)
    ranks[order] = mean_rank[group]
    return ranks


def pearson_finite(x: np.ndarray, y: np.ndarray) -> float | None:
    """Return Pearson's r of two finite 1-D arrays of equal length, or None when either is constant."""
    if x.size < 2:
        return None
    dx = x - x.mean()
    dy = y - y.mean()
    sxx = float(dx @ dx)
    syy = float(dy @ dy)
    if sxx <= CONSTANT_TOLERANCE * float(x @ x) or syy <= CONSTANT_TOLERANCE * float(y @ y) or sxx == 0 or syy == 0:
        return None
    r = float(dx @ dy) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def spearman_pairwise(x: np.ndarray, y: np.ndarray) -> tuple[float | None, int]:
    """Return Spearman's rho of ``x`` and ``y`` on the times where both are finite, and that count.

    Ranks are taken within those times, with mean ranks for ties, as
    scipy.stats.spearmanr does on the same aligned data. rho is None when
    either side is constant there or fewer than two times remain.
    """
    both = np.isfinite(x) & np.isfinite(y)
    count = int(np.count_nonzero(both))
    if count < 2:
        return None, count
    return pearson_finite(rank_average(x[both]), rank_average(y[both])), count


# ---------------------------------------------------------------------------
# Pairwise-complete Pearson for many series at once


@dataclasses.dataclass
class PearsonMatrix:
    """Pairwise-complete Pearson correlations of the rows of A with the rows of B.

    ``r`` is NaN where undefined; ``overlap`` counts the times both rows have a
    value; ``constant`` marks pairs where one row is constant on those times.
    """

    r: np.ndarray
    overlap: np.ndarray
    constant: np.ndarray


def _centered(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (values minus each row's mean with 0 where missing, presence mask as float)."""
    present = np.isfinite(rows)
    counts = present.sum(axis=1, keepdims=True)
    sums = np.where(present, rows, 0.0).sum(axis=1, keepdims=True)
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return np.where(present, rows - means, 0.0), present.astype(np.float64)


def pearson_matrix(a: np.ndarray, b: np.ndarray) -> PearsonMatrix:
    """Return pairwise-complete Pearson r of every row of ``a`` (p x n) with every row of ``b`` (q x n).

    Computes the five sums of each pair with matrix products over the
    presence masks, so the cost is five p x n x q products. Rows are centred
    on their own mean first, which keeps the sums of squares small and the
    cancellation in n*Sxx - Sx^2 harmless.
    """
    a0, ma = _centered(a)
    b0, mb = _centered(b)
    n = ma @ mb.T
    sa = a0 @ mb.T
    sb = ma @ b0.T
    saa = (a0 * a0) @ mb.T
    sbb = ma @ (b0 * b0).T
    sab = a0 @ b0.T

    with np.errstate(divide="ignore", invalid="ignore"):
        va = saa - sa * sa / n
        vb = sbb - sb * sb / n
        cov = sab - sa * sb / n
        constant = (va <= CONSTANT_TOLERANCE * saa) | (vb <= CONSTANT_TOLERANCE * sbb)
        r = cov / np.sqrt(va * vb)
    undefined = (n < 2) | constant
    r = np.where(undefined, np.nan, np.clip(r, -1.0, 1.0))
    return PearsonMatrix(r=r, overlap=np.rint(n).astype(np.int64), constant=constant & (n >= 2))


def shifted_pair(a: np.ndarray, b: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Return column slices of ``a`` and ``b`` that pair ``a[..., t]`` with ``b[..., t + lag]``."""
    n = a.shape[-1]
    if lag >= 0:
        return a[..., : n - lag], b[..., lag:]
    return a[..., -lag:], b[..., : n + lag]


@dataclasses.dataclass
class LaggedPearson:
    """Best-lag Pearson correlations of the rows of A with the rows of B.

    For each pair, ``lag`` (in grid steps) maximises |r(A[t], B[t + lag])|
    among lags with enough overlap and no constant side; a positive lag means
    the A row changes first. ``r`` and ``overlap`` are taken at that lag and
    ``r`` is NaN where no lag qualified. ``r0``/``overlap0``/``constant0`` are
    the plain lag-0 results. ``curves``, when requested, has r for every lag
    from -max_lag to max_lag along its first axis, NaN where the lag had too
    little overlap or a constant side.
    """

    r: np.ndarray
    lag: np.ndarray
    overlap: np.ndarray
    r0: np.ndarray
    overlap0: np.ndarray
    constant0: np.ndarray
    curves: np.ndarray | None = None


def lag_order(max_lag: int) -> list[int]:
    """Return 0, 1, -1, 2, -2, ... up to ``max_lag``, so that a tie keeps the smaller |lag|."""
    order = [0]
    for lag in range(1, max_lag + 1):
        order += [lag, -lag]
    return order


# Multiply-adds per block of rows in ``lagged_pearson``: at 1 to 10 GFLOP/s on
# one core, 5 to 50 ms between two cancel checks.
_BLOCK_MULTIPLY_ADDS = 50_000_000


def _pearson_matrix_blocked(
    a: np.ndarray, b: np.ndarray, check_cancelled: Callable[[], None] | None
) -> PearsonMatrix:
    rows = max(1, _BLOCK_MULTIPLY_ADDS // max(1, 5 * a.shape[1] * b.shape[0]))
    if rows >= a.shape[0]:
        return pearson_matrix(a, b)
    parts = []
    for first in range(0, a.shape[0], rows):
        if check_cancelled is not None:
            check_cancelled()
        parts.append(pearson_matrix(a[first : first + rows], b))
    return PearsonMatrix(
        r=np.concatenate([part.r for part in parts]),
        overlap=np.concatenate([part.overlap for part in parts]),
        constant=np.concatenate([part.constant for part in parts]),
    )


def lagged_pearson(
    a: np.ndarray,
    b: np.ndarray,
    max_lag: int,
    min_overlap: int,
    on_lag: Callable[[int], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
    keep_curves: bool = False,
) -> LaggedPearson:
    """Return, per pair of rows, the Pearson r of largest magnitude over lags -max_lag..max_lag.

    ``on_lag(done)`` runs after each lag, for progress. ``check_cancelled``
    runs between blocks of rows of ``a`` when one lag is a large computation.
    """
    best_r = np.full((a.shape[0], b.shape[0]), np.nan)
    best_lag = np.zeros(best_r.shape, dtype=np.int64)
    best_overlap = np.zeros(best_r.shape, dtype=np.int64)
    curves = np.full((2 * max_lag + 1, *best_r.shape), np.nan) if keep_curves else None
    lag0 = None
    for done, lag in enumerate(lag_order(max_lag), start=1):
        left, right = shifted_pair(a, b, lag)
        result = _pearson_matrix_blocked(left, right, check_cancelled)
        if lag0 is None:
            lag0 = result
        usable = (result.overlap >= min_overlap) & np.isfinite(result.r)
        if curves is not None:
            curves[lag + max_lag] = np.where(usable, result.r, np.nan)
        # NaN compares False, so an empty slot always takes the first usable lag.
        better = usable & ~(np.abs(result.r) <= np.abs(best_r))
        best_r = np.where(better, result.r, best_r)
        best_lag = np.where(better, lag, best_lag)
        best_overlap = np.where(better, result.overlap, best_overlap)
        if on_lag is not None:
            on_lag(done)
    return LaggedPearson(
        r=best_r, lag=best_lag, overlap=best_overlap, r0=lag0.r, overlap0=lag0.overlap, constant0=lag0.constant,
        curves=curves,
    )


# ---------------------------------------------------------------------------
# Autocorrelation and effective sample size


def autocorrelation(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Return the autocorrelation of ``x`` at lags 0..max_lag, skipping missing values.

    Lag k averages the products of the centred values over the pairs
    (t, t + k) where both are present and divides by the variance, so gaps
    leave the estimate unbiased by zeros. Computed with FFTs. A lag with no
    pair, or a constant series, gives 0.
    """
    present = np.isfinite(x)
    count = int(np.count_nonzero(present))
    result = np.zeros(max_lag + 1)
    if count < 2:
        return result
    centred = np.where(present, x - x[present].mean(), 0.0)
    size = 1 << int(2 * x.size - 1).bit_length()
    spectrum = np.fft.rfft(centred, size)
    mask_spectrum = np.fft.rfft(present.astype(np.float64), size)
    products = np.fft.irfft(spectrum * np.conj(spectrum), size)[: max_lag + 1]
    pairs = np.rint(np.fft.irfft(mask_spectrum * np.conj(mask_spectrum), size)[: max_lag + 1])
    variance = products[0] / pairs[0]
    if variance <= CONSTANT_TOLERANCE * float(np.mean(x[present] ** 2)) or variance == 0:
        return result
    with np.errstate(divide="ignore", invalid="ignore"):
        result = np.where(pairs > 0, products / pairs / variance, 0.0)
    return np.clip(result, -1.0, 1.0)


def effective_sample_size(acf_x: np.ndarray, acf_y: np.ndarray, n: int) -> float:
    """Return the effective number of independent pairs behind a correlation of n pairs.

    Uses Bartlett's large-sample variance of r under no correlation,
    n_eff = n / (1 + 2 * sum_k (1 - k/n) rho_x(k) rho_y(k)), with the sum over
    lags 1..n/5 because longer lags have too few pairs for a stable estimate.
    The lag-1-only formula n (1 - r1 r2) / (1 + r1 r2) does not fit 5-minute
    weather data: temperature there has r1 = 0.9995, which gives n_eff < 2
    for 15 days of readings although those days hold several independent
    weather situations. The result is at most n.
    """
    max_lag = min(n // 5, acf_x.size - 1, acf_y.size - 1)
    if max_lag < 1:
        return float(n)
    lags = np.arange(1, max_lag + 1)
    weighted = (1.0 - lags / n) * acf_x[1 : max_lag + 1] * acf_y[1 : max_lag + 1]
    inflation = 1.0 + 2.0 * float(weighted.sum())
    if inflation <= 1.0:
        return float(n)
    return n / inflation


def correlation_p_value(r: float, n_eff: float) -> float | None:
    """Return the two-sided p-value of r against no correlation, from a t test with n_eff - 2 degrees of freedom.

    None when n_eff <= 3, where the test has too few degrees of freedom to mean anything.
    """
    if n_eff <= 3:
        return None
    if abs(r) >= 1.0:
        return 0.0
    df = n_eff - 2.0
    t = r * math.sqrt(df / (1.0 - r * r))
    return student_t_two_sided_p(t, df)
