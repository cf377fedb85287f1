"""Spike events per sensor, and the ``spike-matching`` and ``co-occurrence`` analyses built on them.

Detection runs on each sensor's resampled series (or its first differences
with ``difference``). A point is a spike when its robust z-score

    z = (x - median) / scale

exceeds ``threshold``, where median and scale come from the centred window of
``window`` grid points around it. The scale is 1.4826 * MAD, the median
absolute deviation scaled to match the standard deviation of normal data.
Where more than half of the window has one value, MAD is 0. Then the scale is
1.2533 * the mean absolute deviation from the median (1.2533 = sqrt(pi/2), the
same normal-data factor). A mostly dry rain gauge is such a series: its first
nonzero reading after a dry spell is a spike. A window whose values are all
equal gives z = 0. A point without a value, or whose window has fewer than
``window // 2 + 1`` values, gives no z-score and cannot be a spike.

Consecutive spike points form one event. The event's time is its first point,
which for rain is the onset.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from analyses import data, registry, stats
from analyses.errors import InvalidParams

MAD_TO_SD = 1.4826
MEAN_ABSOLUTE_DEVIATION_TO_SD = math.sqrt(math.pi / 2)

# Window values sorted per block in ``robust_z_scores``, between two cancel
# checks: 20,000 windows of 25 points took 17 ms on the benchmark machine.
_VALUES_PER_BLOCK = 500_000
_MAX_EVENTS_LISTED = 100

THRESHOLD = registry.Param(
    "threshold", "number",
    "robust z-score above which a point is a spike (|z| for direction 'both')",
    default=3.5, minimum=0.5, maximum=1000,
)
WINDOW = registry.Param(
    "window", "integer",
    "odd number of grid points in the centred window for the rolling median and MAD "
    "(25 points = 2 hours at resample_seconds=300)",
    default=25, minimum=3, maximum=100_001,
)
DIFFERENCE = registry.Param(
    "difference", "boolean",
    "detect spikes in the change from one grid point to the next instead of in the values, "
    "which finds sudden jumps in a slowly varying series",
    default=False,
)
DIRECTION = registry.Param(
    "direction", "string",
    "which spikes count: 'up' (z > threshold), 'down' (z < -threshold) or 'both'",
    default="both", choices=("both", "up", "down"),
)
DETECTION_PARAMS = (THRESHOLD, WINDOW, DIFFERENCE, DIRECTION)

TOLERANCE_MINUTES = registry.Param(
    "tolerance_minutes", "number",
    "largest time between two events, in minutes, for them to match; rounded down to whole grid steps",
    default=10, minimum=0, maximum=24 * 60,
)
WINDOW_MINUTES = registry.Param(
    "window_minutes", "number",
    "an event of sensor B within this many minutes before or after an event of sensor A counts as "
    "co-occurring; rounded down to whole grid steps",
    default=30, minimum=0, maximum=24 * 60,
)
TOP_N = registry.Param(
    "top_n", "integer", "number of sensor pairs (and incidents) listed in the summary",
    default=20, minimum=0, maximum=10_000,
)


@dataclasses.dataclass
class SensorEvents:
    """The events of one sensor, as grid indices, and the points where detection had a value."""

    sensor: str
    starts: np.ndarray
    ends: np.ndarray
    peaks: np.ndarray
    peak_z: np.ndarray
    peak_values: np.ndarray
    detectable: np.ndarray


def detection_series(values: np.ndarray, difference: bool) -> np.ndarray:
    """Return the series spikes are detected in: the values, or their change since the previous point."""
    if not difference:
        return values
    changes = np.full(values.shape, np.nan)
    changes[1:] = values[1:] - values[:-1]
    return changes


def _lower_upper_median(ordered: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Return the median of each row of ``ordered`` (sorted, NaN last) over its first ``counts`` values."""
    rows = np.arange(ordered.shape[0])
    safe = np.maximum(counts, 1)
    lower = ordered[rows, (safe - 1) // 2]
    upper = ordered[rows, safe // 2]
    return (lower + upper) / 2.0


def robust_z_scores(
    series: np.ndarray, window: int, check_cancelled: Callable[[], None] | None = None
) -> np.ndarray:
    """Return the robust z-score of every point of ``series``, NaN where it is undefined (see the module doc)."""
    half = window // 2
    padded = np.concatenate([np.full(half, np.nan), series, np.full(half, np.nan)])
    windows = sliding_window_view(padded, window)
    scores = np.full(series.size, np.nan)
    min_values = window // 2 + 1

    rows = max(1, _VALUES_PER_BLOCK // window)
    for first in range(0, series.size, rows):
        if check_cancelled is not None:
            check_cancelled()
        block = windows[first : first + rows]
        centre = series[first : first + rows]
        counts = np.count_nonzero(np.isfinite(block), axis=1)
        median = _lower_upper_median(np.sort(block, axis=1), counts)
        deviation = np.abs(block - median[:, None])
        mad = _lower_upper_median(np.sort(deviation, axis=1), counts)
        mean_deviation = np.nansum(deviation, axis=1) / np.maximum(counts, 1)
        scale = np.where(mad > 0, MAD_TO_SD * mad, MEAN_ABSOLUTE_DEVIATION_TO_SD * mean_deviation)
        usable = (counts >= min_values) & np.isfinite(centre)
        # A zero scale means every value in the window is equal, so the centre
        # equals the median: no spike, z = 0.
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(scale > 0, (centre - median) / scale, 0.0)
        scores[first : first + block.shape[0]] = np.where(usable, z, np.nan)
    return scores


def detect_events(
    sensor: str,
    values: np.ndarray,
    threshold: float,
    window: int,
    difference: bool,
    direction: str,
    check_cancelled: Callable[[], None] | None = None,
) -> SensorEvents:
    """Return the spike events of one resampled series."""
    series = detection_series(values, difference)
    scores = robust_z_scores(series, window, check_cancelled)
    if direction == "up":
        flagged = scores > threshold
    elif direction == "down":
        flagged = scores < -threshold
    else:
        flagged = np.abs(scores) > threshold

    edges = np.diff(np.concatenate([[0], flagged.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    peaks = np.array(
        [start + int(np.argmax(np.abs(scores[start : end + 1]))) for start, end in zip(starts, ends)],
        dtype=np.int64,
    )
    return SensorEvents(
        sensor=sensor, starts=starts, ends=ends, peaks=peaks,
        peak_z=scores[peaks] if peaks.size else np.empty(0),
        peak_values=series[peaks] if peaks.size else np.empty(0),
        detectable=np.isfinite(scores),
    )


def detect_all(params: dict[str, Any], grid: data.Grid, context) -> list[SensorEvents]:
    """Detect events in every row of ``grid``, reporting a ``detect`` phase on ``context``."""
    if params["window"] > grid.times.size:
        raise InvalidParams(
            "window", params["window"],
            f"is longer than the series ({grid.times.size} grid points); use a smaller window or a longer time window",
        )
    context.phase("detect", total=len(grid.sensors))
    found = []
    for index, sensor in enumerate(grid.sensors):
        found.append(detect_events(
            sensor, grid.values[index], params["threshold"], params["window"], params["difference"],
            params["direction"], context.check_cancelled,
        ))
        context.progress(index + 1)
    return found


def within(times: np.ndarray, others: np.ndarray, tolerance: int) -> np.ndarray:
    """Return, for each of ``times``, whether some value of sorted ``others`` lies within +-tolerance."""
    if others.size == 0:
        return np.zeros(times.size, dtype=bool)
    first = np.searchsorted(others, times - tolerance, side="left")
    found = first < others.size
    found[found] = others[first[found]] <= times[found] + tolerance
    return found


def _event_list(events: SensorEvents, grid: data.Grid) -> list[dict[str, Any]]:
    return [
        {
            "start": grid.time_iso(int(events.starts[k])),
            "end": grid.time_iso(int(events.ends[k])),
            "peak": grid.time_iso(int(events.peaks[k])),
            "peak_value": float(events.peak_values[k]),
            "peak_z": float(events.peak_z[k]),
        }
        for k in range(min(events.starts.size, _MAX_EVENTS_LISTED))
    ]


def _events_array(found: list[SensorEvents]) -> np.ndarray:
    """Return one row per event: sensor index, start, end and peak grid index, peak z, peak value."""
    rows = [
        np.column_stack([
            np.full(events.starts.size, index), events.starts, events.ends, events.peaks,
            events.peak_z, events.peak_values,
        ])
        for index, events in enumerate(found)
    ]
    return np.concatenate(rows) if rows else np.empty((0, 6))


def _check_detection(params: dict[str, Any]) -> dict[str, Any]:
    if params["window"] % 2 == 0:
        raise InvalidParams("window", params["window"], "must be odd so that the window is centred on its point")
    return params


def _detection_summary(params: dict[str, Any]) -> dict[str, Any]:
    return {key: params[key] for key in ("threshold", "window", "difference", "direction")}


# ---------------------------------------------------------------------------
# spike-matching


def incidents(found: list[SensorEvents], tolerance: int) -> list[dict[str, Any]]:
    """Group all events into incidents: events in time order join while each is within ``tolerance`` of the last.

    Returns only incidents that involve at least two sensors. A long run of
    events at short intervals forms one incident however long it lasts; its
    start and end show the span.
    """
    starts = np.concatenate([events.starts for events in found]) if found else np.empty(0, dtype=np.int64)
    owners = np.concatenate([np.full(events.starts.size, index) for index, events in enumerate(found)]) \
        if found else np.empty(0, dtype=np.int64)
    scores = np.concatenate([events.peak_z for events in found]) if found else np.empty(0)
    order = np.argsort(starts, kind="stable")
    starts, owners, scores = starts[order], owners[order], scores[order]
    boundaries = np.flatnonzero(np.diff(starts) > tolerance) + 1
    groups = []
    for indices in np.split(np.arange(starts.size), boundaries):
        if indices.size == 0:
            continue
        members = list(dict.fromkeys(int(owner) for owner in owners[indices]))
        if len(members) < 2:
            continue
        groups.append({
            "first": int(starts[indices[0]]),
            "last": int(starts[indices[-1]]),
            "members": members,
            "n_events": int(indices.size),
            "max_abs_z": float(np.max(np.abs(scores[indices]))),
        })
    return groups


def run_spike_matching(params: dict[str, Any], context) -> dict[str, Any]:
    grid = data.load_grid(params, context, params.get("sensors"))
    found = detect_all(params, grid, context)
    tolerance = data.steps_from_minutes(params, "tolerance_minutes")
    count = len(found)

    context.phase("match", total=count)
    matched = np.zeros((count, count), dtype=np.int64)
    for i in range(count):
        context.check_cancelled()
        for j in range(count):
            matched[i, j] = int(np.count_nonzero(within(found[i].starts, found[j].starts, tolerance)))
        context.progress(i + 1)

    pairs = []
    for i in range(count):
        for j in range(i + 1, count):
            if matched[i, j] or matched[j, i]:
                pairs.append({
                    "a": found[i].sensor, "b": found[j].sensor,
                    "a_events": int(found[i].starts.size), "b_events": int(found[j].starts.size),
                    "a_matched": int(matched[i, j]), "b_matched": int(matched[j, i]),
                    "a_matched_fraction": float(matched[i, j] / found[i].starts.size),
                    "b_matched_fraction": float(matched[j, i] / found[j].starts.size),
                })
    pairs.sort(key=lambda pair: -(pair["a_matched"] + pair["b_matched"]))

    groups = incidents(found, tolerance)
    groups.sort(key=lambda group: (-len(group["members"]), group["first"]))
    listed_incidents = [
        {
            "start": grid.time_iso(group["first"]),
            "end": grid.time_iso(group["last"]),
            "sensors": [found[member].sensor for member in group["members"]],
            "n_events": group["n_events"],
            "max_abs_z": group["max_abs_z"],
        }
        for group in groups[: params["top_n"]]
    ]

    context.phase("save")
    arrays = {
        "events": context.save_array("events", _events_array(found)),
        "match_counts": context.save_array("match_counts", matched),
    }
    return {
        "data": grid.describe(),
        "detection": _detection_summary(params),
        "tolerance_minutes": tolerance * grid.step_seconds / 60.0,
        "events": [
            {
                "sensor": events.sensor,
                "n_events": int(events.starts.size),
                "events": _event_list(events, grid),
                "events_listed": min(int(events.starts.size), _MAX_EVENTS_LISTED),
            }
            for events in found
        ],
        "pairs": pairs[: params["top_n"]],
        "incidents": {"count": len(groups), "top": listed_incidents},
        "arrays": arrays,
        "array_columns": {
            "events": ["sensor_index", "start_index", "end_index", "peak_index", "peak_z", "peak_value"],
            "match_counts": "row sensor's events with an event of the column sensor within the tolerance",
        },
    }


SPIKE_MATCHING = registry.register(
    data.DataAnalysis(
        name="spike-matching",
        summary="Detect spikes per sensor with a rolling median and MAD and match them across sensors in time.",
        body=run_spike_matching,
        params=(*data.DATA_PARAMS, data.SENSORS, *DETECTION_PARAMS, TOLERANCE_MINUTES, TOP_N),
        check=_check_detection,
    )
)


# ---------------------------------------------------------------------------
# co-occurrence


def near_events(starts: np.ndarray, length: int, window: int) -> np.ndarray:
    """Return a mask of the grid points within +-window points of any of ``starts``."""
    marks = np.zeros(length + 1, dtype=np.int64)
    np.add.at(marks, np.maximum(starts - window, 0), 1)
    np.add.at(marks, np.minimum(starts + window + 1, length), -1)
    return np.cumsum(marks)[:length] > 0


@dataclasses.dataclass
class ChangeAfterEvents:
    """Change of sensor B from just before A's events to ``window`` points after them, and the same change at any time."""

    mean: float | None
    n: int
    baseline_mean: float | None
    baseline_sd: float | None
    z: float | None
    reason: str | None = None


def change_after_events(values: np.ndarray, starts: np.ndarray, window: int) -> ChangeAfterEvents:
    """Return the mean of values[t + window] - values[t - 1] over event starts t, and the same over all t.

    z compares the two means in units of the baseline's standard error for
    that many events. It treats the events as independent draws from all
    times, which is an estimate.
    """
    length = values.size
    changes = np.full(length, np.nan)
    if length > window + 1:
        changes[1 : length - window] = values[1 + window :] - values[: length - window - 1]
    baseline = changes[np.isfinite(changes)]
    at_events = changes[starts]
    at_events = at_events[np.isfinite(at_events)]
    if baseline.size < 2:
        return ChangeAfterEvents(None, int(at_events.size), None, None, None, "fewer than 2 grid times with a change")
    baseline_mean = float(baseline.mean())
    baseline_sd = float(baseline.std(ddof=1))
    if at_events.size == 0:
        return ChangeAfterEvents(None, 0, baseline_mean, baseline_sd, None,
                                 "no event of the first sensor has values of the second before and after it")
    mean = float(at_events.mean())
    if baseline_sd == 0:
        return ChangeAfterEvents(mean, int(at_events.size), baseline_mean, baseline_sd, None,
                                 "the second sensor never changes, so z is undefined")
    z = (mean - baseline_mean) / (baseline_sd / math.sqrt(at_events.size))
    return ChangeAfterEvents(mean, int(at_events.size), baseline_mean, baseline_sd, z)


@dataclasses.dataclass
class CoOccurrence:
    """Co-occurrence of A's events with B's events within +-window points, on the times both are observed."""

    a_events: int
    b_events: int
    count: int
    coverage: float
    expected: float
    lift: float | None
    p_value: float | None
    reason: str | None


def co_occurrence(a: SensorEvents, b: SensorEvents, window: int) -> CoOccurrence:
    """Return how many of A's events have a B event within +-window points, and what chance predicts.

    Both sensors are compared on the grid points where both have a z-score.
    ``coverage`` is the fraction of those points that lie within the window
    of some B event. If A's events fell on those points independently of B,
    each would co-occur with probability ``coverage``, so the expected count
    is events x coverage, lift is count / expected, and the p-value is the
    binomial upper tail P(X >= count).
    """
    joint = a.detectable & b.detectable
    a_starts = a.starts[joint[a.starts]]
    b_starts = b.starts[joint[b.starts]]
    near_b = near_events(b.starts, joint.size, window)
    points = int(np.count_nonzero(joint))
    coverage = float(np.count_nonzero(near_b & joint)) / points if points else 0.0
    count = int(np.count_nonzero(near_b[a_starts]))
    expected = a_starts.size * coverage

    reason = None
    if a_starts.size == 0:
        reason = "the first sensor has no event where both sensors are observed"
    elif b_starts.size == 0:
        reason = "the second sensor has no event where both sensors are observed"
    elif coverage >= 1.0:
        reason = "events of the second sensor are so dense that every time lies within the window of one"
    lift = None if reason else count / expected
    p_value = None if reason else stats.binomial_upper_tail(count, int(a_starts.size), coverage)
    return CoOccurrence(int(a_starts.size), int(b_starts.size), count, coverage, expected, lift, p_value, reason)


def run_co_occurrence(params: dict[str, Any], context) -> dict[str, Any]:
    grid = data.load_grid(params, context, params.get("sensors"))
    found = detect_all(params, grid, context)
    window = data.steps_from_minutes(params, "window_minutes")
    count = len(found)

    context.phase("pairs", total=count)
    shape = (count, count)
    co_counts = np.zeros(shape, dtype=np.int64)
    expected = np.full(shape, np.nan)
    lift = np.full(shape, np.nan)
    p_values = np.full(shape, np.nan)
    change_mean = np.full(shape, np.nan)
    change_z = np.full(shape, np.nan)
    listed = []
    for i in range(count):
        context.check_cancelled()
        for j in range(count):
            if i == j:
                continue
            result = co_occurrence(found[i], found[j], window)
            change = change_after_events(grid.values[j], found[i].starts, window)
            co_counts[i, j] = result.count
            expected[i, j] = result.expected
            if result.lift is not None:
                lift[i, j] = result.lift
                p_values[i, j] = result.p_value
            if change.mean is not None:
                change_mean[i, j] = change.mean
            if change.z is not None:
                change_z[i, j] = change.z
            entry = {
                "a": found[i].sensor, "b": found[j].sensor,
                "a_events": result.a_events, "b_events": result.b_events,
                "co_occurring": result.count, "expected": result.expected,
                "lift": result.lift, "p_value": result.p_value,
                "b_change_after_a": dataclasses.asdict(change),
            }
            if result.reason:
                entry["reason"] = result.reason
            listed.append(entry)
        context.progress(i + 1)

    # Pairs with a lift come first, most significant first. The others keep
    # their place in the list because b_change_after_a may still be defined.
    listed.sort(key=lambda entry: (entry["lift"] is None, entry["p_value"] or 0.0, -(entry["lift"] or 0.0)))
    undefined_count = sum(1 for entry in listed if entry["lift"] is None)

    context.phase("save")
    arrays = {
        name: context.save_array(name, array)
        for name, array in (
            ("co_occurring", co_counts), ("expected", expected), ("lift", lift), ("p_value", p_values),
            ("change_mean", change_mean), ("change_z", change_z),
        )
    }
    return {
        "data": grid.describe(),
        "detection": _detection_summary(params),
        "window_minutes": window * grid.step_seconds / 60.0,
        "events": [{"sensor": events.sensor, "n_events": int(events.starts.size)} for events in found],
        "pairs": listed[: params["top_n"]],
        "pairs_without_lift": undefined_count,
        "definitions": {
            "co_occurring": "events of a with an event of b within window_minutes before or after",
            "expected": "a's events times the fraction of jointly observed time within window_minutes of a b event",
            "lift": "co_occurring / expected; 1 is what chance gives",
            "p_value": "binomial probability of at least co_occurring by chance",
            "b_change_after_a": "mean of b[t + window] - b[t - 1] over a's event times t, against all times",
        },
        "arrays": arrays,
        "array_axes": "row: sensor a (events counted), column: sensor b, in the order of data.sensors",
    }


CO_OCCURRENCE = registry.register(
    data.DataAnalysis(
        name="co-occurrence",
        summary="How often spike events of one sensor fall near events of another, with lift over chance.",
        body=run_co_occurrence,
        params=(*data.DATA_PARAMS, data.SENSORS, *DETECTION_PARAMS, WINDOW_MINUTES, TOP_N),
        check=_check_detection,
    )
)
