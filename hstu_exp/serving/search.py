"""The max-QPS search of both clocks: find a rate that passes and one that fails, then bisect."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

MAX_BRACKET_TRIALS = 12


def max_rate(
    passes: Callable[[float], bool],
    start: float,
    *,
    lowest: float,
    steps: int,
    digits: Optional[int] = None,
) -> Tuple[Optional[float], Optional[float]]:
    """(highest passing rate, lowest failing rate), either None where none was found. From
    `start` the rate doubles while it passes and halves while it fails, not below `lowest`, until
    a passing and a failing rate bracket the answer (at most MAX_BRACKET_TRIALS trials); then
    `steps` bisections, the midpoint rounded to `digits` (stopping once it repeats an end)."""
    lo = hi = None
    rate = start
    for _ in range(MAX_BRACKET_TRIALS):
        if passes(rate):
            lo = rate
            if hi is not None:
                break
            rate *= 2
        else:
            hi = rate
            if lo is not None or rate / 2 < lowest:
                break
            rate /= 2
    if lo is not None and hi is not None:
        for _ in range(steps):
            mid = (lo + hi) / 2 if digits is None else round((lo + hi) / 2, digits)
            if mid in (lo, hi):
                break
            lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    return lo, hi
