"""The real server (workload.clock=real): a request path behind a batcher thread and a pipelined
worker, driven by LoadGen on the wall clock.

Start-up warms what a run can meet before LoadGen starts (`warm`): the population's requests
served in batches of every size 1..max_batch until whole rounds pass with no first-use work
(graph captures, autotuning, Triton compiles), and at least `cache_requests` of them so the
cache holds a steady state; its wall time is recorded. First-use work inside the timed run is
not subtracted from anything: it fails the point (`FirstUseDuringRun`), naming the batches.

A query's identity comes from the population in issue order, so a user's requests reach the
batcher in the order LoadGen issued them; the batcher keeps one request per user in flight, so
each request is served after the user's earlier ones and sees only history from before it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from hstu_exp import first_use
from hstu_exp.serving import loadgen_sut
from hstu_exp.serving.batcher import Batcher, Pending
from hstu_exp.serving.sim import token_bucket
from hstu_exp.serving.worker import Worker, WorkerLog


WARM_INDEX = 1 << 40  # warm-up requests draw their candidates apart from the run's


class FirstUseDuringRun(RuntimeError):
    """First-use work happened inside a timed run: the warm-up missed a shape."""


@dataclass
class RunResult:
    """One LoadGen run on the real server."""
    loadgen: dict  # loadgen_sut.read_detail
    log: WorkerLog
    specs: List[tuple]  # per request index: (user, history tokens, candidates)
    wall_s: float  # from the first query's arrival to the last answer
    stopped_early: bool = False  # the SLO was surely missed; the rest answered without the model


class RealServer:
    """`population` says who each query is; `users` (UserSequences) builds its request."""

    def __init__(self, path, users, *, max_batch: int, max_wait_s: float, policy: str,
                 device, token_buckets, num_context: int):
        self.path, self.users, self.device = path, users, torch.device(device)
        self.max_batch, self.max_wait_s, self.policy = max_batch, max_wait_s, policy
        self.token_buckets, self.num_context = list(token_buckets), num_context

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def warm(self, population, *, cache_requests: int, quiet_rounds: int, max_s: float,
             progress=print) -> dict:
        """Serves the population's next requests, untimed, in batches of 1..max_batch (a
        round), until `quiet_rounds` rounds in a row met no first-use work and at least
        `cache_requests` were served, or `max_s` passed. Returns what it did."""
        t0, served, rounds, quiet, events = time.perf_counter(), 0, 0, 0, 0
        while True:
            before = first_use.events()
            for size in range(1, self.max_batch + 1):
                batch, seen = [], set()
                while len(batch) < size:
                    user, history, cands = population.next()
                    if user in seen:  # one request per user a batch: the duplicate goes later
                        continue
                    seen.add(user)
                    batch.append(self.users.request(user, history, cands, WARM_INDEX + served))
                    served += 1
                self.path.serve(batch)
                self._sync()
            rounds += 1
            new = first_use.events() - before
            events += new
            quiet = quiet + 1 if new == 0 else 0
            elapsed = time.perf_counter() - t0
            if (quiet >= quiet_rounds and served >= cache_requests) or elapsed > max_s:
                break
        progress(f"warm-up: {served} requests in {rounds} rounds of batches 1..{self.max_batch}, "
                 f"{events} first-use events, {elapsed:.1f} s")
        return {"warm_s": elapsed, "warm_requests": served, "warm_first_use": events,
                "warm_quiet": quiet >= quiet_rounds}

    def run(self, test: loadgen_sut.LoadGenTest, population, log_dir, *, sample_every: int = 0,
            give_up_after: Optional[int] = None, progress=print) -> RunResult:
        """One LoadGen run. sample_every > 0: every that many-th request's scores are kept for
        verification (log.checked). give_up_after: once that many queries were answered later
        than test.slo_ms (the percentile surely missed), the rest are answered at once without
        the model, so that an overloaded trial ends soon (LoadGen waits for every answer)."""
        batcher = Batcher(max_batch=self.max_batch, max_wait_s=self.max_wait_s,
                          policy=self.policy)
        specs: List[tuple] = []
        lock = threading.Lock()
        sut: Optional[loadgen_sut.SUT] = None

        def admit(samples) -> None:  # LoadGen's thread: who each query is, in issue order
            now = time.perf_counter()
            items = []
            with lock:
                for qid, _ in samples:
                    user, history, cands = population.next()
                    rows = self.num_context + history + cands
                    items.append(Pending(qid, len(specs), user,
                                         token_bucket(rows, self.token_buckets), now))
                    specs.append((user, history, cands))
            batcher.put(items)

        def request(p: Pending):
            user, history, cands = specs[p.index]
            return self.users.request(user, history, cands, p.index)

        late, stopped = [0], []

        def answer(batch, scores) -> None:
            sut.answer([p.query_id for p in batch], scores)
            if give_up_after is None or scores is None or stopped:
                return
            now = time.perf_counter()
            late[0] += sum(now - p.arrival > test.slo_ms / 1e3 for p in batch)
            if late[0] >= give_up_after:
                stopped.append(True)
                progress(f"stopped: {late[0]} queries over {test.slo_ms:g} ms, "
                         f"p{test.slo_percentile:g} surely missed; the rest answered without "
                         "the model")
                worker.stop_serving()

        sut = loadgen_sut.SUT(admit)
        worker = Worker(self.path, batcher, request=request, answer=answer,
                        device=self.device, sample=_Every(sample_every) if sample_every else ())
        self._sync()
        batcher.start()
        worker.start()

        def interrupted() -> None:
            progress("interrupted: answering LoadGen's remaining queries without the model, "
                     "so that its logs close")
            worker.stop_serving()

        try:
            result = loadgen_sut.run(test, sut, log_dir, on_interrupt=interrupted)
        finally:
            batcher.close()
            worker.join()
        if worker.error is not None:
            raise worker.error
        rows = worker.log.rows.values()
        wall = (max((r["finish_s"] for r in rows), default=0.0)
                - min((r["arrival_s"] for r in rows), default=0.0))
        served = RunResult(result, worker.log, specs, wall, stopped_early=bool(stopped))
        if worker.log.first_use:
            raise FirstUseDuringRun(
                "first-use work (a graph capture, an autotune or a Triton compile) during the "
                "timed run, in " + "; ".join(worker.log.first_use[:3]) +
                (" ..." if len(worker.log.first_use) > 3 else "") +
                ": the start-up warm-up missed a shape (raise workload.warm_rounds)")
        return served


class _Every:
    """Membership of every k-th request index."""

    def __init__(self, k: int):
        self.k = k

    def __contains__(self, index: int) -> bool:
        return index % self.k == 0
