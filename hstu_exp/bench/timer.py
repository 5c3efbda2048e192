"""Timing that keeps every sample, and says when there are enough of them.

Warm-up, then at least `iters` runs and `min_time_s` seconds; past that, timing goes on while the
samples' CV (stdev / mean) is above `cv_max` or fewer than `min_samples` were taken, up to
`max_time_s` (docs/design.md, validity). CUDA: one pair of events per iteration (no host sync
inside the loop; read in chunks). CPU: host clock around each call.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from hstu_exp.env import ClockSampler


def cv(samples) -> float:
    """Coefficient of variation: sample stdev / mean (0 with fewer than two samples)."""
    if len(samples) < 2:
        return 0.0
    mean = statistics.fmean(samples)
    return statistics.stdev(samples) / mean if mean > 0 else 0.0


def latency_stats(samples_ms) -> dict:
    """Statistics over the raw samples (percentiles: linear interpolation between ranks)."""
    s = sorted(samples_ms)
    if len(s) > 1:
        q = statistics.quantiles(s, n=100, method="inclusive")  # q[k-1]: k-th percentile
    else:
        q = [s[0]] * 99
    return {
        "median_ms": statistics.median(s),
        "p10_ms": q[9],
        "p50_ms": q[49],
        "p90_ms": q[89],
        "p99_ms": q[98],
        "mean_ms": statistics.fmean(s),
        "min_ms": s[0],
        "max_ms": s[-1],
        "cv": cv(s),
        "iterations": len(s),
    }


@dataclass(frozen=True)
class StopRule:
    """When a timing loop may stop (`iters` and `min_time_s` always; then validity, up to
    `max_time_s` or `max_iters`)."""

    iters: int
    min_time_s: float
    max_time_s: float
    cv_max: float
    min_samples: int
    max_iters: int = 100_000

    def may_stop(self, count: int, elapsed: float) -> bool:
        """The unconditional minimum is met (checked without reading any sample)."""
        return count >= self.max_iters or (count >= self.iters and elapsed >= self.min_time_s)

    def done(self, samples, elapsed: float, count: Optional[int] = None) -> bool:
        """samples: what validity is judged on; count: iterations run (default len(samples);
        e2e judges whole passes but counts batches)."""
        count = len(samples) if count is None else count
        if not samples or not self.may_stop(count, elapsed):
            return False
        if count >= self.max_iters or elapsed >= self.max_time_s:
            return True
        return len(samples) >= self.min_samples and cv(samples) <= self.cv_max

    def problems(self, samples) -> List[str]:
        """Why samples that stopped here are not valid ([] when they are)."""
        out = []
        if len(samples) < self.min_samples:
            out.append(f"too few samples ({len(samples)} < min_samples {self.min_samples})")
        if cv(samples) > self.cv_max:
            out.append(f"CV {100 * cv(samples):.1f}% > {100 * self.cv_max:g}%")
        return out


@dataclass
class Timing:
    samples_ms: List[float]
    clocks: dict = field(default_factory=dict)  # GPU clocks sampled while timing (env.py)

    def stats(self) -> dict:
        return latency_stats(self.samples_ms)


def reset_peak_memory(device: torch.device) -> None:
    """Start of the timed region: the record's peak memory is measured from here."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def time_fn(fn: Callable[[int], object], *, device: torch.device, warmup: int, rule: StopRule) -> Timing:
    """fn(i) runs iteration i (it picks its input set from i)."""
    for i in range(warmup):
        fn(i)
    reset_peak_memory(device)
    with ClockSampler(device) as clocks:
        samples = _time_cuda(fn, rule) if device.type == "cuda" else _time_host(fn, rule)
    return Timing(samples, clocks.summary())


def _time_host(fn, rule: StopRule) -> List[float]:
    samples: List[float] = []
    start = time.perf_counter()
    while not rule.done(samples, time.perf_counter() - start):
        t0 = time.perf_counter()
        fn(len(samples))
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _time_cuda(fn, rule: StopRule, chunk: int = 64) -> List[float]:
    torch.cuda.synchronize()
    pending, samples, start = [], [], time.perf_counter()
    next_check: Optional[int] = None  # count at which the stop rule reads the samples again
    i = 0
    # Host clock only decides when to stop; the samples are the events' device time.
    while True:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn(i)
        end.record()
        pending.append((begin, end))
        i += 1
        if i % chunk == 0:  # keep the host from racing far ahead of the device
            end.synchronize()
        elapsed = time.perf_counter() - start
        if rule.may_stop(i, elapsed) and (next_check is None or i >= next_check):
            end.synchronize()  # reading the samples costs one sync per chunk, not per iteration
            samples += [b.elapsed_time(e) for b, e in pending]
            pending = []
            if rule.done(samples, time.perf_counter() - start):
                return samples
            next_check = i + chunk
