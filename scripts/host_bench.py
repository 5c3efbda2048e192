#!/usr/bin/env python3
"""Host time of one ranking step on this machine's CPU, without a device: what `Server.serve`
does on the host before a CUDA-graph replay (cache lookup and page planning, token rows, the
bucket's padded metadata packed into one buffer) or before an eager forward (the same, then one
upload of all metadata). The seed model's stream (history 256 + 256 a request up to 4096, 256
candidates, page size 32, B users a batch, 16 batches a pass); the KV pool is one page wide
(no device, no K/V: only its bookkeeping is timed).

    scripts/host_bench.py [--batch 1 8] [--passes 30]

Prints per batch size the median over passes of the mean host ms a batch, per phase, in the
thread's CPU time (the machine this runs on is shared: wall time would count other processes).
A micro-benchmark of host code on a CPU, not a GPU measurement: the numbers in
outputs/BENCHMARKS.md are marked CPU.
"""

import argparse
import statistics
import time
from dataclasses import replace

import _venv  # noqa: F401,E402
import torch  # noqa: E402

from hstu_exp.core.jagged import make_batch, upload_step  # noqa: E402
from hstu_exp.data.synthetic import SyntheticStream  # noqa: E402
from hstu_exp.graphs import BucketGraphs, GraphedRanker  # noqa: E402
from hstu_exp.kvcache.manager import KVCacheManager  # noqa: E402
from hstu_exp.kvcache.paged import PagedKVCache  # noqa: E402
from hstu_exp.model.embeddings import make_tokens  # noqa: E402

VOCAB = {"item": 10_000, "action": 128, "candidate": 10_000}
MAX_HISTORY, PAGE = 4096, 32


def passes(batch_size: int, count: int, graph: bool):
    stream = SyntheticStream(
        num_users=batch_size,
        batch_size=batch_size,
        num_batches=16,
        num_candidates=256,
        history_start=256,
        history_step=256,
        max_history=MAX_HISTORY,
        num_context=0,
        item_vocab=10_000,
        action_vocab=128,
        context_vocab=1000,
        seed=0,
    )
    cache = PagedKVCache(
        num_layers=1,
        num_pages=16 * MAX_HISTORY // PAGE,
        page_size=PAGE,
        num_heads=1,
        head_dim=1,
        dtype=torch.float32,
        device="cpu",
    )
    manager = KVCacheManager(cache)
    runner = GraphedRanker(
        None,
        BucketGraphs(
            device="cpu",
            batch_buckets=[1, 2, 4, 8, 16],
            token_buckets=[128, 256, 512, 1024, 2048, 4352],
            pool=cache.pool,
            page_size=PAGE,
            max_history=MAX_HISTORY,
            scratch_page=cache.scratch_page,
        ),
    )
    phases = {"plan": [], "tokens": [], "stage": [], "commit": []}
    for _ in range(count):
        manager.reset()
        sums = dict.fromkeys(phases, 0.0)
        # New request objects every pass, as a server gets (what a request caches about
        # itself, `Request.arrays`, is made again and timed)
        batches = [[replace(r) for r in requests] for requests in stream.batches]
        for requests in batches:
            t0 = time.thread_time()
            starts, table, _ = manager.plan(requests, upload=False)
            t1 = time.thread_time()
            tokens = make_tokens(
                requests,
                starts,
                vocab=VOCAB,
                num_context=0,
                max_history=MAX_HISTORY,
                device="cpu",
                upload=False,
            )
            batch = make_batch(tokens.rows, tokens.num_candidates, "cpu", table, upload=False)
            t2 = time.thread_time()
            if graph:
                runner.stage_step(tokens, batch)
            else:
                upload_step(batch, tokens, "cpu")
            t3 = time.thread_time()
            manager.commit()
            t4 = time.thread_time()
            for key, a, b in [
                ("plan", t0, t1),
                ("tokens", t1, t2),
                ("stage", t2, t3),
                ("commit", t3, t4),
            ]:
                sums[key] += (b - a) * 1e3
        for key in phases:
            phases[key].append(sums[key] / len(batches))
    return {key: statistics.median(v) for key, v in phases.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--passes", type=int, default=30)
    args = parser.parse_args()
    print("| path | B | plan | tokens | stage / upload | commit | host ms a batch |")
    print("|---|---|---|---|---|---|---|")
    for graph in (True, False):
        for b in args.batch:
            ph = passes(b, args.passes, graph)
            cells = " | ".join(f"{ph[k]:.3f}" for k in ("plan", "tokens", "stage", "commit"))
            print(
                f"| {'graph staging' if graph else 'eager upload'} | {b} | {cells} | "
                f"{sum(ph.values()):.3f} |"
            )


if __name__ == "__main__":
    main()
