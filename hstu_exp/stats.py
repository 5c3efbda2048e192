"""Confidence intervals for latencies and their ratios (numpy only).

A speedup is stat(a) / stat(b) of two independent sets of timing samples. Its interval is the
percentile bootstrap: each set is resampled with replacement on its own (the two were timed
separately, so nothing pairs sample i of one with sample i of the other), the ratio is taken for
every resample, and the interval is the central `level` share of those ratios.

What is resampled is the unit that repeats the same work. Block and attention: every timed
iteration repeats one call on rotated inputs, so the samples are resampled one by one (they are
consecutive and drift together with the clocks, so the interval is a within-run interval: it
says nothing about another run, which `workload.repeats` measures). e2e: a sample is one batch
of a pass whose batches differ in size by design, so the unit is the pass: its total
(`pass_totals`), resampled pass by pass -- a block bootstrap whose blocks are the passes.
"""

from __future__ import annotations

import math

import numpy as np

# Resamples are drawn in chunks of about this many values, so that long sample sets (thousands
# of iterations on a GPU) bound the memory at a few tens of MB.
_CHUNK_VALUES = 2_000_000


def _resampled_stat(x: np.ndarray, n: int, stat, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(n)
    rows = max(1, _CHUNK_VALUES // len(x))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        idx = rng.integers(0, len(x), size=(stop - start, len(x)))
        out[start:stop] = stat(x[idx], axis=1)
    return out


def bootstrap_ratio(
    a_samples, b_samples, stat=np.median, n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(stat(a) / stat(b), low, high): the ratio and its percentile-bootstrap interval.
    `stat` takes (array, axis=) as numpy's reductions do. NaNs when either set is empty."""
    a = np.asarray(a_samples, dtype=float).ravel()
    b = np.asarray(b_samples, dtype=float).ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not (0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level}")
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan"), float("nan")
    ratio = float(stat(a) / stat(b))
    rng = np.random.default_rng(seed)
    ratios = _resampled_stat(a, n, stat, rng) / _resampled_stat(b, n, stat, rng)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return ratio, float(lo), float(hi)


def bootstrap_stat(
    samples, stat=np.median, n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(stat(x), low, high): one set's statistic and its percentile-bootstrap interval."""
    x = np.asarray(samples, dtype=float).ravel()
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(_resampled_stat(x, n, stat, rng), [tail, 100 - tail])
    return float(stat(x)), float(lo), float(hi)


def intervals_overlap(intervals) -> bool:
    """Whether every interval (low, high) shares a point with every other: repeats that agree
    within their own noise."""
    intervals = [(lo, hi) for lo, hi in intervals if np.isfinite(lo) and np.isfinite(hi)]
    return not intervals or max(lo for lo, _ in intervals) <= min(hi for _, hi in intervals)


def pass_totals(samples, per_pass: int) -> list:
    """The total of every pass of `per_pass` consecutive samples (e2e: a pass over the stream's
    batches); [] when the samples are not whole passes."""
    x = np.asarray(samples, dtype=float).ravel()
    if per_pass <= 0 or len(x) == 0 or len(x) % per_pass:
        return []
    return x.reshape(-1, per_pass).sum(axis=1).tolist()


def early_stopping_queries(percentile: float, confidence: float = 0.99) -> int:
    """Fewest queries with which MLPerf LoadGen's early stopping can pass at `percentile` (%),
    even with every query within the latency bound: fewer cannot show with `confidence` that
    the percentile holds (n with (percentile/100)^n <= 1 - confidence)."""
    return math.ceil(math.log(1 - confidence) / math.log(percentile / 100))
