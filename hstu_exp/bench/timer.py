"""Timing that keeps every sample: warm-up, then at least `iters` runs and `min_time_s` seconds.

CUDA: one pair of events per iteration (no host sync inside the loop; read at the end).
CPU: host clock around each call.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List

import torch


@dataclass
class Timing:
    samples_ms: List[float]

    def stats(self) -> dict:
        s = sorted(self.samples_ms)
        q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
        return {"median_ms": statistics.median(s), "p10_ms": q[0], "p90_ms": q[8],
                "mean_ms": statistics.fmean(s), "min_ms": s[0], "max_ms": s[-1],
                "iterations": len(s)}


def time_fn(fn: Callable[[int], object], *, device: torch.device, warmup: int, iters: int,
            min_time_s: float, max_iters: int = 100_000) -> Timing:
    """fn(i) runs iteration i (it picks its input set from i)."""
    for i in range(warmup):
        fn(i)
    if device.type == "cuda":
        return _time_cuda(fn, iters, min_time_s, max_iters)
    samples, start = [], time.perf_counter()
    i = 0
    while i < max_iters and (i < iters or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return Timing(samples)


def _time_cuda(fn, iters, min_time_s, max_iters) -> Timing:
    torch.cuda.synchronize()
    pairs, start, i = [], time.perf_counter(), 0
    # Host clock only decides when to stop; the samples are the events' device time.
    while i < max_iters and (i < iters or time.perf_counter() - start < min_time_s):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn(i)
        end.record()
        pairs.append((begin, end))
        i += 1
        if i % 64 == 0:  # keep the host from racing far ahead of the device
            end.synchronize()
    torch.cuda.synchronize()
    return Timing([b.elapsed_time(e) for b, e in pairs])
