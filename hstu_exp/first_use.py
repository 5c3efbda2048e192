"""Time spent on one-off work that a shape or bucket costs the first time it is met: autotuning
an attention shape, capturing a CUDA graph. A long-running server pays it once at start-up; a
measurement that meets new shapes mid-run (workload=serve) takes it off its clock with
`seconds()` and records it instead. Nested first-use work (a tune inside a capture's warm-up)
counts once."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

_total = 0.0
_depth = 0


@contextmanager
def first_use():
    """Times the block (synchronized on CUDA, so queued work before it is not counted)."""
    global _total, _depth
    outer = _depth == 0
    _depth += 1
    if outer and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        _depth -= 1
        if outer:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            _total += time.perf_counter() - start


def seconds() -> float:
    """First-use time spent in this process so far."""
    return _total
