"""The worker of the real server: runs batches through the request path, pipelined.

On CUDA the request path only enqueues device work, so the worker launches batch i+1 (its host
work: requests, lookup, page planning, embedding inputs, metadata copies, the launches) before
it waits for batch i's results, and the host work of i+1 overlaps the device work of i. It waits
on a CUDA event per batch, never on the whole device; the scores are copied to pinned host
memory on the stream right after the batch (before the next one may overwrite a graph's output
buffer). On a CPU the same loop runs; the request path then computes as it goes and nothing
overlaps.

Each answered batch goes straight to `answer(batch, scores)` (the LoadGen SUT completes its
queries there) and its users back to the batcher. First-use work inside the timed run (a graph
capture, an autotune, a Triton compile: `hstu_exp.first_use`) is noted per batch; the server
fails the point on it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from hstu_exp import first_use
from hstu_exp.serving.batcher import Batcher, Pending
from hstu_exp.serving.path import HOST_PHASES

POLL_S = 2e-4  # how often the worker looks for a next batch while the device computes
# A batch's host work in order: its requests built (the population's candidates), the request
# path's phases, then the scores' copy to pinned memory and the batch's event.
WORKER_PHASES = ("request", *HOST_PHASES, "scores")


@dataclass
class InFlight:
    number: int  # batch number
    batch: List[Pending]
    requests: list
    served: object  # path.Served
    scores: torch.Tensor  # [sum of candidates, tasks] float32 on the host (pinned on CUDA)
    start: float  # clock() when its host work began
    launched: float  # clock() when its host work ended
    done: Optional[object]  # CUDA event after its scores' copy, None on a CPU
    first_use: int  # first-use events during its host work
    host_phases: dict  # its host work by phase, ms (WORKER_PHASES)

    def ready(self) -> bool:
        return self.done is None or self.done.query()


@dataclass
class WorkerLog:
    """What the worker did, for the record and the tests."""

    order: List[tuple] = field(default_factory=list)  # ("launch" | "wait", batch number)
    rows: dict = field(default_factory=dict)  # request index -> per-request facts
    batches: List[dict] = field(default_factory=list)  # per batch: host_ms, device span
    first_use: List[str] = field(default_factory=list)  # what first-use work met which batch
    checked: list = field(default_factory=list)  # (request, scores) of sampled requests


class Worker:
    """`request(pending) -> Request` builds a request; `answer(batch, scores_per_request)`
    completes it; `sample`: request indices whose scores are kept for verification."""

    def __init__(
        self,
        path,
        batcher: Batcher,
        *,
        request: Callable,
        answer: Callable,
        device,
        sample=(),
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.path, self.batcher, self.request, self.answer = path, batcher, request, answer
        self.device, self.sample, self.clock = torch.device(device), sample, clock
        self.cuda = self.device.type == "cuda"
        self.log = WorkerLog()
        self.error: Optional[BaseException] = None
        self._drain = False  # stop_serving(): answer without the model
        self._open: dict = {}  # batch number -> batch taken and not yet answered
        self._origin = None  # CUDA event all device times are measured from
        self._t0 = 0.0
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def start(self, t0: Optional[float] = None) -> "Worker":
        """t0: the clock() reading its times count from (replicas share one)."""
        self._t0 = self.clock() if t0 is None else t0
        if self.cuda:
            with on_device(self.device):
                self._origin = torch.cuda.Event(enable_timing=True)
                self._origin.record()
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join()

    def stop_serving(self) -> None:
        """From now on answer every query at once, without scores (Ctrl-C: LoadGen still
        wants an answer to each query before it closes its logs)."""
        self._drain = True

    def _run(self) -> None:
        try:
            with torch.no_grad(), on_device(self.device):
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - handed to the server's thread
            self.error = exc
            # Answer everything without scores so that LoadGen's run ends; the server then
            # fails the point with this error.
            for batch in self._open.values():
                self.answer(batch, None)
                self.batcher.release(batch)
            while (batch := self.batcher.take()) is not None:
                self.answer(batch, None)
                self.batcher.release(batch)

    def _loop(self) -> None:
        inflight: Optional[InFlight] = None
        number = 0
        while True:
            # Block for a batch only when nothing is in flight; otherwise take one if ready,
            # so its host work overlaps the device work of the one in flight.
            batch = self.batcher.take(block=inflight is None)
            # While the device still runs the batch in flight, a batch that becomes ready goes
            # first (its host work overlaps); a CPU is done with it already.
            while batch is None and inflight is not None and not inflight.ready():
                batch = self.batcher.take(block=False, timeout=POLL_S)
            if batch is None and inflight is None:
                return  # closed and drained
            if self._drain and batch is not None:
                self.answer(batch, None)
                self.batcher.release(batch)
                continue
            launched = None
            if batch is not None:
                self._open[number] = batch
                launched = self._launch(batch, number)
                number += 1
            if inflight is not None:
                self._finish(inflight)
            inflight = launched

    def _launch(self, batch: List[Pending], number: int) -> InFlight:
        self.log.order.append(("launch", number))
        start = self.clock()
        uses = first_use.events()
        requests = [self.request(p) for p in batch]
        built = self.clock()
        served = self.path.serve(requests)  # on CUDA: enqueued, not waited for
        issued = self.clock()
        done = None
        if self.cuda:
            scores = torch.empty(served.logits.shape, dtype=torch.float32, pin_memory=True)
            scores.copy_(served.logits.float(), non_blocking=True)  # cast on the device
            done = torch.cuda.Event(enable_timing=True)
            done.record()
        else:
            scores = served.logits.float()
        launched = self.clock()
        phases = {
            "request": 1e3 * (built - start),
            **served.host_phases,
            "scores": 1e3 * (launched - issued),
        }
        return InFlight(
            number,
            batch,
            requests,
            served,
            scores,
            start,
            launched,
            done,
            first_use.events() - uses,
            phases,
        )

    def _finish(self, f: InFlight) -> None:
        self.log.order.append(("wait", f.number))
        begin = f.served.span[0]  # the path marks where its device work starts
        if f.done is not None:
            f.done.synchronize()  # this batch's event: no device-wide synchronize
            span = (self._origin.elapsed_time(begin), self._origin.elapsed_time(f.done))
        else:  # a CPU computes inside the call: the compute part of the host time
            span = (1e3 * (begin - self._t0), 1e3 * (f.served.span[1] - self._t0))
        done = self.clock()
        counts = [r.candidates.numel() for r in f.requests]
        per_request = list(f.scores.split(counts))
        self.answer(f.batch, per_request)
        self.batcher.release(f.batch)
        del self._open[f.number]
        s = f.served
        tiers, computed = s.tiers, s.computed
        onloaded, offloaded = s.onloaded_bytes, s.offloaded_bytes
        for j, p in enumerate(f.batch):
            self.log.rows[p.index] = {
                "user": p.user,
                "arrival_s": p.arrival - self._t0,
                "start_s": f.start - self._t0,
                "finish_s": done - self._t0,
                "batch": f.number,
                "batch_size": len(f.batch),
                "tier": tiers[j],
                "history": f.requests[j].history,
                "candidates": counts[j],
                "cached_tokens": s.cached[j],
                "tokens_computed": computed[j],
                "onloaded_bytes": onloaded[j],
                "offloaded_bytes": offloaded[j],
            }
            if p.index in self.sample:
                self.log.checked.append((f.requests[j], per_request[j].clone()))
        self.log.batches.append(
            {
                "batch": f.number,
                "size": len(f.batch),
                "start_s": f.start - self._t0,
                "launched_s": f.launched - self._t0,
                "finish_s": done - self._t0,
                "host_ms": 1e3 * (f.launched - f.start),
                "device_ms": span[1] - span[0],
                "span_ms": span,  # from the origin event recorded at start(): about t0
                "first_use": f.first_use,
                "host_phases": f.host_phases,
            }
        )
        if f.first_use:
            self.log.first_use.append(
                f"batch {f.number} ({len(f.batch)} requests, {f.first_use} first-use event(s))"
            )


def on_device(device):
    """Makes `device` the current CUDA device (a no-op on a CPU): graphs, streams and events
    of a replica on cuda:i must be made and used there, whatever thread runs them."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def busy_fraction(spans: List[tuple], wall_ms: float) -> Optional[float]:
    """Share of `wall_ms` covered by the union of the (start, end) device spans."""
    if wall_ms <= 0:
        return None
    covered, end = 0.0, -float("inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        covered += b - max(a, end)
        end = b
    return min(covered / wall_ms, 1.0)
