"""Time spent on one-off work that a shape or bucket costs the first time it is met: autotuning
an attention shape, capturing a CUDA graph, compiling a Triton kernel for a new specialization.
A long-running server pays it once at start-up; a measurement that meets new shapes mid-run
(workload=serve) takes it off its clock with `seconds()` and records it instead. Nested
first-use work (a tune inside a capture's warm-up, a compile inside a tune) counts once."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

# Process-wide: Triton's compile hooks are process-wide, and first-use work starts wherever a
# kernel meets a new shape (policy.one_off wraps a tune, graphs wrap a capture); a workload reads
# the running total before and after the work it times.
_total = 0.0
_events = 0  # outermost first-use blocks and compiles so far (the real server fails on one)
_depth = 0
_compile_start = None  # perf_counter() of the Triton compile under way outside any block


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def first_use():
    """Times the block (synchronized on CUDA, so queued work before it is not counted)."""
    global _total, _depth, _events
    outer = _depth == 0
    _events += outer
    _depth += 1
    if outer:
        _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _depth -= 1
        if outer:
            _sync()
            _total += time.perf_counter() - start


def seconds() -> float:
    """First-use time spent in this process so far."""
    return _total


def events() -> int:
    """First-use events in this process so far (a nested one counts with its outer block)."""
    return _events


def _compile_started(*args, **kwargs):
    global _compile_start
    _compile_start = time.perf_counter() if _depth == 0 else None
    return None  # a true value would tell Triton to skip the compile


def _compile_done(*args, **kwargs):
    global _total, _compile_start, _events
    if _compile_start is not None and _depth == 0:
        _total += time.perf_counter() - _compile_start
        _events += 1
    _compile_start = None
    return None


def count_triton_compiles() -> bool:
    """Count Triton's JIT compiles (a kernel met with a new specialization compiles on the host,
    BENCHMARKS "first-use work") as first-use work, through Triton's compile hooks. Eager
    serving meets new specializations mid-run: without this, a trial's first batches carry
    compile time. False where this Triton has no such hooks or they are taken by someone
    else."""
    try:
        from triton import knobs

        runtime = knobs.runtime
        if not hasattr(runtime, "jit_post_compile_hook"):
            return False
    except (ImportError, AttributeError):
        return False
    if runtime.jit_cache_hook in (None, _compile_started) and runtime.jit_post_compile_hook in (
        None,
        _compile_done,
    ):
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = _compile_started, _compile_done
        return True
    return False
