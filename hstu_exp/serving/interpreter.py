"""The Python interpreter during a timed run: its garbage collector and its thread switching.

A full collection walks every object the process holds (the model, TorchRec, Triton's compiled
kernels, the captured graphs, the population) while every thread waits for the GIL: with
hundreds of thousands of objects it pauses the worker for tens to hundreds of milliseconds, which
lands in the tail of the requests in flight. `timed_collections(freeze=True)` collects once
before the run and moves every survivor to the permanent generation (`gc.freeze`), so the run's
collections walk only what the run itself made; the objects are thawed when the run ends. Either
way every collection of the run is timed, so the record shows what the collector cost.

The server's threads (LoadGen's issue callback building requests, the batcher, the worker, the
answers) share the GIL. A thread that wants it back, the worker after a wait on the device say,
waits until the holder blocks or the switch interval passes (5 ms by default): `switch_interval`
sets a shorter one for the run.
"""

from __future__ import annotations

import gc
import sys
import time
from contextlib import contextmanager
from typing import Iterator, List, Tuple


@contextmanager
def timed_collections(freeze: bool) -> Iterator[List[Tuple[int, float, float]]]:
    """Yields the list that collects (generation, pause ms, perf_counter() at its start) of each
    collection in the block."""
    pauses: List[Tuple[int, float, float]] = []
    started: List[float] = []

    def on_collection(phase: str, info: dict) -> None:
        # Collections run under the GIL, one at a time: a start is always followed by its stop.
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            begin = started.pop()
            pauses.append((info["generation"], 1e3 * (time.perf_counter() - begin), begin))

    if freeze:
        gc.collect()
        gc.freeze()
    gc.callbacks.append(on_collection)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(on_collection)
        if freeze:
            gc.unfreeze()


def summary(pauses: List[Tuple[int, float, float]]) -> dict:
    """The record's account of the collector during a run."""
    full = [ms for gen, ms, _ in pauses if gen == 2]
    return {
        "gc_collections": len(pauses),
        "gc_full_collections": len(full),
        "gc_total_ms": sum(ms for _, ms, _ in pauses),
        "gc_max_ms": max((ms for _, ms, _ in pauses), default=0.0),
        "gc_full_max_ms": max(full, default=0.0),
    }


@contextmanager
def switch_interval(ms: float) -> Iterator[None]:
    """The interpreter's thread switch interval set to `ms` for the block, then restored."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(ms / 1e3)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
