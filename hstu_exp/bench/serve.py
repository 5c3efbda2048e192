"""workload=serve: ranking requests served under load (docs/serving.md). The serving package
(`hstu_exp.serving`) does the work; this module builds the request path, runs the point on the
clock the config asks for and turns it into `Measured`.

workload.clock=simulated: the discrete-event simulator over measured per-batch service times
(`serving.simulated`), a what-if tool; every number it gives is labelled simulated.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import List

import torch

from hstu_exp import first_use
from hstu_exp.bench.accuracy import relative_error
from hstu_exp.bench.measure import Measured
from hstu_exp.bench.roofline import block_work
from hstu_exp.bench.timer import StopRule
from hstu_exp.builders import model_dtype, shared_server
from hstu_exp.core.paging import pages_for
from hstu_exp.model.hstu import oracle
from hstu_exp.env import ClockSampler
from hstu_exp.serving.path import rank
from hstu_exp.serving.simulated import (REQUESTS_FILE, ServePoint, Trial, latencies_ms,
                                        make_stream, search_max_qps, trial_stats,
                                        write_requests)


def run(cfg, device: torch.device, progress=print, job_dir=None) -> Measured:
    w = cfg.workload
    dtype = model_dtype(cfg.model)
    path = shared_server(cfg.model, cfg.cache, cfg.graph, cfg.kernel,
                         cached=cfg.cache.mode != "none", graphed=cfg.graph.mode == "cudagraph",
                         device=device, dtype=dtype, seed=cfg.seed, progress=progress,
                         pool_to_card=True)
    first_use.count_triton_compiles()
    point = ServePoint(cfg, path, device)
    stream = make_stream(cfg, w.qps)
    progress(f"serve: {len(stream.times)} requests ({sum(stream.counted)} counted), "
             f"{'offline' if w.mode == 'offline' else f'{stream.offered_qps:g} qps offered'}, "
             f"max_batch {w.max_batch}, max_wait {w.max_wait_ms:g} ms, {w.policy}")
    point.warm_up(stream)
    problems: List[str] = []
    progress("clock: simulated (a discrete-event simulation over measured service times)")
    with ClockSampler(device) as clocks:
        if w.search == "max_qps":
            best, trials = search_max_qps(point, w, progress, verify=cfg.verify)
            extra = {"max_qps": best.qps if best else None,
                     "search_qps": [t.qps for t in trials],
                     "search_slo_met": [t.slo["slo_met"] for t in trials],
                     "search_slo_latency_ms": [t.slo["slo_latency_ms"] for t in trials]}
            if best is None:
                problems.append(f"no rate met the SLO (lowest tried "
                                f"{min(t.qps for t in trials):g} qps)")
                best = min(trials, key=lambda t: t.qps)
        else:
            best, extra = point.trial(w.qps, verify=cfg.verify), {}
    extra.update(trial_stats(best, w))
    if extra["requests"] < w.min_requests:
        problems.append(f"too few counted requests ({extra['requests']} < min_requests "
                        f"{w.min_requests})")
    if best.schedule.stopped_early:
        problems.append("stopped early, the SLO surely missed (percentiles of the finished "
                        "requests only)")
    extra.update(valid=not problems, invalid_reason="; ".join(problems) or None,
                 policy=w.policy, max_batch=w.max_batch,
                 max_wait_ms=w.max_wait_ms, user_skew=w.user_skew, num_users=w.num_users,
                 items_per_return=w.items_per_return, new_user_rate=w.new_user_rate,
                 warmup_s=w.warmup_s, duration_s=w.duration_s)
    if point.graphs is not None:
        extra["bucket"] = ",".join(sorted(point.graphs.core.used))
    extra.update(pool_capacity(cfg, path.manager))
    if job_dir is not None:
        write_requests(best, Path(job_dir) / REQUESTS_FILE)
        extra["requests_file"] = REQUESTS_FILE
    lat = latencies_ms(best) or [math.nan]
    flops, nbytes = _work_per_batch(cfg, dtype, best)
    batches = [b[2] for b in best.schedule.batches]

    def profiled(i: int):  # the trial's batches again, in order, on an emptied cache
        if i == 0:
            point.path.reset()
        return point.path.serve([point.request(best.stream, j) for j in batches[i]])

    return Measured(
        samples_ms=lat, clocks=clocks.summary(), flops=flops, nbytes=nbytes,
        rule=StopRule(iters=1, min_time_s=0.0, max_time_s=0.0, cv_max=math.inf, min_samples=1),
        dtype=dtype, step=profiled, profile_iters=min(len(batches), 8),
        verify=lambda: _verify(point, best), extra=extra, cv_basis="requests",
        per_unit_ms=1e3 * sum(best.service_s) / max(len(best.service_s), 1))


def pool_capacity(cfg, manager) -> dict:
    """The KV pool's pages and how many users of the model's longest sequence it holds."""
    if manager is None:
        return {"kv_pool_pages": 0, "kv_pool_users": 0}
    m, pages = cfg.model, manager.cache.num_pages
    return {"kv_pool_pages": pages, "kv_pool_bytes": manager.cache.nbytes,
            "kv_pool_users": pages // pages_for(m.num_context + m.max_history,
                                                cfg.cache.page_size),
            "kv_pool_sized": "num_pages" if cfg.cache.num_pages else
            (f"gpu_fraction={cfg.cache.gpu_fraction:g} of free memory"
             if device_is_cuda(manager) and cfg.cache.mode == "paged" else "max_batch users")}


def device_is_cuda(manager) -> bool:
    return manager.cache.pool.device.type == "cuda"


def _work_per_batch(cfg, dtype, trial: Trial):
    """The block's FLOPs and fewest bytes, averaged over the trial's batches."""
    m, st, cols = cfg.model, trial.stream, trial.per_request
    itemsize = torch.empty((), dtype=dtype).element_size()
    flops = nbytes = 0
    batches = [b[2] for b in trial.schedule.batches]
    for idx in batches:
        seq = [m.num_context + st.history[i] for i in idx]
        f, b = block_work(num_layers=m.num_layers, hidden=m.hidden, num_heads=m.num_heads,
                          head_dim=m.head_dim, itemsize=itemsize, histories=seq,
                          news=[s - cols["cached_tokens"][i] for s, i in zip(seq, idx)],
                          candidates=[st.candidates[i] for i in idx])
        flops, nbytes = flops + f, nbytes + b
    return flops / max(len(batches), 1), nbytes / max(len(batches), 1)


@torch.no_grad()
def _verify(point: ServePoint, trial: Trial) -> float:
    """Sampled requests' outputs, as served in the run (cache hits, host onloads, batching),
    vs a float32 full recompute of each user's whole sequence: worst relative error."""
    if not trial.checked:
        return math.nan
    ref = copy.deepcopy(point.model).float()
    ref.block = oracle(point.model.block)
    worst = 0.0
    for request, logits, hidden in trial.checked:
        ref_logits, ref_h = rank(ref, [request], device=point.device, return_hidden=True)
        counts = [request.candidates.numel()]
        worst = max(worst, relative_error(logits, ref_logits.cpu(), counts),
                    relative_error(hidden, ref_h.cpu(), counts))
    return worst
