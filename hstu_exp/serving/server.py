"""The real server (workload.clock=real): a request path behind a batcher thread and a pipelined
worker, driven by LoadGen on the wall clock.

Start-up warms what a run can meet before LoadGen starts (`warm`): with graphs, every graph
bucket a batch can fall in is captured from a synthetic full batch (an enumeration, not luck);
then the population's requests are served in batches of every size 1..max_batch until whole
rounds pass with no first-use work (graph captures, autotuning, Triton compiles), and at least
`cache_requests` of them so the cache holds a steady state; both wall times are recorded.
First-use work inside the timed run is not subtracted from anything: it fails the point
(`FirstUseDuringRun`), naming the batches.

A query's identity comes from the population in issue order, so a user's requests reach the
batcher in the order LoadGen issued them; the batcher keeps one request per user in flight, so
each request is served after the user's earlier ones and sees only history from before it.

Replicas (workload.replicas=N): N request paths (each its own weights, KV pool and graphs on its
own device), each behind its own batcher and worker, all behind the one LoadGen SUT; the
`Router` sends each query to the replica holding its user's cache (`serving.routing`). The
router moves a user only when none of its queries is in flight, so a user's queries are still
served one at a time in issue order. The replicas are threads of this one process: their
Python host work per batch shares the GIL, which may cap the scaling on N GPUs (one process
per GPU would not share it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from hstu_exp import first_use
from hstu_exp.serving import interpreter, loadgen_sut
from hstu_exp.serving.batcher import Batcher, Pending
from hstu_exp.serving.routing import Router
from hstu_exp.serving.sim import token_bucket
from hstu_exp.serving.worker import Worker, WorkerLog, on_device

WARM_INDEX = 1 << 40  # warm-up requests draw their candidates apart from the run's
WARM_DRAWS = 64  # warm-up draws at most this many requests per request of a batch
ADMIT_CHUNK = 64  # queries issued at once (Offline) reach the batchers this many at a time


class FirstUseDuringRun(RuntimeError):
    """First-use work happened inside a timed run: the warm-up missed a shape."""


@dataclass
class RunResult:
    """One LoadGen run on the real server."""

    loadgen: dict  # loadgen_sut.read_detail
    log: WorkerLog  # every replica's, merged: rows and batches carry their "replica"
    specs: List[tuple]  # per request index: (user, history tokens, candidates)
    wall_s: float  # from the first query's arrival to the last answer
    stopped_early: bool = False  # the SLO was surely missed; the rest answered without the model
    routing: Optional[dict] = None  # Router.stats() of the timed run (warm-up not counted)
    gc: Optional[dict] = None  # the collector during the timed run (interpreter.summary)
    collections: List[tuple] = field(default_factory=list)  # (generation, ms, start s from t0)


class RealServer:
    """`population` says who each query is; `users` (UserSequences) builds its request.
    `path` and `device`: one request path and its device, or lists of them (one per replica),
    behind a Router of `routing` (policy), `max_imbalance` and `slack_rows`. `shapes`: per
    path, the eager shapes its warm-up tunes (`RequestPath.tune_shapes`), or None."""

    def __init__(
        self,
        path,
        users,
        *,
        max_batch: int,
        max_wait_s: float,
        policy: str,
        device,
        token_buckets,
        num_context: int,
        routing: str = "least_loaded",
        max_imbalance: float = 0.5,
        slack_rows: int = 0,
        shapes=None,
    ):
        self.paths = list(path) if isinstance(path, (list, tuple)) else [path]
        self.shapes = list(shapes) if shapes is not None else [None] * len(self.paths)
        devices = device if isinstance(device, (list, tuple)) else [device] * len(self.paths)
        self.devices = [torch.device(d) for d in devices]
        if len(self.devices) != len(self.paths):
            raise ValueError(f"{len(self.paths)} request paths, {len(self.devices)} devices")
        self.path, self.device, self.users = self.paths[0], self.devices[0], users
        self.max_batch, self.max_wait_s, self.policy = max_batch, max_wait_s, policy
        self.token_buckets, self.num_context = list(token_buckets), num_context
        self._router_args = dict(policy=routing, max_imbalance=max_imbalance, slack_rows=slack_rows)
        self.router = Router(len(self.paths), **self._router_args)

    def reset(self) -> None:
        """Every replica's cache emptied, every user unplaced (a new trial)."""
        for path in self.paths:
            path.reset()
        self.router = Router(len(self.paths), **self._router_args)

    def _sync(self) -> None:
        for d in self.devices:
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    @torch.no_grad()
    def warm(
        self,
        population,
        *,
        cache_requests: int,
        quiet_rounds: int,
        max_s: float,
        progress=print,
        keep: Optional[list] = None,
    ) -> dict:
        """Serves the population's next requests, untimed, in batches of 1..max_batch (a
        round), until `quiet_rounds` rounds in a row met no first-use work and at least
        `cache_requests` were served, or `max_s` passed. First, with graphs, every graph bucket
        a batch can fall in is captured (`RequestPath.capture_graphs`), and eager, every shape
        the kernels tune on is run (`RequestPath.tune_shapes`): random rounds may miss a rare
        bucket, the enumeration does not. `keep`: the last round's (request, float32 scores)
        are appended to it (a warm cache's hits among them: what an accuracy gate can judge
        before a timed run). Returns what it did."""
        t0, captured, tuned = time.perf_counter(), 0, 0
        for path, device, shapes in zip(self.paths, self.devices, self.shapes):
            with on_device(device):
                captured += path.capture_graphs(progress)
                if shapes is not None:
                    tuned += path.tune_shapes(shapes, progress)
        self._sync()
        graphs_s = time.perf_counter() - t0
        t0, served, rounds, quiet, events = time.perf_counter(), 0, 0, 0, 0
        while True:
            before = first_use.events()
            answered = []  # this round's (request, scores) while `keep` asks for them
            for size in range(1, self.max_batch + 1):
                for replica, path in enumerate(self.paths):
                    batch, seen, drawn = [], set(), 0
                    # a replica few users are placed on takes a smaller batch, not forever
                    while len(batch) < size and drawn < WARM_DRAWS * size:
                        drawn += 1
                        user, history, cands = population.next()
                        if user in seen:  # one request per user a batch: skipped
                            continue
                        # the user is placed where the run will find its cache; a request of
                        # another replica's user is skipped (its history still grows)
                        rows = self.num_context + history + cands
                        home = self.router.route(user, rows)
                        self.router.done(user, home, rows)
                        if home != replica:
                            continue
                        seen.add(user)
                        batch.append(self.users.request(user, history, cands, WARM_INDEX + served))
                        served += 1
                    if batch:
                        with on_device(self.devices[replica]):
                            served_batch = path.serve(batch)
                        if keep is not None:
                            answered += zip(batch, served_batch.by_request(served_batch.logits))
                self._sync()
            rounds += 1
            new = first_use.events() - before
            events += new
            quiet = quiet + 1 if new == 0 else 0
            elapsed = time.perf_counter() - t0
            if (quiet >= quiet_rounds and served >= cache_requests) or elapsed > max_s:
                if keep is not None:
                    keep += answered
                break
        progress(
            f"warm-up: {captured} graph buckets captured"
            + (f", {tuned} eager shapes tuned" if tuned else "")
            + f" in {graphs_s:.1f} s, then "
            f"{served} requests in {rounds} rounds of batches 1..{self.max_batch}"
            f"{f' on each of {len(self.paths)} replicas' if len(self.paths) > 1 else ''}, "
            f"{events} first-use events, {elapsed:.1f} s"
        )
        return {
            "warm_s": graphs_s + elapsed,
            "warm_graphs": captured,
            "warm_shapes": tuned,
            "warm_graphs_s": graphs_s,
            "warm_rounds_s": elapsed,
            "warm_requests": served,
            "warm_first_use": events,
            "warm_quiet": quiet >= quiet_rounds,
        }

    def run(
        self,
        test: loadgen_sut.LoadGenTest,
        population,
        log_dir,
        *,
        sample_every: int = 0,
        give_up_after: Optional[int] = None,
        freeze_gc: bool = True,
        switch_ms: float = 5.0,
        progress=print,
    ) -> RunResult:
        """One LoadGen run. sample_every > 0: every that many-th request's scores are kept for
        verification (log.checked). give_up_after: once that many queries were answered later
        than test.slo_ms (the percentile surely missed), the rest are answered at once without
        the model, so that an overloaded trial ends soon (LoadGen waits for every answer).
        freeze_gc: what exists before the run is frozen out of the collector's passes
        (`interpreter.timed_collections`); its collections are timed either way. switch_ms:
        the interpreter's thread switch interval during the run."""
        replicas = range(len(self.paths))
        batchers = [
            Batcher(max_batch=self.max_batch, max_wait_s=self.max_wait_s, policy=self.policy)
            for _ in replicas
        ]
        router, routed_before = self.router, self.router.stats()
        specs: List[tuple] = []  # per request index: (user, history, candidates)
        placed: List[int] = []  # per request index: its replica
        lock = threading.Lock()
        sut: Optional[loadgen_sut.SUT] = None

        built: dict = {}  # request index -> its Request, until the worker takes it

        def admit(samples) -> None:  # LoadGen's thread: who each query is, in issue order
            now = time.perf_counter()
            issued: List[tuple] = []  # (replica, Pending) in issue order
            with lock:
                for qid, _ in samples:
                    user, history, cands = population.next()
                    rows = self.num_context + history + cands
                    replica = router.route(user, rows)
                    bucket = token_bucket(rows, self.token_buckets)
                    issued.append((replica, Pending(qid, len(specs), user, bucket, now)))
                    specs.append((user, history, cands))
                    placed.append(replica)
            # Each request is built as it arrives, on this thread: the worker's host work a
            # batch (its critical path) only takes them. In chunks, so that a worker need not
            # wait for all of an Offline run's queries to be built before its first batch.
            for c in range(0, len(issued), ADMIT_CHUNK):
                chunk = issued[c : c + ADMIT_CHUNK]
                for _, p in chunk:
                    built[p.index] = self.users.request(*specs[p.index], p.index)
                for replica in replicas:
                    mine = [p for r, p in chunk if r == replica]
                    if mine:
                        batchers[replica].put(mine)

        def request(p: Pending):
            return built.pop(p.index)

        late, stopped = [0], []

        def answer(replica: int, batch, scores) -> None:
            sut.answer([p.query_id for p in batch], scores)
            for p in batch:
                user, history, cands = specs[p.index]
                router.done(user, replica, self.num_context + history + cands)
            if give_up_after is None or scores is None:
                return
            with lock:
                if stopped:
                    return
                now = time.perf_counter()
                late[0] += sum(now - p.arrival > test.slo_ms / 1e3 for p in batch)
                if late[0] < give_up_after:
                    return
                stopped.append(True)
            progress(
                f"stopped: {late[0]} queries over {test.slo_ms:g} ms, "
                f"p{test.slo_percentile:g} surely missed; the rest answered without "
                "the model"
            )
            for w in workers:
                w.stop_serving()

        sut = loadgen_sut.SUT(admit)
        workers = [
            Worker(
                self.paths[r],
                batchers[r],
                request=request,
                answer=lambda batch, scores, r=r: answer(r, batch, scores),
                device=self.devices[r],
                sample=_Every(sample_every) if sample_every else (),
            )
            for r in replicas
        ]

        def interrupted() -> None:
            progress(
                "interrupted: answering LoadGen's remaining queries without the model, "
                "so that its logs close"
            )
            for w in workers:
                w.stop_serving()

        self._sync()
        with interpreter.timed_collections(freeze_gc) as pauses, interpreter.switch_interval(switch_ms):
            t0 = time.perf_counter()
            for batcher, worker in zip(batchers, workers):
                batcher.start()
                worker.start(t0)
            try:
                result = loadgen_sut.run(test, sut, log_dir, on_interrupt=interrupted)
            finally:
                for batcher, worker in zip(batchers, workers):
                    batcher.close()
                    worker.join()
        for worker in workers:
            if worker.error is not None:
                raise worker.error
        log = _merged([w.log for w in workers])
        routing = _minus(router.stats(), routed_before)
        served = self._served(result, log, specs, stopped, routing)
        served.gc = interpreter.summary(pauses)
        served.collections = [(gen, ms, begin - t0) for gen, ms, begin in pauses]
        if log.first_use:
            raise FirstUseDuringRun(
                "first-use work (a graph capture, an autotune or a Triton compile) during the "
                "timed run, in "
                + "; ".join(log.first_use[:3])
                + (" ..." if len(log.first_use) > 3 else "")
                + ": the start-up warm-up missed a shape (every graph bucket is captured at "
                "start-up, so an eager-side autotune or compile: raise workload.warm_rounds)"
            )
        return served

    @staticmethod
    def _served(result, log: WorkerLog, specs, stopped, routing) -> "RunResult":
        rows = log.rows.values()
        wall = max((r["finish_s"] for r in rows), default=0.0) - min(
            (r["arrival_s"] for r in rows), default=0.0
        )
        return RunResult(result, log, specs, wall, stopped_early=bool(stopped), routing=routing)


def _merged(logs: List[WorkerLog]) -> WorkerLog:
    """The replicas' logs as one: rows (keyed by request index) and batches say their replica;
    first-use notes name it when there are several."""
    out = WorkerLog()
    for replica, log in enumerate(logs):
        for index, row in log.rows.items():
            out.rows[index] = {**row, "replica": replica}
        out.batches += [{**b, "replica": replica} for b in log.batches]
        out.order += [(kind, replica, n) for kind, n in log.order]
        out.first_use += [
            note if len(logs) == 1 else f"replica {replica} {note}" for note in log.first_use
        ]
        out.checked += log.checked
    return out


def _minus(after: dict, before: dict) -> dict:
    """Router counts of the timed run: the per-replica query and move counts less the
    warm-up's (replica_users: where users are pinned at the end)."""
    out = dict(after)
    for key in ("replica_queries", "replica_moved_in", "replica_moved_out"):
        out[key] = [a - b for a, b in zip(after[key], before[key])]
    out["moves"] = after["moves"] - before["moves"]
    return out


class _Every:
    """Membership of every k-th request index."""

    def __init__(self, k: int):
        self.k = k

    def __contains__(self, index: int) -> bool:
        return index % self.k == 0
