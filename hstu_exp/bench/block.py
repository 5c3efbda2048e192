"""workload=block: the HSTU block alone, cache state prepared ahead (docs/design.md).

Each user of the batch has `total_history` tokens of which the last `new_history` are new. With
cache=paged the first T - n are written into the pool through the real forward + append path
before timing; the timed region is "copy inputs into place + block forward" (it rewrites the same
slots every iteration). cache=none computes the whole history every time.
"""

from __future__ import annotations

import torch

from hstu_exp.bench.measure import Measured, stop_rule
from hstu_exp.bench.roofline import block_work
from hstu_exp.bench.timer import time_fn
from hstu_exp.builders import (
    kernel_args,
    kernels_for,
    model_dtype,
    shared_block,
    shared_cache,
    shared_graphs,
)
from hstu_exp.core.jagged import make_batch
from hstu_exp.model.hstu import oracle


def candidate_rows(offsets: torch.Tensor, num_candidates: int) -> torch.Tensor:
    ends = offsets[1:].long()
    return (ends[:, None] - num_candidates + torch.arange(num_candidates, device=ends.device)).flatten()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst per-row ||out - ref|| / ||ref|| (rows: candidate outputs)."""
    if out.numel() == 0:
        return 0.0
    out, ref = out.double(), ref.double()
    err = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
    return float(err.max())


def run(cfg, device: torch.device, progress=print) -> Measured:
    m, w = cfg.model, cfg.workload
    dtype = model_dtype(m)
    B, T, n, k = w.batch_size, w.total_history, w.new_history, w.num_candidates
    cached = T - n
    gen = torch.Generator().manual_seed(cfg.seed)

    block = shared_block(m, kernel=kernel_args(cfg.kernel), device=device, dtype=dtype, seed=cfg.seed)
    cache = shared_cache(m, cfg.cache, device=device, dtype=dtype)
    users = list(range(B))

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    prefix = randn(B * cached, m.hidden)
    if cache is not None:
        if cached:
            progress(f"preparing cache: {B} users x {cached} tokens")
            table = cache.plan(users, [cached] * B, [0] * B)
            with torch.no_grad():
                block(prefix, make_batch([cached] * B, [0] * B, device, table), cache.kv)
        batch = make_batch([n + k] * B, [k] * B, device, cache.plan(users, [n] * B, [k] * B))
        pool = cache.kv
    else:
        batch, pool = make_batch([T + k] * B, [k] * B, device), None

    rows = batch.offsets[-1].item()
    inputs = [randn(rows, m.hidden) for _ in range(w.input_sets)]
    static_x = torch.empty_like(inputs[0])
    extra = {
        "computed_tokens": rows,
        "cached_tokens": B * cached if cache is not None else 0,
        **(cache.capacity(T) if cache is not None else {"kv_pool_bytes": 0}),
    }

    @torch.no_grad()
    def eager(i: int):
        static_x.copy_(inputs[i % len(inputs)])
        return block(static_x, batch, pool)

    step = eager
    if cfg.graph.mode == "cudagraph":
        graphs = shared_graphs(block, cache, m, cfg.graph, device=device, dtype=dtype, progress=progress)
        staged = graphs.stage(batch, rows)
        extra.update(bucket=staged.bucket.name, padded_tokens=staged.bucket.rows)

        def graphed(i: int):
            return graphs.replay(inputs[i % len(inputs)], staged)

        step = graphed

    rule = stop_rule(w, device)
    timing = time_fn(step, device=device, warmup=w.warmup, rule=rule)
    if cfg.kernel.name == "triton":  # the Hopper kernel, or this file's (e4m3 pages: always)
        launched = kernels_for(cfg.kernel).attention.last_launch.get("config")
        extra["attention_kernel"] = launched.kernel if launched else None
    flops, nbytes = block_work(
        num_layers=m.num_layers,
        hidden=m.hidden,
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        itemsize=static_x.element_size(),
        histories=[T] * B,
        news=[n if cache else T] * B,
        candidates=[k] * B,
    )
    return Measured(
        samples_ms=timing.samples_ms,
        clocks=timing.clocks,
        flops=flops,
        nbytes=nbytes,
        rule=rule,
        dtype=dtype,
        step=step,
        extra=extra,
        verify=lambda: _verify(block, step, inputs[0], prefix, batch, B, cached, n, k, device),
    )


@torch.no_grad()
def _verify(block, step, x_new, prefix, batch, B, cached, n, k, device) -> float:
    """Candidate outputs of the timed path vs a float32 reference full recompute."""
    out = step(0)[candidate_rows(batch.offsets, k)]
    ref_block = oracle(block)
    new_rows = x_new.shape[0] // B
    seqs = [
        torch.cat([prefix[b * cached : (b + 1) * cached], x_new[b * new_rows : (b + 1) * new_rows]])
        for b in range(B)
    ]
    T = cached + n
    full_batch = make_batch([T + k] * B, [k] * B, device)
    ref = ref_block(torch.cat(seqs).float(), full_batch)[candidate_rows(full_batch.offsets, k)]
    return relative_error(out, ref)
