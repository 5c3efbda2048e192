"""workload=attention: the HSTU attention kernel alone, TFLOP/s and error vs the reference.

new_history == total_history times full mode (queries = keys = the sequence); fewer new tokens
time paged mode against random K/V already in the pool (queries = new rows + candidates).
"""
from __future__ import annotations

import math

import torch

from hstu_exp.bench.block import relative_error
from hstu_exp.bench.roofline import attention_pairs, floor, peaks
from hstu_exp.bench.timer import time_fn
from hstu_exp.builders import model_dtype, pool_pages
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.jagged import make_batch
from hstu_exp.ops import kernels


def run(cfg, device: torch.device, progress=print, job_dir=None) -> dict:
    m, w = cfg.model, cfg.workload
    dtype = model_dtype(m)
    B, T, n, k = w.batch_size, w.total_history, w.new_history, w.num_candidates
    H, D = m.num_heads, m.head_dim
    gen = torch.Generator().manual_seed(cfg.seed)
    kernel = kernels(cfg.kernel.name, autotune=cfg.kernel.autotune)
    alpha, inv_n = 1.0 / math.sqrt(D), 1.0 / (m.scaling_length or m.max_history + m.max_candidates)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 0.5).to(device=device, dtype=dtype)

    paged = n < T
    kv_pages = None
    if paged:
        cache = PagedKVCache(num_layers=1, num_pages=max(pool_pages(m, cfg.cache),
                                                         B * -(-T // cfg.cache.page_size)),
                             page_size=cfg.cache.page_size, num_heads=H, head_dim=D, dtype=dtype,
                             device=device)
        users = list(range(B))
        cache.plan(users, [T - n] * B, [0] * B)
        batch = make_batch([n + k] * B, [k] * B, device, cache.plan(users, [n] * B, [k] * B))
        cache.pool.copy_(randn(*cache.pool.shape))
        kv_pages = (cache.pool[0][:, 0], cache.pool[0][:, 1])
    else:
        batch = make_batch([T + k] * B, [k] * B, device)
    rows = B * ((n if paged else T) + k)
    sets = [tuple(randn(rows, H, D) for _ in range(3)) for _ in range(w.input_sets)]

    @torch.no_grad()
    def step(i: int, op=kernel, upcast=False):
        q, kk, v = sets[i % len(sets)]
        if upcast:
            q, kk, v = q.float(), kk.float(), v.float()
        if paged:
            kp, vp = (t.float() for t in kv_pages) if upcast else kv_pages
            return op.attention_paged(q, kk, v, batch, kp, vp, alpha=alpha, inv_n=inv_n)
        return op.attention_full(q, kk, v, batch, alpha=alpha, inv_n=inv_n)

    eager = step
    if cfg.graph.mode == "cudagraph":  # one graph per input set: times the kernel, not launches
        from hstu_exp.graphs import capture

        progress("capturing CUDA graphs")
        captured = [capture(lambda i=i: eager(i)) for i in range(len(sets))]

        def step(i: int, **_):  # noqa: F811
            graph, out = captured[i % len(captured)]
            graph.replay()
            return out

    timing = time_fn(step, device=device, warmup=w.warmup, iters=w.iters, min_time_s=w.min_time_s)
    stats = timing.stats()
    flops = 4 * H * D * B * attention_pairs(history=T, new=n, candidates=k)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = itemsize * H * D * (4 * rows + (2 * B * T if paged else 0))  # q,k,v,out + pages
    result = {**stats, "samples_ms": timing.samples_ms, "cache": "paged" if paged else "none",
              "tflops": flops / stats["median_ms"] / 1e9}
    if cfg.calibrate:
        result.update(floor(flops, nbytes, peaks(device, dtype)))
        result["floor_fraction"] = result["floor_ms"] / stats["median_ms"]
    else:
        result.update(flops=flops, min_bytes=nbytes)
    out = step(0)
    if cfg.kernel.name == "triton":  # what the rule or the tuner chose for this shape
        from hstu_exp.ops.triton_attention import LAST_LAUNCH

        tiles = LAST_LAUNCH["config"]
        result["attention_tiles"] = (f"{tiles.block_m}x{tiles.block_n} w{tiles.num_warps} "
                                     f"s{tiles.num_stages}")
        result["attention_splits"] = LAST_LAUNCH["splits"]
    ref = eager(0, op=kernels("reference"), upcast=True)
    result["max_rel_error"] = relative_error(out.reshape(rows, -1), ref.reshape(rows, -1))
    return result
