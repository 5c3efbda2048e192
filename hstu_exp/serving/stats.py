"""Latency statistics of a serve run: percentiles, the SLO's sure-miss count, and who owns the
tail. Pure Python: the simulator and the real server share them."""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence


def percentile(sorted_values, p: float) -> float:
    """Linear interpolation between ranks (statistics.quantiles' inclusive method)."""
    if not sorted_values:
        return math.nan
    h = (len(sorted_values) - 1) * p / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (h - lo)


def violations_to_miss(counted: int, p: float) -> int:
    """Counted requests over the SLO that make the interpolated p-th percentile miss it for
    sure, whatever the others' latencies: the sorted value at floor((N-1) p / 100) is then over."""
    return counted - math.floor((counted - 1) * p / 100)


def user_shares(users: Sequence, latencies: Sequence[float]) -> dict:
    """The busiest user's share of the requests, and its share of the slowest 1 % (at least one
    request): a population where one user owns the tail measures that user's own queue, not the
    server."""
    if not users:
        return {"top_user_request_share": None, "top_user_tail_share": None}
    top, count = Counter(users).most_common(1)[0]
    order = sorted(range(len(users)), key=lambda i: -latencies[i])
    tail = order[: max(1, len(users) // 100)]
    return {
        "top_user_request_share": count / len(users),
        "top_user_tail_share": sum(users[i] == top for i in tail) / len(tail),
    }


def relative_gap(predicted: Optional[float], measured: Optional[float]) -> Optional[float]:
    """(predicted - measured) / measured, or None where either is missing."""
    if predicted is None or measured is None or not measured or math.isnan(predicted):
        return None
    return (predicted - measured) / measured
