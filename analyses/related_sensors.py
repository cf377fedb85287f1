"""The ``related-sensors`` analysis: every sensor ranked by its strongest lagged correlation with a target.

For each other sensor the analysis searches lags in ``[-max_lag, max_lag]``
(whole grid steps) for the largest |r| between ``other[t]`` and
``target[t + lag]``. A positive lag means the other sensor changes first: on
the bundled data, ``vlinder02.globe_temp`` leads ``vlinder02.temp`` by about
80 minutes because sunlight warms the globe before the air.

The p-value tests r against no correlation with a t test on an effective
sample size that accounts for autocorrelation (``stats.effective_sample_size``).
It holds for the one lag reported. ``p_value_adjusted`` multiplies it by the
number of lags searched (Bonferroni), a conservative bound for the search.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analyses import data, registry, stats
from analyses.errors import InvalidParams
from analyses.relationship_matrix import MIN_OVERLAP

TARGET = registry.Param("target", "string", "sensor id to relate the others to", required=True, max_length=256)
CANDIDATES = registry.Param(
    "sensors", "string_list",
    "sensor ids to rank against the target (default: every other sensor with readings in the time window)",
    max_length=1000,
)
MAX_LAG_MINUTES = registry.Param(
    "max_lag_minutes", "number",
    "largest lag searched, in minutes, in both directions; lags are whole multiples of resample_seconds",
    default=180, minimum=0, maximum=7 * 24 * 60,
)


def _number(value: float) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _check_params(params: dict[str, Any]) -> dict[str, Any]:
    sensors = params.get("sensors")
    if sensors is not None:
        others = [sensor for sensor in sensors if sensor != params["target"]]
        if not others:
            raise InvalidParams("sensors", sensors, "must name at least one sensor besides the target")
    return params


def run_related_sensors(params: dict[str, Any], context) -> dict[str, Any]:
    target = params["target"]
    candidates = params.get("sensors")
    if candidates is not None:
        candidates = [sensor for sensor in candidates if sensor != target]
    grid = data.load_grid(params, context, candidates, target=target)
    others = grid.sensors[1:]
    if not others:
        raise InvalidParams("sensors", candidates, "no sensor besides the target has readings in the time window")
    min_overlap = params["min_overlap"]
    max_lag = data.steps_from_minutes(params, "max_lag_minutes")
    step_minutes = grid.step_seconds / 60.0
    target_row = grid.values[:1]
    other_rows = grid.values[1:]

    lag_count = 2 * max_lag + 1
    context.phase("lags", total=lag_count)

    def after_lag(done: int) -> None:
        context.check_cancelled()
        context.progress(done)

    lagged = stats.lagged_pearson(
        other_rows, target_row, max_lag, min_overlap,
        on_lag=after_lag, check_cancelled=context.check_cancelled, keep_curves=True,
    )

    context.phase("significance", total=len(others))
    acf_lags = grid.times.size // 5
    target_acf = stats.autocorrelation(grid.values[0], acf_lags)
    related = []
    undefined = []
    for index, sensor in enumerate(others):
        context.check_cancelled()
        r = float(lagged.r[index, 0])
        overlap0 = int(lagged.overlap0[index, 0])
        if not np.isfinite(r):
            if overlap0 < min_overlap:
                reason = (f"only {overlap0} grid times with readings of both sensors at lag 0, fewer than "
                          f"min_overlap={min_overlap}, and no lag within {max_lag * step_minutes:g} minutes has enough")
                status = "insufficient_overlap"
            else:
                reason = "one of the two sensors is constant on the shared grid times, so r is undefined at every lag"
                status = "constant"
            undefined.append({"sensor": sensor, "status": status, "overlap": overlap0, "reason": reason})
            context.progress(index + 1)
            continue

        overlap = int(lagged.overlap[index, 0])
        n_eff = stats.effective_sample_size(target_acf, stats.autocorrelation(other_rows[index], acf_lags), overlap)
        p_value = stats.correlation_p_value(r, n_eff)
        entry = {
            "sensor": sensor,
            "lag_minutes": int(lagged.lag[index, 0]) * step_minutes,
            "r": r,
            "r_at_zero_lag": _number(lagged.r0[index, 0]) if overlap0 >= min_overlap else None,
            "overlap": overlap,
            "n_eff": n_eff,
            "p_value": p_value,
            "p_value_adjusted": None if p_value is None else min(1.0, p_value * lag_count),
        }
        if p_value is None:
            entry["p_value_reason"] = (
                f"effective sample size {n_eff:.1f} is at most 3, too few independent values for a t test"
            )
        related.append(entry)
        context.progress(index + 1)

    related.sort(key=lambda entry: -abs(entry["r"]))
    for rank, entry in enumerate(related, start=1):
        entry["rank"] = rank

    context.phase("save")
    curves = lagged.curves[:, :, 0].T  # (others, lags), lags ascending from -max_lag
    arrays = {
        "lag_correlation": context.save_array("lag_correlation", curves),
        "lag_minutes": context.save_array("lag_minutes", np.arange(-max_lag, max_lag + 1) * step_minutes),
    }
    return {
        "target": target,
        "data": grid.describe(),
        "max_lag_minutes": max_lag * step_minutes,
        "lag_step_minutes": step_minutes,
        "min_overlap": min_overlap,
        "lag_convention": "lag_minutes > 0: the other sensor changes first; r pairs other[t] with target[t + lag]",
        "significance": (
            "p_value: two-sided t test of r at the reported lag with n_eff - 2 degrees of freedom, n_eff from "
            "Bartlett's autocorrelation correction; p_value_adjusted: p_value times the number of lags searched"
        ),
        "related": related,
        "undefined": undefined,
        "arrays": arrays,
        "array_rows": others,
    }


RELATED_SENSORS = registry.register(
    data.DataAnalysis(
        name="related-sensors",
        summary="Rank every sensor by its strongest lagged correlation with a target sensor, with significance.",
        body=run_related_sensors,
        params=(*data.DATA_PARAMS, TARGET, CANDIDATES, MAX_LAG_MINUTES, MIN_OVERLAP),
        check=_check_params,
    )
)
