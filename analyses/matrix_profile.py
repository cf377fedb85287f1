"""The ``matrix-profile`` analysis: motifs and discords of one sensor's resampled series.

The matrix profile gives, for every subsequence of ``window`` grid points, the
z-normalised Euclidean distance to its nearest neighbour among the other
subsequences. Neighbours that start within the exclusion zone of
ceil(window / 4) points are skipped as trivial matches, which is stumpy's
default (``config.STUMPY_EXCL_ZONE_DENOM = 4`` in stumpy 1.14). Distances range
from 0 (same shape) to 2 * sqrt(window).

The computation is exact. Like stumpy's ``stump`` it walks the diagonals of
the distance matrix and updates the centred covariance of two subsequences
from the previous pair on the same diagonal. The cost is therefore O(n^2) in
the number of subsequences, whatever the window. Diagonals are processed in
chunks between which the job reports progress and checks for cancel.

Conventions, all as in stumpy 1.14:

- A subsequence with a missing value has no profile (infinite distance,
  index -1) and is nobody's neighbour. Gaps are never filled here.
- A constant subsequence (all values equal) is at distance 0 from another
  constant subsequence and at sqrt(window) from any other subsequence,
  because its z-normalisation is undefined.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from analyses import data, registry
from analyses.errors import InvalidParams

# Distance-matrix cells per progress report and cancel check: 12 ms at the
# 6 ns per cell measured in bench/RESULTS-analyses.md.
_CELLS_PER_CHUNK = 2_000_000
# Subsequence values whose means and standard deviations are computed at once,
# which bounds the temporary arrays at about 32 MB.
_VALUES_PER_BLOCK = 4_000_000
# The cost is quadratic in the series length. 500,000 points are about
# 1.25 * 10^11 distance cells, an estimated 12 minutes at 6 ns per cell, and
# ten times more points would take a hundred times longer.
MAX_POINTS = 500_000

TARGET = registry.Param("target", "string", "sensor id whose series is analysed", required=True, max_length=256)
WINDOW = registry.Param(
    "window", "integer",
    "subsequence length in grid points (36 points = 3 hours at resample_seconds=300)",
    default=36, minimum=3, maximum=100_000,
)
TOP_K = registry.Param(
    "top_k", "integer", "number of motifs and of discords listed", default=3, minimum=1, maximum=100,
)


@dataclasses.dataclass
class MatrixProfile:
    """Profile distances (inf where undefined) and nearest-neighbour indices (-1 where undefined)."""

    distances: np.ndarray
    indices: np.ndarray
    complete: np.ndarray
    constant: np.ndarray
    exclusion_zone: int


def exclusion_zone(window: int) -> int:
    return math.ceil(window / 4)


def _subsequence_stats(
    series: np.ndarray, window: int, check_cancelled: Callable[[], None] | None = None
) -> tuple[np.ndarray, ...]:
    """Return centred series (0 where missing), means, standard deviations, completeness and constancy."""
    finite = np.isfinite(series)
    centred = np.where(finite, series - series[finite].mean(), 0.0)
    count = series.size - window + 1
    missing = np.concatenate([[0], np.cumsum(~finite)])
    complete = (missing[window:] - missing[:-window]) == 0

    means = np.empty(count)
    deviations = np.empty(count)
    constant = np.empty(count, dtype=bool)
    windows = sliding_window_view(centred, window)
    rows = max(1, _VALUES_PER_BLOCK // window)
    for first in range(0, count, rows):
        if check_cancelled is not None:
            check_cancelled()
        block = windows[first : first + rows]
        means[first : first + block.shape[0]] = block.mean(axis=1)
        deviations[first : first + block.shape[0]] = block.std(axis=1)
        constant[first : first + block.shape[0]] = block.max(axis=1) == block.min(axis=1)
    return centred, means, deviations, complete, constant & complete


def matrix_profile(
    series: np.ndarray,
    window: int,
    zone: int | None = None,
    check_cancelled: Callable[[], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> MatrixProfile:
    """Return the self-join matrix profile of ``series`` (1-D, NaN for missing values).

    ``zone`` defaults to ceil(window / 4). ``on_progress(cells_done,
    cells_total)`` and ``check_cancelled()`` run after every chunk of
    diagonals.
    """
    series = np.asarray(series, dtype=np.float64)
    zone = exclusion_zone(window) if zone is None else zone
    count = series.size - window + 1
    if count < 1:
        raise ValueError(f"window {window} is longer than the series ({series.size} points)")
    centred, means, deviations, complete, constant = _subsequence_stats(series, window, check_cancelled)

    # Pearson correlation of subsequences i and j is cov(i, j) * scale[i] * scale[j].
    # NaN for incomplete and constant subsequences keeps them out of the
    # main loop, because a comparison with NaN is false.
    usable = complete & ~constant
    scale = np.full(count, np.nan)
    scale[usable] = 1.0 / (deviations[usable] * math.sqrt(window))

    # cov(i, j) = cov(i-1, j-1) + df[i] * dg[j] + df[j] * dg[i], where cov is
    # the sum of products of the centred subsequences i and j. Expanding both
    # sides gives the identity; the tests check it against the definition.
    df = np.zeros(count)
    dg = np.zeros(count)
    df[1:] = (centred[window:] - centred[: count - 1]) / 2.0
    dg[1:] = (centred[window:] - means[1:]) + (centred[: count - 1] - means[:-1])
    # First row of the covariance matrix, one value per diagonal: the sum of
    # (T[t] - mean_0) * (T[g + t] - mean_g) equals the sum of (T[t] - mean_0) * T[g + t].
    first_row = np.correlate(centred, centred[:window] - means[0], mode="valid")

    best = np.full(count, -np.inf)
    indices = np.full(count, -1, dtype=np.int64)
    positions = np.arange(count, dtype=np.int64)
    buffer = np.empty(count)
    better = np.empty(count, dtype=bool)

    total_cells = sum(count - diagonal for diagonal in range(zone + 1, count))
    done_cells = 0
    chunk_cells = 0
    for diagonal in range(zone + 1, count):
        length = count - diagonal
        pearson = buffer[:length]
        pearson[0] = 0.0
        np.multiply(df[1:length], dg[diagonal + 1 :], out=pearson[1:])
        pearson[1:] += df[diagonal + 1 :] * dg[1:length]
        np.cumsum(pearson, out=pearson)
        pearson += first_row[diagonal]
        pearson *= scale[:length]
        pearson *= scale[diagonal:]

        mask = better[:length]
        np.greater(pearson, best[:length], out=mask)
        np.copyto(best[:length], pearson, where=mask)
        np.copyto(indices[:length], positions[diagonal:], where=mask)
        np.greater(pearson, best[diagonal:], out=mask)
        np.copyto(best[diagonal:], pearson, where=mask)
        np.copyto(indices[diagonal:], positions[:length], where=mask)

        chunk_cells += length
        if chunk_cells >= _CELLS_PER_CHUNK:
            done_cells += chunk_cells
            chunk_cells = 0
            if check_cancelled is not None:
                check_cancelled()
            if on_progress is not None:
                on_progress(done_cells, total_cells)
    if on_progress is not None:
        on_progress(total_cells, total_cells)

    _apply_constant_convention(best, indices, complete, constant, zone)
    distances = np.full(count, np.inf)
    found = indices >= 0
    distances[found] = np.sqrt(np.maximum(0.0, 2.0 * window * (1.0 - np.minimum(best[found], 1.0))))
    return MatrixProfile(distances=distances, indices=indices, complete=complete, constant=constant, exclusion_zone=zone)


def _nearest_outside_zone(candidates: np.ndarray, positions: np.ndarray, zone: int) -> np.ndarray:
    """Return, per position, the nearest of sorted ``candidates`` more than ``zone`` away, or -1."""
    result = np.full(positions.size, -1, dtype=np.int64)
    if candidates.size == 0:
        return result
    # The nearest candidate on the left is the last one <= position - zone - 1,
    # on the right the first one >= position + zone + 1.
    left = np.searchsorted(candidates, positions - zone, side="left") - 1
    right = np.searchsorted(candidates, positions + zone + 1, side="left")
    left_value = np.where(left >= 0, candidates[np.maximum(left, 0)], -1)
    right_value = np.where(right < candidates.size, candidates[np.minimum(right, candidates.size - 1)], -1)
    has_left = left_value >= 0
    has_right = right_value >= 0
    use_left = has_left & (~has_right | (positions - left_value <= right_value - positions))
    result[use_left] = left_value[use_left]
    result[~use_left & has_right] = right_value[~use_left & has_right]
    return result


def _apply_constant_convention(
    best: np.ndarray, indices: np.ndarray, complete: np.ndarray, constant: np.ndarray, zone: int
) -> None:
    """Add the pairs involving constant subsequences, which the main loop skipped.

    Two constant subsequences have correlation 1 (distance 0). A constant and
    a non-constant complete subsequence have correlation 0.5, which is
    distance sqrt(window), as in stumpy 1.14.
    """
    constant_positions = np.flatnonzero(constant)
    if constant_positions.size == 0:
        return
    varying_positions = np.flatnonzero(complete & ~constant)

    # Constant subsequences: another constant one if there is one, else any varying one.
    nearest_constant = _nearest_outside_zone(constant_positions, constant_positions, zone)
    nearest_varying = _nearest_outside_zone(varying_positions, constant_positions, zone)
    for position, same, other in zip(constant_positions, nearest_constant, nearest_varying):
        if same >= 0:
            best[position], indices[position] = 1.0, same
        elif other >= 0:
            best[position], indices[position] = 0.5, other

    # Varying subsequences: a constant one counts only if it beats the best so far.
    nearest = _nearest_outside_zone(constant_positions, varying_positions, zone)
    improves = (nearest >= 0) & (best[varying_positions] < 0.5)
    best[varying_positions[improves]] = 0.5
    indices[varying_positions[improves]] = nearest[improves]


def top_k(profile: MatrixProfile, k: int, window: int, largest: bool) -> list[int]:
    """Return up to ``k`` subsequence starts with the smallest (or largest) finite distances.

    After each pick, subsequences overlapping it or its neighbour (within
    ``window`` points) are skipped, so that the list does not repeat one
    pattern shifted by a few points.
    """
    distances = profile.distances
    candidates = np.flatnonzero(np.isfinite(distances))
    order = candidates[np.argsort(-distances[candidates] if largest else distances[candidates], kind="stable")]
    blocked = np.zeros(distances.size, dtype=bool)
    chosen = []
    for position in order:
        if blocked[position]:
            continue
        chosen.append(int(position))
        for centre in (position, profile.indices[position]):
            blocked[max(0, centre - window + 1) : centre + window] = True
        if len(chosen) == k:
            break
    return chosen


def run_matrix_profile(params: dict[str, Any], context) -> dict[str, Any]:
    target = params["target"]
    window = params["window"]
    grid = data.load_grid(params, context, [], target=target)
    series = grid.values[0]
    step_minutes = grid.step_seconds / 60.0

    if series.size > MAX_POINTS:
        raise InvalidParams(
            "resample_seconds", grid.step_seconds,
            f"gives {series.size} grid points, more than the {MAX_POINTS} this O(n^2) analysis accepts; "
            "raise resample_seconds or narrow the time window",
        )
    if window > series.size:
        raise InvalidParams(
            "window", window,
            f"is longer than the series ({series.size} grid points from {grid.time_iso(0)}); "
            "use a smaller window or a longer time window",
        )
    finite = np.isfinite(series)
    longest_run = _longest_run(finite)
    if longest_run < window:
        raise InvalidParams(
            "window", window,
            f"every subsequence of {window} points contains a missing value (the longest run without a gap is "
            f"{longest_run} points); use a smaller window, raise max_gap_seconds or choose a window of time with "
            "fewer gaps",
        )

    context.phase("matrix-profile")
    profile = matrix_profile(
        series, window,
        check_cancelled=context.check_cancelled,
        on_progress=lambda done, total: context.progress(done, total),
    )

    def describe(position: int) -> dict[str, Any]:
        neighbour = int(profile.indices[position])
        return {
            "index": position,
            "time": grid.time_iso(position),
            "distance": float(profile.distances[position]),
            "neighbor_index": neighbour,
            "neighbor_time": grid.time_iso(neighbour),
        }

    context.phase("save")
    arrays = {
        "profile": context.save_array("profile", profile.distances),
        "profile_index": context.save_array("profile_index", profile.indices),
        "times": context.save_array("times", grid.times[: profile.distances.size]),
    }
    without_neighbour = int(np.count_nonzero(profile.complete & (profile.indices < 0)))
    return {
        "target": target,
        "data": grid.describe(),
        "window": window,
        "window_minutes": window * step_minutes,
        "exclusion_zone": profile.exclusion_zone,
        "n_subsequences": int(profile.distances.size),
        "n_with_missing_values": int(np.count_nonzero(~profile.complete)),
        "n_constant": int(np.count_nonzero(profile.constant)),
        "n_without_neighbor": without_neighbour,
        "motifs": [describe(position) for position in top_k(profile, params["top_k"], window, largest=False)],
        "discords": [describe(position) for position in top_k(profile, params["top_k"], window, largest=True)],
        "distance": "z-normalised Euclidean distance between subsequences, from 0 to 2 * sqrt(window)",
        "arrays": arrays,
    }


def _longest_run(mask: np.ndarray) -> int:
    """Return the length of the longest run of True in ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return int((ends - starts).max()) if starts.size else 0


MATRIX_PROFILE = registry.register(
    data.DataAnalysis(
        name="matrix-profile",
        summary="Motifs and discords of one sensor from its exact z-normalised matrix profile.",
        body=run_matrix_profile,
        params=(*data.DATA_PARAMS, TARGET, WINDOW, TOP_K),
        timeout_seconds=4 * 3600,
    )
)
