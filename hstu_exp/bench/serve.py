"""workload=serve: an open-loop request stream, a batch scheduler and the serving layer behind it
(docs/serving.md).

Arrivals (`data/arrivals.py`: Poisson at `qps` or a trace) queue in front of one server. The
clock is simulated, event by event: when the server is idle it takes the waiting requests it may
batch (one request in flight per user: a user's later request waits for the earlier one), and
starts a batch once `max_batch` are eligible or the oldest has waited `max_wait_ms`; the batch
is served for real (`serving.Server`) and the server stays busy for its measured service time
(wall time, synchronized on CUDA), while the arrivals meanwhile queue. So the queueing is exact
given the service times, and the run is deterministic given the seed up to those times.

Policies: `fifo` takes the oldest eligible requests; `length_aware` takes the oldest one, then
others whose sequence falls in the same graph token bucket, then ones from smaller buckets, so
fewer batches mix short requests with a long one (with graph.fit_rows=false a batch pads every
request to its longest, the default; with fit_rows only its total rows to a power of two).

Requests arriving in [warmup_s, warmup_s + duration_s) are counted; the ones before warm the
cache up. mode=offline makes every request available at time 0 (maximum throughput).
search=max_qps runs trials at growing, then bisected, rates and keeps the highest one whose
latency at slo_percentile is within slo_ms; a trial stops early once enough counted requests
are over the SLO that the percentile cannot be met.
"""
from __future__ import annotations

import copy
import csv
import math
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from hstu_exp import first_use
from hstu_exp.bench.e2e import _relative_error
from hstu_exp.bench.measure import Measured
from hstu_exp.bench.roofline import block_work
from hstu_exp.bench.timer import StopRule
from hstu_exp.builders import model_dtype, shared_server
from hstu_exp.data.arrivals import histories, poisson_arrivals, read_trace
from hstu_exp.data.synthetic import Request, interleave
from hstu_exp.env import ClockSampler
from hstu_exp.serving import TIERS, rank

REQUESTS_FILE = "requests.csv"
REQUEST_COLUMNS = ("request", "user", "arrival_s", "start_s", "finish_s", "latency_ms",
                   "queue_ms", "service_ms", "batch", "batch_size", "tier", "history",
                   "candidates", "cached_tokens", "tokens_computed", "onloaded_bytes",
                   "offloaded_bytes", "counted")


# -- the scheduler ---------------------------------------------------------------------------

@dataclass
class Schedule:
    """When each request started and finished, in which batch; the batches in order."""
    start: List[Optional[float]]
    finish: List[Optional[float]]
    batch: List[Optional[int]]
    batches: List[tuple] = field(default_factory=list)  # (start_s, finish_s, request indices)
    stopped_early: bool = False


def eligible(waiting: List[int], users) -> List[int]:
    """The oldest waiting request of each user (one request in flight per user)."""
    seen, out = set(), []
    for i in waiting:
        if users[i] not in seen:
            seen.add(users[i])
            out.append(i)
    return out


def pick_batch(ready: List[int], buckets, max_batch: int, policy: str) -> List[int]:
    if policy == "fifo":
        return ready[:max_batch]
    head = buckets[ready[0]]  # the oldest request always goes: no request starves
    same = [i for i in ready if buckets[i] == head]
    smaller = [i for i in ready if buckets[i] < head]
    return (same + smaller)[:max_batch]


def simulate(times, users, buckets, serve_batch: Callable[[List[int]], float], *,
             max_batch: int, max_wait_s: float, policy: str,
             give_up: Optional[Callable] = None) -> Schedule:
    """Serve requests arriving at `times` (sorted, seconds) on one server. serve_batch(indices)
    serves a batch and returns its service time, s. give_up(now, schedule, waiting) may end the
    run after a batch (search: the SLO is already missed)."""
    n = len(times)
    sched = Schedule([None] * n, [None] * n, [None] * n)
    waiting: List[int] = []
    nxt, now = 0, 0.0
    while nxt < n or waiting:
        while nxt < n and times[nxt] <= now:
            waiting.append(nxt)
            nxt += 1
        if not waiting:
            now = times[nxt]
            continue
        ready = eligible(waiting, users)
        # Wait for a fuller batch, up to the oldest one's max_wait (the server cannot know
        # whether more requests will come, so it waits at the end of the stream too).
        deadline = times[ready[0]] + max_wait_s
        if len(ready) < max_batch and now < deadline:
            now = min(deadline, times[nxt]) if nxt < n else deadline
            continue
        chosen = pick_batch(ready, buckets, max_batch, policy)
        service = serve_batch(chosen)
        for i in chosen:
            sched.start[i], sched.finish[i], sched.batch[i] = now, now + service, len(sched.batches)
        sched.batches.append((now, now + service, chosen))
        taken = set(chosen)
        waiting = [i for i in waiting if i not in taken]
        now += service
        if give_up is not None and give_up(now, sched, waiting):
            sched.stopped_early = True
            break
    return sched


def percentile(sorted_values, p: float) -> float:
    """Linear interpolation between ranks (statistics.quantiles' inclusive method)."""
    if not sorted_values:
        return math.nan
    h = (len(sorted_values) - 1) * p / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (h - lo)


def violations_to_miss(counted: int, p: float) -> int:
    """Counted requests over the SLO that make the interpolated p-th percentile miss it for
    sure, whatever the others' latencies: the sorted value at floor((N-1) p / 100) is then over."""
    return counted - math.floor((counted - 1) * p / 100)


# -- requests --------------------------------------------------------------------------------

class UserSequences:
    """One fixed sequence per user (context + max_history tokens), drawn from (seed, user) on
    first use: a user's requests are prefixes of it, so a history only grows."""

    def __init__(self, model, seed: int):
        self.m, self.seed, self._seqs = model, seed, {}

    def get(self, user: int):
        if user not in self._seqs:
            m, rng = self.m, np.random.default_rng([self.seed, 7, user])
            n_items = -(-m.max_history // 2)
            self._seqs[user] = interleave(
                torch.from_numpy(rng.integers(m.context_vocab, size=m.num_context)),
                torch.from_numpy(rng.integers(m.item_vocab, size=n_items)),
                torch.from_numpy(rng.integers(m.action_vocab, size=n_items)))
        return self._seqs[user]


@dataclass
class Stream:
    """The arrivals of one trial, and what each request carries."""
    times: List[float]  # arrival, s (0 for every request in mode=offline)
    users: List[int]
    history: List[int]  # history tokens
    candidates: List[int]
    counted: List[bool]  # arrived in [warmup_s, warmup_s + duration_s)
    offered_qps: float


def make_stream(cfg, qps: float) -> Stream:
    m, w = cfg.model, cfg.workload
    max_items = -(-m.max_history // 2)
    horizon = w.warmup_s + w.duration_s
    if w.trace is not None:
        arrivals = read_trace(w.trace)
    else:
        arrivals = poisson_arrivals(
            qps=qps, horizon_s=horizon, num_users=w.num_users, user_skew=w.user_skew,
            new_user_rate=w.new_user_rate, items_per_return=w.items_per_return,
            max_items=max_items, num_candidates=w.num_candidates,
            candidates_max=w.candidates_max, seed=cfg.seed)
    counted = [w.warmup_s <= a.time_s < horizon for a in arrivals]
    offered = qps if w.trace is None else sum(counted) / w.duration_s
    items = histories(arrivals, max_items)
    times = [0.0 if w.mode == "offline" else a.time_s for a in arrivals]
    return Stream(times=times, users=[a.user for a in arrivals],
                  history=[min(2 * k, m.max_history) for k in items],
                  candidates=[a.candidates for a in arrivals], counted=counted,
                  offered_qps=offered)


def token_bucket(rows: int, buckets) -> int:
    """Index of the smallest graph token bucket holding `rows` (past the largest: its count)."""
    return bisect_left(sorted(buckets), rows)


# -- one trial -------------------------------------------------------------------------------

@dataclass
class Trial:
    qps: float
    stream: Stream
    schedule: Schedule
    per_request: dict  # column -> list over requests (tier, cached_tokens, ...)
    service_s: List[float]  # per batch
    checked: list  # verify: (request, logits, hidden) of sampled requests
    slo: dict = field(default_factory=dict)
    graph_captures: int = 0  # CUDA graph buckets first met (and captured) inside the trial
    first_use_ms: float = 0.0  # tuning, compiles and captures, kept off the service times
    graph_padding: Optional[float] = None  # rows the graphs computed / live rows (1.0: none)


class ServePoint:
    """The server of a point and how to run a trial at a given rate on it."""

    def __init__(self, cfg, device, progress):
        m, w = cfg.model, cfg.workload
        self.cfg, self.w, self.device, self.progress = cfg, w, device, progress
        dtype = model_dtype(m)
        self.server = shared_server(m, cfg.cache, cfg.graph, cfg.kernel,
                                    cached=cfg.cache.mode != "none",
                                    graphed=cfg.graph.mode == "cudagraph", device=device,
                                    dtype=dtype, seed=cfg.seed, progress=progress)
        self.model, self.graphs = self.server.model, self.server.graphs
        self.users = UserSequences(m, cfg.seed)
        first_use.count_triton_compiles()
        self.dtype = dtype

    def request(self, stream: Stream, i: int) -> Request:
        kinds, ids = self.users.get(stream.users[i])
        end = self.cfg.model.num_context + stream.history[i]
        rng = np.random.default_rng([self.cfg.seed, 11, i])
        cands = torch.from_numpy(rng.integers(self.cfg.model.item_vocab,
                                              size=stream.candidates[i]))
        return Request(user=stream.users[i], kinds=kinds[:end], ids=ids[:end], candidates=cands,
                       num_context=self.cfg.model.num_context)

    def timed_serve(self, requests, return_hidden=False):
        """(Served, service seconds): the server's wall time for the batch, device included,
        less first-use work inside it (autotuning a new attention shape, a Triton compile,
        capturing a new graph bucket: a server does these at start-up; the trial records them,
        `first_use_ms`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        before = first_use.seconds()
        t = time.perf_counter()
        served = self.server.serve(requests, return_hidden=return_hidden)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return served, time.perf_counter() - t - (first_use.seconds() - before)

    def warm_up(self, stream: Stream) -> None:
        """First-call costs (allocation, kernel selection) off the clock: the stream's first
        users served twice (a miss, then a hit), then the cache is emptied."""
        first = eligible(list(range(len(stream.times))), stream.users)[:self.w.max_batch]
        batch = [self.request(stream, i) for i in first]
        for _ in range(2):
            self.timed_serve(batch)
        self.server.reset()

    def trial(self, qps: float, *, verify: bool = False, search: bool = False) -> Trial:
        w = self.w
        stream = make_stream(self.cfg, qps)
        self.server.reset()
        n = len(stream.times)
        cols = {k: [None] * n for k in ("tier", "cached_tokens", "tokens_computed",
                                        "onloaded_bytes", "offloaded_bytes")}
        service_s: List[float] = []
        sample = set(_verify_sample(stream, w.verify_requests, self.cfg.seed)) if verify else set()
        checked = []

        def serve_batch(indices):
            requests = [self.request(stream, i) for i in indices]
            want = bool(sample.intersection(indices))
            served, seconds = self.timed_serve(requests, return_hidden=want)
            for j, i in enumerate(indices):
                cols["tier"][i], cols["cached_tokens"][i] = served.tiers[j], served.cached[j]
                cols["tokens_computed"][i] = served.computed[j]
                cols["onloaded_bytes"][i] = served.onloaded_bytes[j]
                cols["offloaded_bytes"][i] = served.offloaded_bytes[j]
            if want:
                counts = [r.candidates.numel() for r in requests]
                rows = zip(served.logits.split(counts), served.hidden.split(counts))
                checked.extend((requests[j], lg.float().cpu().clone(), h.float().cpu().clone())
                               for j, (lg, h) in enumerate(rows) if indices[j] in sample)
            service_s.append(seconds)
            return seconds

        buckets = [token_bucket(self.cfg.model.num_context + h + c, self.cfg.graph.token_buckets)
                   for h, c in zip(stream.history, stream.candidates)]
        give_up = _slo_give_up(stream, w) if search or w.stop_on_miss else None
        core = self.graphs.core if self.graphs is not None else None
        captured, first = len(core.graphs) if core is not None else 0, first_use.seconds()
        rows = (core.live_rows, core.run_rows) if core is not None else (0, 0)
        schedule = simulate(stream.times, stream.users, buckets, serve_batch,
                            max_batch=w.max_batch, max_wait_s=w.max_wait_ms / 1e3,
                            policy=w.policy, give_up=give_up)
        trial = Trial(qps, stream, schedule, cols, service_s, checked)
        trial.first_use_ms = 1e3 * (first_use.seconds() - first)
        if core is not None:
            trial.graph_captures = len(core.graphs) - captured
            live = core.live_rows - rows[0]
            trial.graph_padding = (core.run_rows - rows[1]) / live if live else None
        trial.slo = slo_result(trial, w)
        return trial


def _verify_sample(stream: Stream, k: int, seed: int) -> List[int]:
    counted = [i for i, c in enumerate(stream.counted) if c]
    rng = np.random.default_rng([seed, 13])
    return sorted(rng.choice(counted, size=min(k, len(counted)), replace=False).tolist())


def _slo_give_up(stream: Stream, w):
    """Stops a trial once so many counted requests are over slo_ms (finished, or still waiting
    past it) that the percentile cannot come back under it."""
    slo_s = w.slo_ms / 1e3
    limit = violations_to_miss(sum(stream.counted), w.slo_percentile)
    over = [0]

    def give_up(now, sched, waiting):
        _, _, last = sched.batches[-1]
        over[0] += sum(stream.counted[i] and sched.finish[i] - stream.times[i] > slo_s
                       for i in last)
        late = 0
        for i in waiting:  # in arrival order: the late ones come first
            if now - stream.times[i] <= slo_s:
                break
            late += stream.counted[i]
        return over[0] + late >= limit
    return give_up


def latencies_ms(trial: Trial) -> List[float]:
    """Latency (queueing + service) of every counted request that finished, in request order."""
    s, st = trial.schedule, trial.stream
    return [(s.finish[i] - st.times[i]) * 1e3 for i in range(len(st.times))
            if st.counted[i] and s.finish[i] is not None]


def slo_result(trial: Trial, w) -> dict:
    lat = sorted(latencies_ms(trial))
    at = percentile(lat, w.slo_percentile)
    met = not trial.schedule.stopped_early and bool(lat) and at <= w.slo_ms
    return {"slo_latency_ms": None if trial.schedule.stopped_early else at, "slo_met": met}


# -- the record ------------------------------------------------------------------------------

def trial_stats(trial: Trial, w) -> dict:
    s, st, cols = trial.schedule, trial.stream, trial.per_request
    counted = [i for i in range(len(st.times)) if st.counted[i] and s.finish[i] is not None]
    lat = sorted(latencies_ms(trial))
    queue = sorted((s.start[i] - st.times[i]) * 1e3 for i in counted)
    # The window a rate is judged over: from warmup_s (offline: the first counted start) to the
    # last counted finish.
    first = min((s.start[i] for i in counted), default=0.0)
    begin = first if w.mode == "offline" else w.warmup_s
    end = max((s.finish[i] for i in counted), default=begin)
    span = max(end - begin, 1e-12)
    busy = sum(max(0.0, min(b, end) - max(a, begin)) for a, b, _ in s.batches)
    mine = [b for b in s.batches if any(st.counted[i] for i in b[2])]
    hist = [0] * w.max_batch
    for _, _, idx in mine:
        hist[len(idx) - 1] += 1
    tiers = {t: sum(cols["tier"][i] == t for i in counted) for t in TIERS}
    n = max(len(counted), 1)
    out = {"offered_qps": st.offered_qps, "requests": len(counted),
           "requests_total": len(st.times), "achieved_qps": len(counted) / span,
           "candidates_per_s": sum(st.candidates[i] for i in counted) / span,
           "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
           "p99_ms": percentile(lat, 99), "p999_ms": percentile(lat, 99.9),
           "queue_p50_ms": percentile(queue, 50), "queue_p99_ms": percentile(queue, 99),
           "service_p50_ms": percentile(sorted(1e3 * (b - a) for a, b, _ in mine), 50),
           "batches": len(mine), "batch_size_hist": hist,
           "mean_batch_size": sum(len(b[2]) for b in mine) / max(len(mine), 1),
           "busy_fraction": busy / span, "stopped_early": s.stopped_early,
           "graph_captures": trial.graph_captures, "graph_padding": trial.graph_padding,
           "first_use_ms": trial.first_use_ms,
           **{f"{t}_requests": tiers[t] for t in TIERS},
           **{f"{t}_hit_rate" if t != "miss" else "miss_rate": tiers[t] / n for t in TIERS},
           "cached_tokens": sum(cols["cached_tokens"][i] for i in counted),
           "computed_tokens": sum(cols["tokens_computed"][i] for i in counted),
           "onloaded_bytes": sum(cols["onloaded_bytes"][i] for i in counted),
           "offloaded_bytes": sum(cols["offloaded_bytes"][i] for i in counted),
           "slo_ms": w.slo_ms, "slo_percentile": w.slo_percentile, **trial.slo}
    return out


def write_requests(trial: Trial, path: Path) -> None:
    s, st, cols = trial.schedule, trial.stream, trial.per_request
    sizes = {k: len(b[2]) for k, b in enumerate(s.batches)}
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(REQUEST_COLUMNS)
        for i in range(len(st.times)):
            done = s.finish[i] is not None
            ms = (lambda a, b: round((a - b) * 1e3, 6)) if done else (lambda a, b: None)
            out.writerow([i, st.users[i], st.times[i], s.start[i], s.finish[i],
                          ms(s.finish[i], st.times[i]), ms(s.start[i], st.times[i]),
                          ms(s.finish[i], s.start[i]), s.batch[i],
                          sizes.get(s.batch[i]), cols["tier"][i], st.history[i],
                          st.candidates[i], cols["cached_tokens"][i],
                          cols["tokens_computed"][i], cols["onloaded_bytes"][i],
                          cols["offloaded_bytes"][i], int(st.counted[i])])


def search_max_qps(point: ServePoint, w, progress, verify: bool = False) -> tuple:
    """(best trial or None, every trial): double the rate from `qps` until the SLO is missed
    (halve while it is missed), then bisect the bracket search_steps times."""
    trials: List[Trial] = []

    def met(qps: float) -> bool:
        t = point.trial(qps, search=True, verify=verify)
        trials.append(t)
        shown = "stopped early" if t.schedule.stopped_early else \
            f"p{w.slo_percentile:g} {t.slo['slo_latency_ms']:.1f} ms"
        progress(f"max_qps: {qps:g} qps: {shown}, SLO {'met' if t.slo['slo_met'] else 'missed'}")
        return t.slo["slo_met"]

    lo = hi = None
    qps = w.qps
    for _ in range(12):  # the bracket: a rate that meets the SLO and one that misses it
        if met(qps):
            lo = qps
            if hi is not None:
                break
            qps *= 2
        else:
            hi = qps
            if lo is not None or qps / 2 * w.duration_s < w.min_requests:
                break
            qps /= 2
    if lo is not None and hi is not None:
        for _ in range(w.search_steps):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if met(mid) else (lo, mid)
    good = [t for t in trials if t.slo["slo_met"]]
    return (max(good, key=lambda t: t.qps) if good else None), trials


def run(cfg, device: torch.device, progress=print, job_dir=None) -> Measured:
    w = cfg.workload
    point = ServePoint(cfg, device, progress)
    stream = make_stream(cfg, w.qps)
    progress(f"serve: {len(stream.times)} requests ({sum(stream.counted)} counted), "
             f"{'offline' if w.mode == 'offline' else f'{stream.offered_qps:g} qps offered'}, "
             f"max_batch {w.max_batch}, max_wait {w.max_wait_ms:g} ms, {w.policy}")
    point.warm_up(stream)
    problems: List[str] = []
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
    if job_dir is not None:
        write_requests(best, Path(job_dir) / REQUESTS_FILE)
        extra["requests_file"] = REQUESTS_FILE
    lat = latencies_ms(best) or [math.nan]
    flops, nbytes = _work_per_batch(cfg, point.dtype, best)
    batches = [b[2] for b in best.schedule.batches]

    def profiled(i: int):  # the trial's batches again, in order, on an emptied cache
        if i == 0:
            point.server.reset()
        return point.server.serve([point.request(best.stream, j) for j in batches[i]])

    return Measured(
        samples_ms=lat, clocks=clocks.summary(), flops=flops, nbytes=nbytes,
        rule=StopRule(iters=1, min_time_s=0.0, max_time_s=0.0, cv_max=math.inf, min_samples=1),
        dtype=point.dtype, step=profiled, profile_iters=min(len(batches), 8),
        verify=lambda: _verify(point, best), extra=extra, cv_basis="requests",
        per_unit_ms=1e3 * sum(best.service_s) / max(len(best.service_s), 1))


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
    ref.block.kernel = "reference"
    worst = 0.0
    for request, logits, hidden in trial.checked:
        ref_logits, ref_h = rank(ref, [request], device=point.device, return_hidden=True)
        counts = [request.candidates.numel()]
        worst = max(worst, _relative_error(logits, ref_logits.cpu(), counts),
                    _relative_error(hidden, ref_h.cpu(), counts))
    return worst
