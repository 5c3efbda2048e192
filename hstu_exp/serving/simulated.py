"""A serve trial on the simulated clock (workload.clock=simulated): the simulator (`sim`)
drives the real request path, each batch timed on its own, synchronized before and after, with
first-use work (a tune, a compile, a capture met mid-trial) taken off its service time. A
what-if tool over measured service times, labelled simulated wherever its numbers appear
(docs/serving.md says what it assumes and how far it is from the real server)."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from hstu_exp import first_use
from hstu_exp.data.synthetic import Request
from hstu_exp.serving.outcome import REQUEST_COLUMNS
from hstu_exp.serving.path import TIERS
from hstu_exp.serving.population import Stream, UserSequences, make_stream
from hstu_exp.serving.search import max_rate
from hstu_exp.serving.sim import Schedule, eligible, simulate, slo_give_up, token_bucket
from hstu_exp.serving.stats import percentile

REQUESTS_FILE = "requests.csv"


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
    """A point's request path (`RequestPath`, built by the caller) and how to run a trial at a
    given rate on it."""

    def __init__(self, cfg, path, device):
        self.cfg, self.w, self.device, self.path = cfg, cfg.workload, device, path
        self.model, self.graphs = path.model, path.graphs
        self.users = UserSequences(cfg.model, cfg.seed)

    def request(self, stream: Stream, i: int) -> Request:
        return self.users.request(stream.users[i], stream.history[i], stream.candidates[i], i)

    def timed_serve(self, requests, return_hidden=False):
        """(Served, service seconds): the server's wall time for the batch, device included,
        less first-use work inside it (autotuning a new attention shape, a Triton compile,
        capturing a new graph bucket: a server does these at start-up; the trial records them,
        `first_use_ms`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        before = first_use.seconds()
        t = time.perf_counter()
        served = self.path.serve(requests, return_hidden=return_hidden)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return served, time.perf_counter() - t - (first_use.seconds() - before)

    def warm_up(self, stream: Stream, keep: Optional[list] = None) -> None:
        """First-call costs (allocation, kernel selection) off the clock: the stream's first
        users served twice (a miss, then a hit), then the cache is emptied. `keep` (a list) gets
        each answer as (request, scores): a reduced-precision point's gate before the trials."""
        first = eligible(list(range(len(stream.times))), stream.users)[: self.w.max_batch]
        batch = [self.request(stream, i) for i in first]
        for _ in range(2):
            served, _ = self.timed_serve(batch)
            if keep is not None:
                keep.extend(zip(batch, served.by_request(served.logits)))
        self.path.reset()

    def trial(self, qps: float, *, verify: bool = False, search: bool = False) -> Trial:
        w = self.w
        stream = make_stream(self.cfg, qps)
        self.path.reset()
        n = len(stream.times)
        cols = {
            k: [None] * n
            for k in ("tier", "cached_tokens", "tokens_computed", "onloaded_bytes", "offloaded_bytes")
        }
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
                rows = zip(served.by_request(served.logits), served.by_request(served.hidden))
                checked.extend(
                    (requests[j], lg, h) for j, (lg, h) in enumerate(rows) if indices[j] in sample
                )
            service_s.append(seconds)
            return seconds

        buckets = [
            token_bucket(self.cfg.model.num_context + h + c, self.cfg.graph.token_buckets)
            for h, c in zip(stream.history, stream.candidates)
        ]
        give_up = (
            slo_give_up(stream.times, stream.counted, w.slo_ms / 1e3, w.slo_percentile)
            if search or w.stop_on_miss
            else None
        )
        core = self.graphs.core if self.graphs is not None else None
        captured, first = len(core.graphs) if core is not None else 0, first_use.seconds()
        rows = (core.live_rows, core.run_rows) if core is not None else (0, 0)
        schedule = simulate(
            stream.times,
            stream.users,
            buckets,
            serve_batch,
            max_batch=w.max_batch,
            max_wait_s=w.max_wait_ms / 1e3,
            policy=w.policy,
            give_up=give_up,
        )
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


def counted(trial: Trial) -> List[int]:
    """Counted requests that finished, in request order."""
    s, st = trial.schedule, trial.stream
    return [i for i in range(len(st.times)) if st.counted[i] and s.finish[i] is not None]


def latencies_ms(trial: Trial) -> List[float]:
    """Latency (queueing + service) of every counted request that finished, in request order."""
    s, st = trial.schedule, trial.stream
    return [
        (s.finish[i] - st.times[i]) * 1e3
        for i in range(len(st.times))
        if st.counted[i] and s.finish[i] is not None
    ]


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
    out = {
        "offered_qps": st.offered_qps,
        "requests": len(counted),
        "requests_total": len(st.times),
        "achieved_qps": len(counted) / span,
        "candidates_per_s": sum(st.candidates[i] for i in counted) / span,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "p999_ms": percentile(lat, 99.9),
        "queue_p50_ms": percentile(queue, 50),
        "queue_p99_ms": percentile(queue, 99),
        "service_p50_ms": percentile(sorted(1e3 * (b - a) for a, b, _ in mine), 50),
        "batches": len(mine),
        "batch_size_hist": hist,
        "mean_batch_size": sum(len(b[2]) for b in mine) / max(len(mine), 1),
        "busy_fraction": busy / span,
        "stopped_early": s.stopped_early,
        "graph_captures": trial.graph_captures,
        "graph_padding": trial.graph_padding,
        "first_use_ms": trial.first_use_ms,
        **{f"{t}_requests": tiers[t] for t in TIERS},
        **{f"{t}_hit_rate" if t != "miss" else "miss_rate": tiers[t] / n for t in TIERS},
        "cached_tokens": sum(cols["cached_tokens"][i] for i in counted),
        "computed_tokens": sum(cols["tokens_computed"][i] for i in counted),
        "onloaded_bytes": sum(cols["onloaded_bytes"][i] for i in counted),
        "offloaded_bytes": sum(cols["offloaded_bytes"][i] for i in counted),
        "slo_ms": w.slo_ms,
        "slo_percentile": w.slo_percentile,
        **trial.slo,
    }
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
            out.writerow(
                [
                    i,
                    st.users[i],
                    st.times[i],
                    s.start[i],
                    s.finish[i],
                    ms(s.finish[i], st.times[i]),
                    ms(s.start[i], st.times[i]),
                    ms(s.finish[i], s.start[i]),
                    s.batch[i],
                    sizes.get(s.batch[i]),
                    cols["tier"][i],
                    st.history[i],
                    st.candidates[i],
                    cols["cached_tokens"][i],
                    cols["tokens_computed"][i],
                    cols["onloaded_bytes"][i],
                    cols["offloaded_bytes"][i],
                    int(st.counted[i]),
                ]
            )


def search_max_qps(point: ServePoint, w, progress, verify: bool = False) -> tuple:
    """(best trial or None, every trial): double the rate from `qps` until the SLO is missed
    (halve while it is missed), then bisect the bracket search_steps times."""
    trials: List[Trial] = []

    def met(qps: float) -> bool:
        t = point.trial(qps, search=True, verify=verify)
        trials.append(t)
        shown = (
            "stopped early"
            if t.schedule.stopped_early
            else f"p{w.slo_percentile:g} {t.slo['slo_latency_ms']:.1f} ms"
        )
        progress(f"max_qps: {qps:g} qps: {shown}, SLO {'met' if t.slo['slo_met'] else 'missed'}")
        return t.slo["slo_met"]

    # no rate whose counted window holds fewer than min_requests; the trials are the result
    max_rate(met, w.qps, lowest=w.min_requests / w.duration_s, steps=w.search_steps)
    good = [t for t in trials if t.slo["slo_met"]]
    return (max(good, key=lambda t: t.qps) if good else None), trials
