"""workload=serve: ranking requests served under load (docs/serving.md). The serving package
(`hstu_exp.serving`) does the work; this module builds the request path, runs the point on the
clock the config asks for and turns it into `Measured`.

workload.clock=real (the default): MLPerf LoadGen drives the real server (`serving.server`:
a batcher thread with real timers, a pipelined worker) on the wall clock; the record takes
LoadGen's verdict. search=max_qps bisects target_qps with short LoadGen trials, then re-runs the
highest passing rate with `final_seeds` schedule seeds for `min_duration_s` each.

workload.clock=simulated: the discrete-event simulator over measured per-batch service times
(`serving.simulated`), a what-if tool; every number it gives is labelled simulated.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import List, Optional

import torch

from hstu_exp import first_use
from hstu_exp.bench.accuracy import relative_error
from hstu_exp.bench.measure import Measured, gate_check
from hstu_exp.bench.roofline import mean_block_work
from hstu_exp.bench.timer import StopRule
from hstu_exp.builders import eager_shapes, model_dtype, replica_servers, shared_server
from hstu_exp.config import reduced_precision
from hstu_exp.env import ClockSampler
from hstu_exp.model.hstu import oracle
from hstu_exp.serving import outcome
from hstu_exp.serving.loadgen_sut import LoadGenTest
from hstu_exp.serving.path import rank
from hstu_exp.serving.population import UserSequences, population_for
from hstu_exp.serving.search import max_rate
from hstu_exp.serving.server import FirstUseDuringRun, RealServer
from hstu_exp.serving.simulated import (
    REQUESTS_FILE,
    ServePoint,
    Trial,
    counted,
    latencies_ms,
    make_stream,
    search_max_qps,
    trial_stats,
    write_requests,
)
from hstu_exp.serving.stats import user_shares, violations_to_miss
from hstu_exp.stats import early_stopping_queries

NO_RULE = StopRule(iters=1, min_time_s=0.0, max_time_s=0.0, cv_max=math.inf, min_samples=1)


def run(cfg, device: torch.device, progress=print, job_dir=None) -> Measured:
    dtype = model_dtype(cfg.model)
    groups = (cfg.model, cfg.cache, cfg.graph, cfg.kernel)
    built = dict(
        cached=cfg.cache.mode != "none",
        graphed=cfg.graph.mode == "cudagraph",
        dtype=dtype,
        seed=cfg.seed,
        progress=progress,
        pool_to_card=True,
    )
    if cfg.workload.replicas > 1:  # config.validate: clock=real only
        devices = replica_devices(device, cfg.workload.replicas)
        progress(
            f"serve: {len(devices)} replicas on {', '.join(map(str, devices))} (threads of one process)"
        )
        paths = replica_servers(*groups, devices=devices, **built)
        first_use.count_triton_compiles()
        return _run_real(cfg, paths, devices, dtype, progress, job_dir)
    path = shared_server(*groups, device=device, **built)
    first_use.count_triton_compiles()
    if cfg.workload.clock == "real":
        return _run_real(cfg, [path], [device], dtype, progress, job_dir)
    return _run_simulated(cfg, path, device, dtype, progress, job_dir)


def replica_devices(device: torch.device, replicas: int) -> List[torch.device]:
    """Replica i on cuda:i, or all on the CPU. config.validate checked the GPUs the sweep saw;
    a launcher may show a point fewer (hydra/launcher=gpus: one per worker), failing it here."""
    device = torch.device(device)
    if device.type == "cuda":
        if replicas > torch.cuda.device_count():
            raise ValueError(
                f"workload.replicas={replicas}: this point sees "
                f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}), one replica "
                "a GPU"
            )
        return [torch.device("cuda", i) for i in range(replicas)]
    return [device] * replicas


def slack_rows(cfg) -> int:
    """workload.route_slack_rows, or by default one full batch of the longest requests."""
    w, m = cfg.workload, cfg.model
    if w.route_slack_rows is not None:
        return w.route_slack_rows
    return w.max_batch * (m.num_context + m.max_history + (w.candidates_max or w.num_candidates))


def _contract(cfg) -> dict:
    """Keys every serve record carries whatever the clock (CONTRACT: the serve record)."""
    w = cfg.workload
    return {
        "clock": w.clock,
        "scenario": "offline" if w.mode == "offline" else "server",
        "target_qps": None if w.mode == "offline" or w.trace is not None else w.qps,
        "slo_ms": w.slo_ms,
        "slo_percentile": w.slo_percentile,
        "policy": w.policy,
        "max_batch": w.max_batch,
        "max_wait_ms": w.max_wait_ms,
        "user_skew": w.user_skew,
        "num_users": w.num_users,
        "items_per_return": w.items_per_return,
        "new_user_rate": w.new_user_rate,
        "cache_warmup_s": w.warmup_s,
        "trace": w.trace,
        "candidates_max": w.candidates_max,
    }


def _run_simulated(cfg, path, device, dtype, progress, job_dir) -> Measured:
    w = cfg.workload
    t0 = time.perf_counter()
    point = ServePoint(cfg, path, device)
    stream = make_stream(cfg, w.qps)
    progress(
        f"serve: {len(stream.times)} requests ({sum(stream.counted)} counted), "
        f"{'offline' if w.mode == 'offline' else f'{stream.offered_qps:g} qps offered'}, "
        f"max_batch {w.max_batch}, max_wait {w.max_wait_ms:g} ms, {w.policy}"
    )
    reduced = reduced_precision(cfg)
    answered: Optional[list] = [] if reduced else None
    point.warm_up(stream, keep=answered)
    if reduced:
        gate_before_runs(cfg, path, answered, reduced, progress)
    warm_s = time.perf_counter() - t0
    problems: List[str] = []
    progress("clock: simulated (a discrete-event simulation over measured service times)")
    with ClockSampler(device) as clocks:
        if w.search == "max_qps":
            best, trials = search_max_qps(point, w, progress, verify=checks_scores(cfg))
            extra = {
                "max_qps": best.qps if best else None,
                "search_qps": [t.qps for t in trials],
                "search_slo_met": [t.slo["slo_met"] for t in trials],
                "search_slo_latency_ms": [t.slo["slo_latency_ms"] for t in trials],
            }
            if best is None:
                problems.append(f"no rate met the SLO (lowest tried {min(t.qps for t in trials):g} qps)")
                best = min(trials, key=lambda t: t.qps)
        else:
            best, extra = point.trial(w.qps, verify=checks_scores(cfg)), {}
    extra.update(trial_stats(best, w))
    if extra["requests"] < w.min_requests:
        problems.append(
            f"too few counted requests ({extra['requests']} < min_requests {w.min_requests})"
        )
    if best.schedule.stopped_early:
        problems.append(
            "stopped early, the SLO surely missed (percentiles of the finished requests only)"
        )
    extra.update(_contract(cfg))
    extra.update(
        valid=not problems,
        invalid_reason="; ".join(problems) or None,
        verdict=None,
        verdict_reason=None,
        early_stopping_met=None,
        scheduled_qps=extra["offered_qps"],
        completed_qps=extra["achieved_qps"],
        warmup_s=warm_s,
        duration_s=w.duration_s,
        **user_shares([best.stream.users[i] for i in counted(best)], latencies_ms(best)),
    )
    if w.search == "max_qps":
        extra["search_passed"] = extra["search_slo_met"]
        failing = [
            q
            for q, ok in zip(extra["search_qps"], extra["search_passed"])
            if not ok and (extra["max_qps"] is None or q > extra["max_qps"])
        ]
        extra["min_failing_qps"] = min(failing, default=None)
    if w.trace is not None:  # the trace's own candidates, not the config's
        extra["num_candidates"] = min(best.stream.candidates)
        extra["candidates_max"] = max(best.stream.candidates)
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
        samples_ms=lat,
        clocks=clocks.summary(),
        flops=flops,
        nbytes=nbytes,
        rule=NO_RULE,
        dtype=dtype,
        step=profiled,
        profile_iters=min(len(batches), 8),
        verify=lambda: _verify(point, best),
        extra=extra,
        cv_basis="requests",
        per_unit_ms=1e3 * sum(best.service_s) / max(len(best.service_s), 1),
    )


def checks_scores(cfg) -> bool:
    """Whether the run samples requests' scores for the verify step: with verify=true, and for a
    reduced-precision point whatever verify says (its accuracy gate is judged on them)."""
    return bool(cfg.verify or reduced_precision(cfg))


def pool_capacity(cfg, manager) -> dict:
    """The KV pool's pages and how many users of the model's longest sequence it holds."""
    if manager is None:
        return {"kv_pool_pages": 0, "kv_pool_users": 0}
    m = cfg.model
    return {
        **manager.cache.capacity(m.num_context + m.max_history),
        "kv_pool_sized": "num_pages"
        if cfg.cache.num_pages
        else (
            f"gpu_fraction={cfg.cache.gpu_fraction:g} of free memory"
            if device_is_cuda(manager) and cfg.cache.mode == "paged"
            else "max_batch users"
        ),
    }


def gate_before_runs(cfg, path, answered: list, reduced: list, progress) -> None:
    """A reduced-precision point's accuracy gate on its warm-up's answers, (request, scores)
    pairs, before any timed run: one that misses fails in seconds, not after its search (the
    run's own sampled scores are gated again after it)."""
    err = _verify_scores(path, answered, path.device)
    progress(
        f"accuracy gate before the runs: {len(answered)} warm-up requests, max relative "
        f"error {err:.2e} vs a float32 full recompute"
        if err is not None
        else "accuracy gate before the runs: no warm-up request answered"
    )
    gate_check({"max_rel_error": err, **pool_capacity(cfg, path.manager)}, reduced)


def device_is_cuda(manager) -> bool:
    return manager.cache.pool.device.type == "cuda"


class _Trials:
    """LoadGen runs of one point on the real server: each on a fresh population at its rate,
    the cache emptied and re-warmed to a steady state first (graphs and tuning stay warm)."""

    def __init__(self, cfg, server: RealServer, job_dir, progress):
        self.cfg, self.w, self.server, self.progress = cfg, cfg.workload, server, progress
        self.log_root = Path(job_dir or ".") / "loadgen"
        self.warm: List[dict] = []

    def run(
        self,
        qps: float,
        *,
        seed: int,
        min_duration_s: float,
        label: str,
        sample_every: int = 0,
        give_up: bool = False,
    ):
        w = self.w
        # A short trial runs long enough for early stopping to judge it at any rate.
        queries = max(
            w.min_query_count, early_stopping_queries(w.slo_percentile) if w.mode == "online" else 1
        )
        test = LoadGenTest(
            scenario="offline" if w.mode == "offline" else "server",
            target_qps=qps,
            slo_ms=w.slo_ms,
            slo_percentile=w.slo_percentile,
            min_duration_s=min_duration_s,
            min_query_count=queries,
            seed=seed,
        )
        population = population_for(self.cfg, qps, seed)
        self.num_users = population.draws.num_users  # sized to the rate when num_users=null
        self.server.reset()
        # A reduced-precision point is gated on the first warm-up's answers (gate_before_runs).
        reduced = reduced_precision(self.cfg) if not self.warm else []
        answered: Optional[list] = [] if reduced else None
        self.warm.append(
            self.server.warm(
                population,
                cache_requests=math.ceil(qps * w.warmup_s),
                quiet_rounds=w.warm_rounds,
                max_s=w.warm_max_s,
                progress=self.progress,
                keep=answered,
            )
        )
        if reduced:
            gate_before_runs(self.cfg, self.server.path, answered, reduced, self.progress)
        self.progress(
            f"LoadGen {test.scenario}: {qps:g} qps, at least {min_duration_s:g} s and "
            f"{queries} queries, seed {seed} (clock: real)"
        )
        limit = None
        if (give_up or w.stop_on_miss) and test.scenario == "server":
            # An upper estimate of the queries LoadGen issues: a limit from fewer would stop
            # a run that could still pass.
            issued = max(queries, math.ceil(1.2 * qps * min_duration_s))
            limit = violations_to_miss(issued, w.slo_percentile)
        served = self.server.run(
            test,
            population,
            self.log_root / label,
            sample_every=sample_every,
            give_up_after=limit,
            freeze_gc=w.gc_freeze,
            switch_ms=w.switch_interval_ms,
            progress=self.progress,
        )
        lg = served.loadgen
        if served.stopped_early:  # LoadGen judged answers the model never computed
            lg.update(
                verdict="INVALID",
                slo_met=False,
                verdict_reason=(
                    f"stopped early by the server: p{w.slo_percentile:g} over {w.slo_ms:g} ms for "
                    f"sure (LoadGen's verdict on the cut run: {lg['verdict']})"
                ),
            )
        self.progress(
            f"LoadGen {qps:g} qps: {lg['verdict']}, p{w.slo_percentile:g} "
            f"{_ms(lg, w.slo_percentile)} ms, completed {lg['completed_qps']} qps"
            + (f" ({lg['verdict_reason']})" if lg["verdict_reason"] else "")
        )
        return served


def _warm_fields(warm: dict) -> dict:
    """The record's account of the first start-up warm-up (RealServer.warm)."""
    return dict(
        warmup_s=warm["warm_s"],
        warm_requests=warm["warm_requests"],
        warm_first_use=warm["warm_first_use"],
        warm_graphs=warm["warm_graphs"],  # buckets captured before the rounds
        warm_shapes=warm["warm_shapes"],  # eager: shapes tuned before the rounds
        warm_graphs_s=warm["warm_graphs_s"],
        warm_rounds_s=warm["warm_rounds_s"],
    )


def _ms(lg: dict, p: float) -> str:
    v = lg.get({50: "p50_ms", 90: "p90_ms", 99: "p99_ms", 99.9: "p999_ms"}.get(p, "p99_ms"))
    return "?" if v is None else f"{v:.1f}"


def _run_real(cfg, paths, devices, dtype, progress, job_dir) -> Measured:
    w, m = cfg.workload, cfg.model
    path, device = paths[0], devices[0]
    server = RealServer(
        paths,
        UserSequences(m, cfg.seed),
        max_batch=w.max_batch,
        max_wait_s=w.max_wait_ms / 1e3,
        policy=w.policy,
        device=devices,
        token_buckets=cfg.graph.token_buckets,
        num_context=m.num_context,
        routing=w.routing,
        max_imbalance=w.max_imbalance,
        slack_rows=slack_rows(cfg),
        # Eager on CUDA, the kernels tune per shape: every shape is met before the timed run.
        shapes=[
            eager_shapes(m, p.manager.cache if p.manager else None, max_batch=w.max_batch, device=d)
            if p.graphs is None and d.type == "cuda"
            else None
            for p, d in zip(paths, devices)
        ],
    )
    trials = _Trials(cfg, server, job_dir, progress)
    expected = max(w.qps * w.min_duration_s, w.min_query_count)
    every = max(1, int(expected // max(w.verify_requests, 1))) if checks_scores(cfg) else 0
    extra: dict = {}
    try:
        with ClockSampler(device) as clocks:
            if w.search == "max_qps":
                best = _search_real(trials, w, cfg.seed, progress, extra, every)
            else:
                seed = cfg.seed if w.loadgen_seed is None else w.loadgen_seed
                extra["loadgen_seed"] = seed
                best = trials.run(
                    w.qps, seed=seed, min_duration_s=w.min_duration_s, label="run", sample_every=every
                )
    except FirstUseDuringRun as exc:  # the failed record still says what the warm-up did
        exc.record_fields = _warm_fields(trials.warm[0]) if trials.warm else {}
        raise
    rows = [best.log.rows[i] for i in sorted(best.log.rows)]
    lg = best.loadgen
    best_qps = extra.get("final_qps", w.qps)  # the rate asked of LoadGen (offered)
    extra.update(outcome.run_stats(rows, best.log.batches, w.max_batch))
    extra.update(outcome.replica_stats(rows, best.log.batches, len(paths), best.routing))
    extra.update(routing=w.routing, max_imbalance=w.max_imbalance, route_slack_rows=slack_rows(cfg))
    extra.update(_contract(cfg))
    extra.update({k: v for k, v in lg.items()})
    problems = [] if lg["verdict"] == "VALID" else [f"LoadGen: {lg['verdict']} ({lg['verdict_reason']})"]
    extra.update(
        valid=not problems,
        invalid_reason="; ".join(problems) or None,
        **_warm_fields(trials.warm[0]),
        min_duration_s=w.min_duration_s,
        min_query_count=w.min_query_count,
        offered_qps=best_qps,
        achieved_qps=lg["completed_qps"],
        loadgen_logs=str(Path("loadgen")),
        stopped_early=best.stopped_early,
        gc_freeze=w.gc_freeze,
        switch_interval_ms=w.switch_interval_ms,
        **(best.gc or {}),
    )
    extra["target_qps"] = None if w.mode == "offline" else best_qps
    extra["num_users"] = trials.num_users
    extra.update(pool_capacity(cfg, path.manager))  # each replica's pool (replica 0's size)
    if path.graphs is not None:
        extra["bucket"] = ",".join(sorted(set().union(*(p.graphs.core.used for p in paths))))
    if job_dir is not None:
        outcome.write_requests(rows, Path(job_dir) / REQUESTS_FILE)
        outcome.write_batches(best.log.batches, Path(job_dir) / outcome.BATCHES_FILE)
        outcome.write_collections(best.collections, Path(job_dir) / outcome.COLLECTIONS_FILE)
        extra["requests_file"] = REQUESTS_FILE
    lat = outcome.latencies_ms(rows) or [math.nan]
    flops, nbytes = _work_of(m, dtype, rows)
    return Measured(
        samples_ms=lat,
        clocks=clocks.summary(),
        flops=flops,
        nbytes=nbytes,
        rule=NO_RULE,
        dtype=dtype,
        verify=lambda: _verify_scores(path, best.log.checked, device),
        extra=extra,
        cv_basis="requests",
        per_unit_ms=extra["device_ms_per_batch"],
    )


def _search_real(trials: _Trials, w, seed: int, progress, extra: dict, every: int):
    """Bisection over target_qps with short LoadGen trials (a pass: LoadGen's VALID), then the
    highest passing rate again with `final_seeds` seeds for min_duration_s each."""
    tried: List[tuple] = []

    def passed(qps: float) -> bool:
        served = trials.run(
            qps,
            seed=seed,
            min_duration_s=w.search_duration_s,
            label=f"search-{len(tried)}-{qps:g}qps",
            give_up=True,
        )
        tried.append((qps, served.loadgen["verdict"] == "VALID", served.loadgen["verdict"]))
        return tried[-1][1]

    # no rate down to an eighth of the start: stop there; LoadGen's rates to 0.1 qps
    lo, hi = max_rate(passed, w.qps, lowest=w.qps / 8, steps=w.search_steps, digits=1)
    extra.update(
        search_qps=[t[0] for t in tried],
        search_passed=[t[1] for t in tried],
        search_verdicts=[t[2] for t in tried],
        max_qps=lo,
        min_failing_qps=hi,
        search_duration_s=w.search_duration_s,
    )
    final_rate = lo if lo is not None else min(t[0] for t in tried)
    progress(
        f"max_qps bracket: passed {lo}, failed {hi} (clock: real); the final rate "
        f"{final_rate:g} qps with {w.final_seeds} seeds x {w.min_duration_s:g} s"
    )
    finals = [
        trials.run(
            final_rate,
            seed=seed + 1 + k,
            min_duration_s=w.min_duration_s,
            label=f"final-{k}-{final_rate:g}qps",
            sample_every=every,
        )
        for k in range(w.final_seeds)
    ]
    extra.update(
        final_qps=final_rate,
        final_seeds=[seed + 1 + k for k in range(w.final_seeds)],
        final_passed=[f.loadgen["verdict"] == "VALID" for f in finals],
        final_p99_ms=[f.loadgen["p99_ms"] for f in finals],
    )
    if lo is None:
        extra["max_qps"] = None
    # The record's percentiles and verdict: the final seed with the worst p99 (a max QPS that
    # one seed fails is not claimed).
    return max(finals, key=lambda f: f.loadgen["p99_ms"] or math.inf)


def _work_of(m, dtype, rows: List[dict]):
    """The block's FLOPs and fewest bytes per batch, averaged over a real run's batches."""
    batches: dict = {}
    for r in rows:  # batch numbers count per replica
        batches.setdefault((r.get("replica", 0), r["batch"]), []).append(r)
    work = []
    for members in batches.values():
        seq = [m.num_context + r["history"] for r in members]
        news = [s - r["cached_tokens"] for s, r in zip(seq, members)]
        work.append((seq, news, [r["candidates"] for r in members]))
    return mean_block_work(m, dtype, work)


@torch.no_grad()
def _verify_scores(path, checked, device) -> Optional[float]:
    """Sampled queries' scores as LoadGen received them (cache hits, host onloads, batching,
    pipelining) vs a float32 full recompute of each user's whole sequence: worst relative
    error; None when no query was sampled."""
    if not checked:
        return None
    ref = copy.deepcopy(path.model).float()
    ref.block = oracle(path.model.block)
    worst = 0.0
    for request, scores in checked:
        ref_logits = rank(ref, [request], device=device)
        worst = max(worst, relative_error(scores, ref_logits.cpu(), [request.candidates.numel()]))
    return worst


def _work_per_batch(cfg, dtype, trial: Trial):
    """The block's FLOPs and fewest bytes, averaged over the trial's batches."""
    m, st, cols = cfg.model, trial.stream, trial.per_request
    work = []
    for idx in (b[2] for b in trial.schedule.batches):
        seq = [m.num_context + st.history[i] for i in idx]
        news = [s - cols["cached_tokens"][i] for s, i in zip(seq, idx)]
        work.append((seq, news, [st.candidates[i] for i in idx]))
    return mean_block_work(m, dtype, work)


@torch.no_grad()
def _verify(point: ServePoint, trial: Trial) -> Optional[float]:
    """Sampled requests' outputs, as served in the run (cache hits, host onloads, batching),
    vs a float32 full recompute of each user's whole sequence: worst relative error; None when
    no request was sampled."""
    if not trial.checked:
        return None
    ref = copy.deepcopy(point.model).float()
    ref.block = oracle(point.model.block)
    worst = 0.0
    for request, logits, hidden in trial.checked:
        ref_logits, ref_h = rank(ref, [request], device=point.device, return_hidden=True)
        counts = [request.candidates.numel()]
        worst = max(
            worst,
            relative_error(logits, ref_logits.cpu(), counts),
            relative_error(hidden, ref_h.cpu(), counts),
        )
    return worst
