"""workload=attention: the HSTU attention kernel alone, TFLOP/s and error vs the reference.

new_history == total_history times full mode (queries = keys = the sequence); fewer new tokens
time paged mode against random K/V already in the pool (queries = new rows + candidates).
"""

from __future__ import annotations

import math

import torch

from hstu_exp.bench.block import relative_error
from hstu_exp.bench.measure import Measured, stop_rule
from hstu_exp.bench.roofline import attention_pairs
from hstu_exp.bench.timer import time_fn
from hstu_exp.builders import build_layer_cache, kernels_for, model_dtype, scaling_length
from hstu_exp.core.jagged import make_batch
from hstu_exp.ops import kernels
from hstu_exp.ops.fp8 import Fp8Pages, dequantize_tokens, quantize_tokens


def run(cfg, device: torch.device, progress=print) -> Measured:
    m, w = cfg.model, cfg.workload
    dtype = model_dtype(m)
    B, T, n, k = w.batch_size, w.total_history, w.new_history, w.num_candidates
    H, D = m.num_heads, m.head_dim
    gen = torch.Generator().manual_seed(cfg.seed)
    kernel = kernels_for(cfg.kernel)
    alpha, inv_n = 1.0 / math.sqrt(D), 1.0 / scaling_length(m)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 0.5).to(device=device, dtype=dtype)

    paged = n < T
    kv_pages = None
    if paged:
        cache = build_layer_cache(m, cfg.cache, batch_size=B, tokens=T, device=device, dtype=dtype)
        users = list(range(B))
        cache.plan(users, [T - n] * B, [0] * B)
        batch = make_batch([n + k] * B, [k] * B, device, cache.plan(users, [n] * B, [k] * B))
        if cache.fp8:  # random K/V, quantised as an append would
            data, scales = quantize_tokens(randn(*cache.pool.shape))
            cache.pool.copy_(data), cache.scales.copy_(scales)
        else:
            cache.pool.copy_(randn(*cache.pool.shape))
        kv_pages = (cache.kv[0][:, 0], cache.kv[0][:, 1])
    else:
        batch = make_batch([T + k] * B, [k] * B, device)
    rows = B * ((n if paged else T) + k)
    sets = [tuple(randn(rows, H, D) for _ in range(3)) for _ in range(w.input_sets)]

    @torch.no_grad()
    def eager(i: int, op=kernel, upcast=False):
        q, kk, v = sets[i % len(sets)]
        if upcast:
            q, kk, v = q.float(), kk.float(), v.float()
        if paged:
            kp, vp = (_upcast(t) for t in kv_pages) if upcast else kv_pages
            return op.attention_paged(q, kk, v, batch, kp, vp, alpha=alpha, inv_n=inv_n)
        return op.attention_full(q, kk, v, batch, alpha=alpha, inv_n=inv_n)

    step = eager
    if cfg.graph.mode == "cudagraph":  # one graph per input set: times the kernel, not launches
        from hstu_exp.graphs import capture

        progress("capturing CUDA graphs")
        captured = [capture(lambda i=i: eager(i)) for i in range(len(sets))]

        def replay(i: int):
            graph, out = captured[i % len(captured)]
            graph.replay()
            return out

        step = replay

    rule = stop_rule(w, device)
    timing = time_fn(step, device=device, warmup=w.warmup, rule=rule)
    flops = 4 * H * D * B * attention_pairs(history=T, new=n, candidates=k)
    itemsize = torch.empty((), dtype=dtype).element_size()
    token_head = D + 4 if paged and cache.fp8 else itemsize * D  # a page's token-head (e4m3 + scale)
    nbytes = itemsize * H * D * 4 * rows + (
        2 * B * T * H * token_head if paged else 0
    )  # q,k,v,out + pages
    extra = {"cache": "paged" if paged else "none"}
    if paged:
        extra.update(cache.capacity(T))
        if cache.fp8:  # this workload checks the kernel; the block and e2e gate the e4m3 error
            extra["verify_reference"] = "float32 attention on the dequantised e4m3 pool"
    if cfg.kernel.name == "triton":
        extra.update(_launch_plan(eager, kernel.attention.last_launch))

    def verify() -> float:
        out = step(0)
        ref = eager(0, op=kernels("reference"), upcast=True)
        return relative_error(out.reshape(rows, -1), ref.reshape(rows, -1))

    return Measured(
        samples_ms=timing.samples_ms,
        clocks=timing.clocks,
        flops=flops,
        nbytes=nbytes,
        rule=rule,
        dtype=dtype,
        step=step,
        verify=verify,
        extra=extra,
    )


def _upcast(pages):
    """float32 pages (e4m3 pages dequantised: the reference then sees the values stored)."""
    if isinstance(pages, Fp8Pages):
        return dequantize_tokens(pages.data, pages.scales)
    return pages.float()


def _launch_plan(eager, plan: dict) -> dict:
    """The tiles and splits the rule or the tuner chose for this shape. ops offers no pure
    query for them yet: read what the last eager launch recorded in `plan` (a graph replay
    launches nothing from Python, so one eager call is made here, after timing)."""
    eager(0)
    tiles = plan.get("config")
    if tiles is None:
        return {}
    return {
        "attention_tiles": f"{tiles.block_m}x{tiles.block_n} w{tiles.num_warps} s{tiles.num_stages}",
        "attention_splits": plan.get("splits"),
        "attention_kernel": tiles.kernel,  # hopper | triton (e4m3 pages: always triton)
    }
