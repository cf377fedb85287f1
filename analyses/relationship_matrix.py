"""The ``relationship-matrix`` analysis: pairwise Pearson and Spearman correlation of many sensors.

All sensors are resampled onto one grid (see ``analyses.data.resample``).
Each pair is compared on the grid times where both have a value. A pair with
fewer than ``min_overlap`` such times, or where one side is constant on them,
has no correlation: the summary gives null with the reason, and the arrays
carry NaN together with a status code, never a 0.

With ``max_lag_minutes`` above 0 the analysis also searches, per pair, the
lag of largest |r|. Spearman is computed at lag 0 only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analyses import data, registry, stats
from analyses.errors import InvalidParams

STATUS_COMPUTED = 0
STATUS_INSUFFICIENT_OVERLAP = 1
STATUS_CONSTANT = 2
STATUS_NAMES = {STATUS_COMPUTED: "computed", STATUS_INSUFFICIENT_OVERLAP: "insufficient_overlap",
                STATUS_CONSTANT: "constant"}

# Undefined pairs listed in the summary; the status array has all of them.
_MAX_UNDEFINED_LISTED = 100

MIN_OVERLAP = registry.Param(
    "min_overlap", "integer",
    "fewest grid times with readings of both sensors for a correlation to be reported",
    default=100, minimum=3, maximum=10_000_000,
)
MAX_LAG_MINUTES = registry.Param(
    "max_lag_minutes", "number",
    "largest lag searched for the best-lag correlation, in minutes; lags are whole multiples of "
    "resample_seconds; 0 turns the search off",
    default=0, minimum=0, maximum=7 * 24 * 60,
)
TOP_N = registry.Param(
    "top_n", "integer", "number of strongest pairs listed in the summary", default=20, minimum=0, maximum=10_000,
)


def undefined_reason(status: int, overlap: int, min_overlap: int) -> str:
    """Return the sentence a summary gives for a pair without a correlation."""
    if status == STATUS_INSUFFICIENT_OVERLAP:
        return f"only {overlap} grid times with readings of both sensors, fewer than min_overlap={min_overlap}"
    return "one sensor is constant on the grid times both sensors share, so the correlation is undefined"


def _number(value: float) -> float | None:
    """Return ``value`` as a float, or None where it is NaN or infinite (JSON has neither)."""
    value = float(value)
    return value if np.isfinite(value) else None


def _check_params(params: dict[str, Any]) -> dict[str, Any]:
    sensors = params.get("sensors")
    if sensors is not None and len(sensors) < 2:
        raise InvalidParams("sensors", sensors, "must name at least two sensors to correlate, or be left out")
    return params


def run_relationship_matrix(params: dict[str, Any], context) -> dict[str, Any]:
    grid = data.load_grid(params, context, params.get("sensors"))
    sensors = grid.sensors
    count = len(sensors)
    if count < 2:
        raise InvalidParams("sensors", sensors, "only one sensor has readings in the time window; widen it")
    min_overlap = params["min_overlap"]
    max_lag = data.steps_from_minutes(params, "max_lag_minutes")
    step_minutes = grid.step_seconds / 60.0

    lags = stats.lag_order(max_lag)
    context.phase("pearson", total=len(lags))

    def after_lag(done: int) -> None:
        context.check_cancelled()
        context.progress(done)

    lagged = stats.lagged_pearson(
        grid.values, grid.values, max_lag, min_overlap, on_lag=after_lag, check_cancelled=context.check_cancelled
    )

    status = np.full((count, count), STATUS_COMPUTED, dtype=np.int8)
    status[lagged.constant0] = STATUS_CONSTANT
    status[lagged.overlap0 < min_overlap] = STATUS_INSUFFICIENT_OVERLAP
    pearson = np.where(status == STATUS_COMPUTED, lagged.r0, np.nan)

    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    context.phase("spearman", total=len(pairs))
    spearman = np.full((count, count), np.nan)
    for i in range(count):
        if status[i, i] == STATUS_COMPUTED:
            spearman[i, i] = 1.0
    for done, (i, j) in enumerate(pairs, start=1):
        context.check_cancelled()
        if status[i, j] == STATUS_COMPUTED:
            rho, _ = stats.spearman_pairwise(grid.values[i], grid.values[j])
            spearman[i, j] = spearman[j, i] = np.nan if rho is None else rho
        if done % 20 == 0:
            context.progress(done)
    context.progress(len(pairs))

    context.phase("save")
    arrays = {
        "pearson": context.save_array("pearson", pearson),
        "spearman": context.save_array("spearman", spearman),
        "overlap": context.save_array("overlap", lagged.overlap0),
        "status": context.save_array("status", status),
    }
    if max_lag > 0:
        arrays["best_lag_minutes"] = context.save_array(
            "best_lag_minutes", np.where(np.isfinite(lagged.r), lagged.lag * step_minutes, np.nan)
        )
        arrays["pearson_best_lag"] = context.save_array("pearson_best_lag", lagged.r)
        arrays["overlap_best_lag"] = context.save_array("overlap_best_lag", lagged.overlap)

    computed = []
    undefined = []
    for i, j in pairs:
        if status[i, j] != STATUS_COMPUTED:
            undefined.append({
                "a": sensors[i], "b": sensors[j], "overlap": int(lagged.overlap0[i, j]),
                "status": STATUS_NAMES[int(status[i, j])],
                "reason": undefined_reason(int(status[i, j]), int(lagged.overlap0[i, j]), min_overlap),
            })
            continue
        entry = {
            "a": sensors[i], "b": sensors[j],
            "pearson": _number(pearson[i, j]),
            "spearman": _number(spearman[i, j]),
            "overlap": int(lagged.overlap0[i, j]),
        }
        if max_lag > 0:
            entry["best_lag_minutes"] = float(lagged.lag[i, j] * step_minutes) if np.isfinite(lagged.r[i, j]) else None
            entry["pearson_at_best_lag"] = _number(lagged.r[i, j])
            entry["overlap_at_best_lag"] = int(lagged.overlap[i, j])
        computed.append(entry)
    computed.sort(key=lambda entry: -abs(entry["pearson"]))

    return {
        "data": grid.describe(),
        "sensors": sensors,
        "min_overlap": min_overlap,
        "max_lag_minutes": max_lag * step_minutes,
        "lag_convention": "best_lag_minutes > 0: sensor a changes first; the correlation pairs a[t] with b[t + lag]",
        "pairs": {
            "total": len(pairs),
            "computed": len(computed),
            "insufficient_overlap": sum(1 for entry in undefined if entry["status"] == "insufficient_overlap"),
            "constant": sum(1 for entry in undefined if entry["status"] == "constant"),
        },
        "top_pairs": computed[: params["top_n"]],
        "undefined_pairs": undefined[:_MAX_UNDEFINED_LISTED],
        "undefined_pairs_listed": min(len(undefined), _MAX_UNDEFINED_LISTED),
        "status_codes": {str(code): name for code, name in STATUS_NAMES.items()},
        "arrays": arrays,
    }


RELATIONSHIP_MATRIX = registry.register(
    data.DataAnalysis(
        name="relationship-matrix",
        summary="Pairwise Pearson and Spearman correlation of sensors on a common grid, with optional best lag.",
        body=run_relationship_matrix,
        params=(*data.DATA_PARAMS, data.SENSORS, MIN_OVERLAP, MAX_LAG_MINUTES, TOP_N),
        check=_check_params,
    )
)
