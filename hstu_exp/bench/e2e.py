"""workload=e2e: the full ranking model on a synthetic request stream (DESIGN §1.1, §6).

Modes: baseline (no KV cache, eager: every request recomputes its user's whole sequence) and
cache (cfg.cache: paged or paged_offload). A pass serves the stream's `num_batches` batches in
order on a cache emptied first; the timed region of a batch is everything a server does for it:
cache lookup and fingerprint check, stripping the cached prefix, page planning, offload/onload
copies (and the compute's waits for them), token rows + KJT, embeddings, block, heads. Passes
repeat until `iters` batches and `min_time_s` are reached; every batch latency is a sample (CUDA
events around each batch, so host work the device waits for counts, as it does for a server).
mode=cache_graph hands `rank` a `GraphedRanker`: per bucket (from the graph config) one CUDA graph
runs embeddings, block and heads; host onloads land before each replay.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import List

import torch
from omegaconf import OmegaConf

from hstu_exp.bench.roofline import block_work, floor, peaks
from hstu_exp.bench.timer import Timing
from hstu_exp.builders import (kernel_args, model_dtype, reuse, scaling_length, shared_cache,
                               shared_graphs)
from hstu_exp.config import ConfigError
from hstu_exp.data.synthetic import SyntheticStream
from hstu_exp.kvcache.manager import KVCacheManager, capacity_problem
from hstu_exp.model.ranking import HSTURanker, rank


def build_ranker(m, *, kernel: dict, device, dtype: torch.dtype, seed: int) -> HSTURanker:
    """kernel: `kernel_args(cfg.kernel)`."""
    def make():
        torch.manual_seed(seed)
        model = HSTURanker(
            num_layers=m.num_layers, hidden=m.hidden, num_heads=m.num_heads,
            head_dim=m.head_dim, scaling_length=scaling_length(m), **kernel,
            item_vocab=m.item_vocab, action_vocab=m.action_vocab, num_context=m.num_context,
            context_vocab=m.context_vocab, max_history=m.max_history,
            position_embedding=m.position_embedding, head_widths=list(m.head_widths),
            num_tasks=m.num_tasks)
        return model.to(device=device, dtype=dtype).eval()
    key = [OmegaConf.to_container(m, resolve=True), kernel, str(device), str(dtype), seed]
    return reuse("ranker", key, make)


def _relative_error(out: torch.Tensor, ref: torch.Tensor, counts: List[int]) -> float:
    """Worst per-user ||out - ref|| / ||ref|| over that user's candidate rows."""
    worst = 0.0
    for o, r in zip(out.double().split(counts), ref.double().split(counts)):
        worst = max(worst, float((o - r).norm() / r.norm().clamp_min(1e-30)))
    return worst


def run(cfg, device: torch.device, progress=print, job_dir=None) -> dict:
    m, w, c = cfg.model, cfg.workload, cfg.cache
    cached = w.mode in ("cache", "cache_graph")
    if cached and c.mode == "none":
        raise ConfigError(f"workload.mode={w.mode} needs cache=paged or cache=paged_offload "
                          "(cache=none is workload.mode=baseline)")
    if w.mode == "cache_graph" and device.type != "cuda":
        raise ConfigError("workload.mode=cache_graph: CUDA graphs need a CUDA device")
    dtype = model_dtype(m)
    B, k = w.batch_size, w.num_candidates
    stream = SyntheticStream(
        num_users=w.num_users or B, batch_size=B, num_batches=w.num_batches, num_candidates=k,
        history_start=w.history_start, history_step=w.history_step, max_history=m.max_history,
        num_context=m.num_context, item_vocab=m.item_vocab, action_vocab=m.action_vocab,
        context_vocab=m.context_vocab, seed=cfg.seed)
    progress(f"stream: {w.num_batches} batches of {B} users ({w.num_users or B} users), history "
             f"{w.history_start}..{stream.max_history} step {w.history_step}, {k} candidates")
    model = build_ranker(m, kernel=kernel_args(cfg.kernel), device=device, dtype=dtype, seed=cfg.seed)

    manager = None
    if cached:
        cache = shared_cache(m, c, device=device, dtype=dtype)
        problem = capacity_problem(seq_tokens=m.num_context + stream.max_history, batch_size=B,
                                   page_size=cache.page_size, num_pages=cache.num_pages,
                                   host_pages=getattr(cache, "host_pages", None))
        if problem:
            raise ConfigError(problem)
        manager = KVCacheManager(cache, warn=progress)

    graphs = None
    if w.mode == "cache_graph":
        graphs = shared_graphs(model, manager.cache, m, cfg.graph, device=device, dtype=dtype,
                               progress=progress)
        graphs.used.clear()

    starts: List[List[int]] = []  # cached prefix per request of each batch served

    def step(batch):
        out = rank(model, batch, device=device, manager=manager, graphs=graphs)
        starts.append(manager.last_starts if manager is not None else [0] * len(batch))
        return out

    for batch in stream.batches[:w.warmup]:  # warm-up on the stream's head, then start afresh
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)

    samples: List[float] = []
    totals: List[float] = []
    work = []  # (keys, new tokens, candidates) per user of each batch
    t_start = time.perf_counter()
    while not totals or len(samples) < w.iters or time.perf_counter() - t_start < w.min_time_s:
        if manager is not None:
            manager.reset()
        starts.clear()
        batch_ms, total_ms = _time_pass(stream.batches, step, device)
        samples += batch_ms
        totals.append(total_ms)
        if not work:  # every pass does the same work: note it once, for the floor
            work = [([r.seq_len for r in b], [r.seq_len - s for r, s in zip(b, st)],
                     [r.candidates.numel() for r in b]) for b, st in zip(stream.batches, starts)]
    timing = Timing(samples)
    total_ms = statistics.median(totals)
    result = {**timing.stats(), "samples_ms": samples, "total_ms": total_ms,
              "passes": len(totals), "throughput_cps": B * k * w.num_batches / (total_ms / 1e3),
              "num_batches": w.num_batches, "num_users": w.num_users or B,
              "history_start": w.history_start, "history_step": w.history_step,
              "total_history": stream.max_history, "new_history": None,
              # the mode decides, whatever graph= says
              "graph": "cudagraph" if w.mode == "cache_graph" else "none"}
    if graphs is not None:
        result["bucket"] = ",".join(sorted(graphs.used))
    if manager is not None:  # the last pass (every pass serves the same stream the same way)
        result.update(manager.stats())
        result["kv_pool_bytes"] = manager.cache.nbytes
        result["host_pool_bytes"] = getattr(manager.cache, "host_nbytes", 0)
    else:
        result.update(cache="none", kv_pool_bytes=0, hit_tokens=0,
                      computed_tokens=sum(r.seq_len + r.candidates.numel()
                                          for b in stream.batches for r in b))
    if device.type == "cuda":
        result["mem_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["mem_reserved_bytes"] = torch.cuda.max_memory_reserved(device)

    # Roofline of the block's work, averaged per batch over the stream (the floor is linear in
    # FLOPs and bytes, so floor_ms is the pass's floor / num_batches, comparable to mean_ms).
    flops = nbytes = 0
    for histories, news, cands in work:
        f, b = block_work(num_layers=m.num_layers, hidden=m.hidden, num_heads=m.num_heads,
                          head_dim=m.head_dim, itemsize=torch.empty((), dtype=dtype).element_size(),
                          histories=histories, news=news, candidates=cands)
        flops, nbytes = flops + f, nbytes + b
    flops, nbytes = flops / w.num_batches, nbytes / w.num_batches
    if cfg.calibrate:
        result.update(floor(flops, nbytes, peaks(device, dtype)))
        result["floor_fraction"] = result["floor_ms"] / (total_ms / w.num_batches)
    else:
        result.update(flops=flops, min_bytes=nbytes)

    if cfg.profile and job_dir is not None:  # one pass over the stream, batch by batch
        from hstu_exp.bench.profile import profile_step

        progress("profiling")
        if manager is not None:
            manager.reset()
        result.update(profile_step(lambda i: step(stream.batches[i]), device=device,
                                   iters=len(stream.batches), out_dir=job_dir))
    if cfg.verify:
        result["max_rel_error"] = _verify(model, stream.batches, manager, device, graphs)
        if manager is not None:  # the verify pass left its own state
            manager.reset()
    return result


def _time_pass(batches, step, device):
    """Per-batch latencies and the whole pass, ms. CUDA: events (read once the pass is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(batches) + 1)]
        events[0].record()
        for batch, end in zip(batches, events[1:]):
            step(batch)
            end.record()
        torch.cuda.synchronize()
        ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
        return ms, events[0].elapsed_time(events[-1])
    ms, t0 = [], time.perf_counter()
    for batch in batches:
        t = time.perf_counter()
        step(batch)
        ms.append((time.perf_counter() - t) * 1e3)
    return ms, (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def _verify(model, batches, manager, device, graphs=None) -> float:
    """The stream served again (fresh cache) vs a float32 full recompute of every user's whole
    sequence: worst relative error of candidate outputs and logits."""
    ref = copy.deepcopy(model).float()
    ref.block.kernel = "reference"
    if manager is not None:
        manager.reset()
    worst = 0.0
    for batch in batches:
        counts = [r.candidates.numel() for r in batch]
        logits, h = rank(model, batch, device=device, manager=manager, graphs=graphs,
                         return_hidden=True)
        ref_logits, ref_h = rank(ref, batch, device=device, return_hidden=True)
        worst = max(worst, _relative_error(logits, ref_logits, counts),
                    _relative_error(h, ref_h, counts))
    return worst
