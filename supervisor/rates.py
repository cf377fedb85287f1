"""Rate and ETA of a running phase, guarded against the values that break clients.

Clients have crashed on a negative, infinite or NaN ETA, so this module
returns None whenever the estimate is unknown: nothing done yet, no time
elapsed, or no known total.
"""

from __future__ import annotations

import math


def estimate(completed: int | None, total: int | None, elapsed_seconds: float) -> tuple[float | None, float | None]:
    """Return (units per second, seconds remaining) for a phase, each None when unknown."""
    if completed is None or completed <= 0 or elapsed_seconds <= 0:
        return None, None
    rate = completed / elapsed_seconds
    if not math.isfinite(rate) or rate <= 0:
        return None, None
    if total is None:
        return rate, None
    remaining = max(0, total - completed)
    eta = remaining / rate
    return rate, eta if math.isfinite(eta) else None


def percent(completed: int | None, total: int | None) -> float | None:
    """Return completion in percent, clamped to [0, 100], or None without a total."""
    if completed is None or not total or total <= 0:
        return None
    return min(100.0, max(0.0, 100.0 * completed / total))
