#!/usr/bin/env python3
"""Host work a batch of the real server (workload.clock=real) on this machine's CPU: the real
RealServer (batcher thread, worker, LoadGen SUT, population, paged cache) driven by a real MLPerf
LoadGen Offline run (every query at once: the queue stays deep and every batch full, as at
saturation). The model is `model=tiny` (its compute is fast on a CPU) with the serve_slo request
shapes: 256 candidates, 16 items a return, max_batch 8, 1024 users, a paged pool holding every
user. On a CPU the request path computes inside the worker's call; the compute's span (the path's
own marks) is subtracted, the rest is host work.

    scripts/serve_host_bench.py [--queries 3000] [--max-history 1024] [--profile] [--gc plain]

Prints per batch (means over the run): the worker's host_ms less the compute, the whole process's
CPU time (every thread: batcher, LoadGen's issue callback, answers, per-query rows) less the
compute, the compute, and the worker's host work by phase (mean, median; launch holds the
compute on a CPU). --profile prints the worker thread's top functions (cProfile).
A micro-benchmark of host code on a CPU, not a GPU measurement: numbers from it are marked CPU.
"""

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import threading
import time
from pathlib import Path

import _venv  # noqa: F401,E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from hstu_exp.builders import model_dtype, shared_server  # noqa: E402
from hstu_exp.cli import CONF_DIR  # noqa: E402
from hstu_exp.serving import worker as worker_mod  # noqa: E402
from hstu_exp.serving.loadgen_sut import LoadGenTest  # noqa: E402
from hstu_exp.serving.population import UserSequences, population_for  # noqa: E402
from hstu_exp.serving.server import RealServer  # noqa: E402
from hstu_exp.serving.worker import WORKER_PHASES  # noqa: E402


def config(max_history: int, num_users: int):
    overrides = [
        "experiment=serve_slo",
        "model=tiny",
        f"model.max_history={max_history}",
        "model.max_candidates=256",
        "device=cpu",
        "cache=paged",
        f"cache.num_pages={num_users * (max_history // 32 + 2)}",
        "graph=none",
        "kernel=reference",
        "workload.policy=fifo",
        f"workload.num_users={num_users}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def timed_sections(server, path) -> dict:
    """Wall time of the host functions a batch meets, summed over the run (wrapped here, the
    code itself is untouched): name -> [calls, seconds]."""
    from hstu_exp.serving import batcher as batcher_mod
    from hstu_exp.serving import path as path_mod

    out: dict = {}

    def wrap(owner, attr, name):
        inner = getattr(owner, attr, None)
        if inner is None:  # another version of the code
            return
        out[name] = [0, 0.0]

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                out[name][0] += 1
                out[name][1] += time.perf_counter() - t

        setattr(owner, attr, timed)

    wrap(server.users, "request", "users.request")
    wrap(path, "_plan_pages", "plan (lookup, pages)")
    wrap(path.model.embeddings, "tokens", "tokens")
    wrap(path_mod, "make_batch", "make_batch")
    wrap(path_mod, "upload_step", "upload_step")
    wrap(path_mod, "forward_rows", "forward_rows (compute)")
    wrap(path.manager, "commit", "commit")
    wrap(worker_mod.Worker, "_finish", "worker._finish")
    wrap(batcher_mod.Batcher, "take", "batcher.take")
    wrap(batcher_mod.Batcher, "release", "batcher.release")
    wrap(batcher_mod.Batcher, "_ready", "batcher._ready (batcher thread)")
    wrap(batcher_mod.Batcher, "_pick", "batcher._pick (batcher thread)")
    wrap(batcher_mod, "pick_batch", "pick_batch (batcher thread)")
    return out


def batcher_cost(depth: int, users: int, batches: int = 300) -> float:
    """CPU ms (every thread) a batch of the batcher alone, with `depth` queries waiting from
    `users` users (a saturated server's queue): take, release, and 8 new arrivals a batch."""
    from hstu_exp.serving.batcher import Batcher, Pending

    rng = np.random.default_rng(0)
    who = rng.integers(users, size=depth + 8 * batches + 8).tolist()
    now = time.perf_counter()
    batcher = Batcher(max_batch=8, max_wait_s=0.0, policy="fifo").start()
    batcher.put([Pending(i, i, who[i], 0, now) for i in range(depth)])
    k = depth
    try:
        batcher.release(batcher.take())  # the batcher's first batch before timing
        cpu0 = time.process_time()
        for _ in range(batches):
            batch = batcher.take()
            batcher.put([Pending(i, i, who[i], 0, now) for i in range(k, k + 8)])
            k += 8
            batcher.release(batch)
        return 1e3 * (time.process_time() - cpu0) / batches
    finally:  # close() drains: someone must take what is left

        def drain():
            while (batch := batcher.take()) is not None:
                batcher.release(batch)

        drainer = threading.Thread(target=drain)
        drainer.start()
        batcher.close()
        drainer.join()


def thread_cpu_ms() -> dict:
    """{thread id: (name, CPU ms so far)} of every thread of this process (Linux /proc): which
    thread's work the process time holds (LoadGen's own threads are native, not Python)."""
    tick = 1e3 / os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) * tick)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--max-history", type=int, default=1024)
    parser.add_argument("--users", type=int, default=1024)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--batcher-only", action="store_true")
    parser.add_argument(
        "--gc",
        choices=["freeze", "plain"],
        default="freeze",
        help="the collector during the run: frozen as the server does (workload.gc_freeze) or not",
    )
    args = parser.parse_args()
    print("| batcher alone: queries waiting | CPU ms a batch |")
    print("|---|---|")
    for depth in (64, 1000, 4000, 10000):
        print(f"| {depth} | {batcher_cost(depth, args.users):.3f} |")
    if args.batcher_only:
        return
    torch.set_num_threads(1)
    cfg = config(args.max_history, args.users)
    m, w = cfg.model, cfg.workload
    path = shared_server(
        cfg.model,
        cfg.cache,
        cfg.graph,
        cfg.kernel,
        cached=True,
        graphed=False,
        device="cpu",
        dtype=model_dtype(m),
        seed=0,
        progress=lambda s: None,
    )
    server = RealServer(
        path,
        UserSequences(m, 0),
        max_batch=w.max_batch,
        max_wait_s=w.max_wait_ms / 1e3,
        policy=w.policy,
        device="cpu",
        token_buckets=cfg.graph.token_buckets,
        num_context=m.num_context,
    )
    population = population_for(cfg, 1000.0, 0)
    # every user's first request (a full recompute) before the timed run: the run then hits
    server.warm(population, cache_requests=args.users * 2, quiet_rounds=1, max_s=600, progress=print)
    test = LoadGenTest(
        scenario="offline",
        target_qps=args.queries,  # offline: the expected rate sizes the query (1 s of it)
        slo_ms=w.slo_ms,
        slo_percentile=w.slo_percentile,
        min_duration_s=0.0,
        min_query_count=args.queries,
        seed=0,
    )
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:  # profile the worker thread only
        loop = worker_mod.Worker._loop

        def profiled(self):
            profiler.enable()
            try:
                loop(self)
            finally:
                profiler.disable()

        worker_mod.Worker._loop = profiled
    sections = timed_sections(server, path)
    with tempfile.TemporaryDirectory() as tmp:
        names, seen, running = {}, {}, threading.Event()

        def note_names():  # Python's names of the threads, and their CPU while they live
            while not running.wait(0.5):  # a thread that ends loses at most its last 0.5 s
                names.update({t.native_id: t.name for t in threading.enumerate()})
                seen.update(thread_cpu_ms())

        watcher = threading.Thread(target=note_names, daemon=True)
        watcher.start()
        cpu0, threads0 = time.process_time(), thread_cpu_ms()
        served = server.run(
            test, population, Path(tmp), sample_every=0, freeze_gc=args.gc == "freeze", progress=print
        )
        process_ms = 1e3 * (time.process_time() - cpu0)
        running.set()
        watcher.join()
        by_thread = {**seen, **thread_cpu_ms()}  # threads that ended: their last reading
    batches = served.log.batches
    compute = [b["device_ms"] for b in batches]
    host = [b["host_ms"] - b["device_ms"] for b in batches]
    n = len(batches)
    # every thread's CPU time in the run (LoadGen's included), less the compute, a batch
    process = (process_ms - sum(compute)) / n
    print(
        f"{len(served.log.rows)} queries, {n} batches, mean batch "
        f"{statistics.mean(b['size'] for b in batches):.2f} (CPU, model=tiny, history <= "
        f"{args.max_history})"
    )
    print("| per batch, ms (CPU) | mean | median |")
    print("|---|---|---|")
    for name, values in [
        ("worker launch host work (host_ms less compute)", host),
        ("compute (tiny model, CPU)", compute),
    ]:
        print(f"| {name} | {statistics.mean(values):.3f} | {statistics.median(values):.3f} |")
    print(f"| whole process CPU less compute (every thread) | {process:.3f} | |")
    for phase in WORKER_PHASES:  # the worker's host work by phase (launch holds the compute)
        values = [b["host_phases"][phase] for b in batches]
        print(f"| phase {phase} | {statistics.mean(values):.3f} | {statistics.median(values):.3f} |")
    print(f"worker launch host work, the slowest batch: {max(host):.3f} ms")
    print("| thread (Linux name) | CPU ms a batch |\n|---|---|")
    spent = {t: by_thread[t][1] - threads0.get(t, ("", 0.0))[1] for t in by_thread}
    for tid in sorted(spent, key=spent.get, reverse=True)[:8]:
        print(f"| {tid} {names.get(tid, by_thread[tid][0])} | {spent[tid] / n:.3f} |")
    print(
        f"collector during the run (--gc {args.gc}): "
        + ", ".join(f"{k} {v:.4g}" for k, v in served.gc.items())
    )
    for name, (calls, total) in sections.items():
        print(f"| {name}, wall | {1e3 * total / n:.3f} | {calls} calls |")
    if profiler is not None:
        stats = pstats.Stats(profiler).sort_stats("cumulative")
        stats.print_stats("serving|kvcache|embeddings.py|jagged|population|loadgen", 40)


if __name__ == "__main__":
    main()
