"""workload=e2e: the full ranking model on a synthetic request stream (docs/design.md).

Modes (workload.mode decides both the cache and the graphs; config.E2E_MODES):
  baseline        no KV cache, eager: every request recomputes its user's whole sequence;
  baseline_graph  no KV cache; per bucket (graph config) one CUDA graph runs the whole step
                  (embeddings, block, heads: `GraphedRanker`);
  cache           the KV cache of the cache group (paged or paged_offload), eager;
  cache_graph     that cache, and the step as CUDA graphs (host onloads land before a replay).
A pass serves the stream's `num_batches` batches in order on a cache emptied first; the timed
region of a batch is everything a server does for it: cache lookup and fingerprint check,
stripping the cached prefix, page planning, offload/onload copies (and the compute's waits for
them), token rows + KJT, embeddings, block, heads. Every batch latency is a sample (CUDA events
around each batch, so host work the device waits for counts, as it does for a server). Passes
repeat until `iters` batches and `min_time_s`; validity is judged on the pass totals (the
batches of a pass differ in size by design, the passes repeat the same work).
Per batch the record also keeps the host time to issue it (host_ms: lookup, planning, tokens,
copies and launches, measured on the host without waiting for the device; a batch whose host
time is close to its latency is host-bound), the device time of its compute (device_ms: CUDA
events from the compute's first launch to its end, `Served.device_ms`; on a CPU the host clock
around the compute), where its cached tokens came from and the bytes moved each way.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import replace
from typing import List

import torch

from hstu_exp.bench.accuracy import near_kth_share, relative_error, request_error, topk_agreement
from hstu_exp.bench.measure import Measured, stop_rule
from hstu_exp.bench.roofline import mean_block_work
from hstu_exp.bench.timer import reset_peak_memory
from hstu_exp.builders import model_dtype, shared_server
from hstu_exp.config import ACCURACY_GATE, E2E_MODES
from hstu_exp.data.synthetic import stream_for
from hstu_exp.env import ClockSampler
from hstu_exp.model.hstu import oracle
from hstu_exp.serving.path import rank

# Per-batch cache statistics (KVCacheManager.batches), also summed over a pass in the record.
CACHE_KEYS = ("gpu_hit_tokens", "host_hit_tokens", "miss_tokens", "offloaded_bytes", "onloaded_bytes")


def run(cfg, device: torch.device, progress=print) -> Measured:
    m, w = cfg.model, cfg.workload
    cached, graphed = E2E_MODES[w.mode]
    dtype = model_dtype(m)
    B, k = w.batch_size, w.num_candidates
    stream = stream_for(m, w, seed=cfg.seed)
    users = w.num_users or B
    progress(
        f"stream: {w.num_batches} batches of {B} of {users} user{'s' * (users > 1)}, history "
        f"{w.history_start}..{stream.max_history} step {w.history_step}, {k} candidates"
    )
    server = shared_server(
        m,
        cfg.cache,
        cfg.graph,
        cfg.kernel,
        cached=cached,
        graphed=graphed,
        device=device,
        dtype=dtype,
        seed=cfg.seed,
        progress=progress,
    )
    model, manager, graphs = server.model, server.manager, server.graphs

    starts: List[List[int]] = []  # cached prefix per request of each batch served
    served: list = []  # the pass's `Served`s: their device times are read once it is done

    def step(batch):
        out = server.serve(batch)
        served.append(out)
        starts.append(manager.last_starts if manager is not None else [0] * len(batch))
        return out.logits

    for batch in stream.batches[: w.warmup]:  # warm-up on the stream's head, then start afresh
        step(batch)
    reset_peak_memory(device)

    rule = stop_rule(w, device)

    def one_pass():  # the stream from the start, on an emptied cache
        if manager is not None:
            manager.reset()
        starts.clear()
        served.clear()
        batch_ms, host_ms = _time_pass(stream.batches, step, device)
        return batch_ms, host_ms, [s.device_ms for s in served]

    passes, clocks = _time_passes(one_pass, rule, device)
    samples = [ms for batch_ms, _, _ in passes for ms in batch_ms]
    totals = [sum(batch_ms) for batch_ms, _, _ in passes]
    total_ms = statistics.median(totals)
    # Every pass serves the same stream the same way: its work and cache traffic once (last).
    work = [
        (
            [r.seq_len for r in b],
            [r.seq_len - s for r, s in zip(b, st)],
            [r.candidates.numel() for r in b],
        )
        for b, st in zip(stream.batches, starts)
    ]
    extra = {
        "total_ms": total_ms,
        "passes": len(passes),
        "pass_ms": totals,
        "throughput_cps": B * k * w.num_batches / (total_ms / 1e3),
        "host_ms": statistics.median(sum(h) for _, h, _ in passes),
        "device_ms": statistics.median(sum(d) for _, _, d in passes),
        "batch_ms": _per_batch_median([ms for ms, _, _ in passes]),
        "batch_host_ms": _per_batch_median([h for _, h, _ in passes]),
        "batch_device_ms": _per_batch_median([d for _, _, d in passes]),
        "num_batches": w.num_batches,
        "num_users": w.num_users or B,
        "history_start": w.history_start,
        "history_step": w.history_step,
    }
    extra.update(_cache_stats(manager, work, m.num_context + m.max_history))
    if graphs is not None:
        extra["bucket"] = ",".join(sorted(graphs.core.used))
        # graph memory: what is held (bounded by graph.max_graphs) and what was dropped
        extra.update(graphs_captured=len(graphs.core.graphs), graphs_evicted=graphs.core.evicted)
    # per batch over the stream: floor_ms is the pass's floor / num_batches, comparable to mean_ms
    flops, nbytes = mean_block_work(m, dtype, work)

    def profiled(i: int):  # one pass over the stream, batch by batch, on an emptied cache
        if i == 0 and manager is not None:
            manager.reset()
        return step(stream.batches[i])

    def verify() -> float:
        worst = _verify(model, stream.batches, manager, device, graphs)
        if manager is not None:  # the verify pass left its own state
            manager.reset()
        return worst

    return Measured(
        samples_ms=samples,
        clocks=clocks,
        flops=flops,
        nbytes=nbytes,
        rule=rule,
        dtype=dtype,
        step=profiled,
        profile_iters=len(stream.batches),
        verify=verify,
        extra=extra,
        repeats_ms=totals,
        cv_basis="passes",
        per_unit_ms=total_ms / w.num_batches,
    )


def _time_passes(one_pass, rule, device):
    """Passes over the stream until the stop rule is met: validity is judged on the pass
    totals, `iters` counts batches. Returns the (batch ms, host ms, device ms) of each pass and
    the GPU clocks sampled meanwhile."""
    passes = []
    start = time.perf_counter()
    with ClockSampler(device) as clocks:
        while not rule.done(
            [sum(p[0]) for p in passes],
            time.perf_counter() - start,
            count=sum(len(p[0]) for p in passes),
        ):
            passes.append(one_pass())
    return passes, clocks.summary()


def _per_batch_median(passes: List[List[float]]) -> List[float]:
    """Median over passes of each batch of the stream."""
    return [statistics.median(column) for column in zip(*passes)]


def _cache_stats(manager, work, user_tokens: int) -> dict:
    """The last pass's cache statistics, in total and per batch, and the pool's capacity in
    users of `user_tokens` tokens. Without a cache every history token is a miss."""
    if manager is None:
        per_batch = [
            {
                "gpu_hit_tokens": 0,
                "host_hit_tokens": 0,
                "miss_tokens": sum(news),
                "offloaded_bytes": 0,
                "onloaded_bytes": 0,
            }
            for _, news, _ in work
        ]
        out = {
            "kv_pool_bytes": 0,
            "host_pool_bytes": 0,
            "hit_tokens": 0,
            "computed_tokens": sum(sum(n) + sum(c) for _, n, c in work),
        }
        out.update({key: sum(b[key] for b in per_batch) for key in CACHE_KEYS})
    else:
        per_batch = manager.batches
        out = {
            **manager.stats(),
            **manager.cache.capacity(user_tokens),
            "host_pool_bytes": getattr(manager.cache, "host_nbytes", 0),
        }
    out.update({f"batch_{key}": [b[key] for b in per_batch] for key in CACHE_KEYS})
    return out


def _time_pass(batches, step, device):
    """Per-batch latencies and host issue times, ms. CUDA: events (read once the pass is
    done); the host time of a batch is the host clock around its step, with no sync."""
    host = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(batches) + 1)]
        events[0].record()
        for batch, end in zip(batches, events[1:]):
            t = time.perf_counter()
            step(batch)
            host.append((time.perf_counter() - t) * 1e3)
            end.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(events, events[1:])], host
    ms = []
    for batch in batches:
        t = time.perf_counter()
        step(batch)
        ms.append((time.perf_counter() - t) * 1e3)
    return ms, list(ms)  # on a CPU the host does all of the work


@torch.no_grad()
def _verify(model, batches, manager, device, graphs=None) -> dict:
    """The stream served again (fresh cache) vs a float32 full recompute of every user's whole
    sequence: worst relative error of candidate outputs and logits. A reduced-precision path
    (fp8 GEMMs, an fp8 KV cache) is also ranked against the bf16 path (the same model with bf16
    GEMMs, recomputing in the model dtype): the mean top-k agreement of task 0's ranking
    (accuracy.topk_agreement, k = ACCURACY_GATE's), strict and within the bf16 path's own error
    against float32 (a candidate the bf16 path cannot tell from its own top k counts; the gate
    takes this one), beside the bf16 path's own strict agreement with the float32 recompute
    (`bf16_topk_agreement`) and the share of candidates inside that error band
    (`topk_near_kth_share`: how near-tied the rankings are)."""
    ref = copy.deepcopy(model).float()
    ref.block = oracle(model.block)
    exact = None
    fp8_cache = manager is not None and manager.cache.fp8
    if model.block.policy.gemm_dtype != "bf16" or fp8_cache:
        exact = copy.deepcopy(model)
        exact.block.policy = replace(model.block.policy, gemm_dtype="bf16")
    if manager is not None:
        manager.reset()
    worst, users = 0.0, 0
    sums = dict.fromkeys(
        (
            "topk_agreement",
            "topk_agreement_within_bf16_error",
            "bf16_topk_agreement",
            "topk_near_kth_share",
        ),
        0.0,
    )
    for batch in batches:
        counts = [r.candidates.numel() for r in batch]
        logits, h = rank(model, batch, device=device, manager=manager, graphs=graphs, return_hidden=True)
        ref_logits, ref_h = rank(ref, batch, device=device, return_hidden=True)
        worst = max(worst, relative_error(logits, ref_logits, counts), relative_error(h, ref_h, counts))
        if exact is not None:
            base = rank(exact, batch, device=device)
            k, ours, theirs, exact_ = ACCURACY_GATE["topk"], logits[:, 0], base[:, 0], ref_logits[:, 0]
            noise = request_error(theirs.float(), exact_, counts)  # the bf16 path's own error
            for key, value in (
                ("topk_agreement", topk_agreement(ours, theirs, counts, k)),
                ("topk_agreement_within_bf16_error", topk_agreement(ours, theirs, counts, k, noise)),
                ("bf16_topk_agreement", topk_agreement(theirs.float(), exact_, counts, k)),
                ("topk_near_kth_share", near_kth_share(theirs, counts, k, noise)),
            ):
                sums[key] += len(batch) * value
            users += len(batch)
    out = {"max_rel_error": worst}
    if exact is not None:
        out.update({key: total / users for key, total in sums.items()})
    return out
