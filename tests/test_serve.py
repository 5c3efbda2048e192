"""workload=serve on the simulated clock (the discrete-event simulator; the real server and
LoadGen: test_serve_real.py): the arrival process, the scheduler, the serving layer's
accounting, the CLI's smoke sweep (no request lost or served twice, causal latencies, tier
counts that add up, outputs equal to a full recompute) and bad input.

CPU timing on a shared machine: the CLI runs get OMP_NUM_THREADS=1 (two OpenMP threads fighting
other processes for two cores make a 5 ms batch take 300 ms)."""

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hstu_exp
from test_e2e import assert_matches, make_cache, make_model, random_users, request

from hstu_exp.data.arrivals import TraceError, histories, poisson_arrivals, read_trace
from hstu_exp.kvcache.manager import KVCacheManager
from hstu_exp.serving.path import RequestPath, apportion
from hstu_exp.serving.population import UserSequences
from hstu_exp.serving.sim import pick_batch, simulate
from hstu_exp.serving.stats import percentile, violations_to_miss

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SIMULATED = "workload.clock=simulated"


# -- arrivals ----------------------------------------------------------------------------------


def arrivals(**over):
    kw = dict(
        qps=50.0,
        horizon_s=200.0,
        num_users=100,
        user_skew=1.0,
        new_user_rate=0.1,
        items_per_return=4,
        max_items=64,
        num_candidates=8,
        candidates_max=16,
        seed=random.randrange(1 << 30),
    )
    kw.update(over)
    return poisson_arrivals(**kw), kw


def within(observed, expected, sd, k=5.0):
    assert abs(observed - expected) < k * sd, (observed, expected, sd)


def test_poisson_arrivals_have_the_asked_rate_popularity_and_mix():
    a, kw = arrivals(max_items=1 << 30)  # no history fills up: every user keeps its id
    n = len(a)
    lam = kw["qps"] * kw["horizon_s"]
    within(n, lam, math.sqrt(lam))  # a Poisson count
    times = np.array([x.time_s for x in a])
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < kw["horizon_s"]
    gaps = np.diff(times)
    # exponential gaps: P(gap > mean) = 1/e, and their mean is 1/qps
    within(float(np.mean(gaps > 1 / kw["qps"])), math.exp(-1), math.sqrt(0.25 / gaps.size))
    within(float(gaps.mean()), 1 / kw["qps"], (1 / kw["qps"]) / math.sqrt(gaps.size))
    # new users: a fraction new_user_rate of arrivals, ids past the population, each once
    new = [x for x in a if x.user >= kw["num_users"]]
    p = kw["new_user_rate"]
    within(len(new), p * n, math.sqrt(n * p * (1 - p)))
    assert len({x.user for x in new}) == len(new)
    # Zipf(1): user 0 is drawn 1 / H(100) of the returning arrivals, user 1 half as often
    old = [x.user for x in a if x.user < kw["num_users"]]
    h = sum(1 / k for k in range(1, kw["num_users"] + 1))
    for user, share in ((0, 1 / h), (1, 0.5 / h)):
        count = old.count(user)
        within(count, share * len(old), math.sqrt(len(old) * share * (1 - share)))
    cands = [x.candidates for x in a]
    assert min(cands) == 8 and max(cands) == 16


def test_uniform_popularity_and_the_same_seed_gives_the_same_arrivals():
    a, kw = arrivals(user_skew=0.0, new_user_rate=0.0, horizon_s=100.0, max_items=1 << 30)
    counts = np.bincount([x.user for x in a], minlength=kw["num_users"])
    expected = len(a) / kw["num_users"]
    assert abs(counts - expected).max() < 6 * math.sqrt(expected)
    again, _ = arrivals(**kw)
    assert again == a


def test_histories_grow_by_each_return_and_a_full_one_makes_way_for_a_new_user():
    a, kw = arrivals(horizon_s=20.0, max_items=30)
    items = histories(a, kw["max_items"])
    last, renewed = {}, 0
    for x, h in zip(a, items):
        if x.user in last:  # a return adds items_per_return, never past max_items
            assert h == last[x.user] + kw["items_per_return"] <= kw["max_items"]
            renewed += x.user >= kw["num_users"]
        elif x.user >= kw["num_users"]:  # a new user, or one in a full user's place: one return
            assert h == kw["items_per_return"]
        else:  # the population's first request brings its history so far
            assert 1 <= h <= kw["max_items"]
        last[x.user] = h
    assert renewed > 0  # users in a full user's place came back


def test_the_histories_keep_their_distribution_over_a_long_run():
    """Work a request asks for does not drift with the run's length: the mean history of the
    last quarter of a 200 s run is that of the first (with histories capped instead of renewed,
    it would climb to max_items)."""
    a, kw = arrivals(max_items=64, items_per_return=4)
    items = np.array(histories(a, kw["max_items"]))
    quarter = len(items) // 4
    first, last = items[:quarter].mean(), items[-quarter:].mean()
    assert abs(last - first) < 0.1 * first, (first, last)
    assert last < 0.6 * kw["max_items"], last


def test_a_trace_is_read_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "t.csv"
    good.write_text("time,user,new_items,candidates\n0.0,5,10,3\n0.5,7,4,2\n0.5,5,2,3\n")
    a = read_trace(good)
    assert [(x.time_s, x.user, x.new_items, x.candidates) for x in a] == [
        (0.0, 5, 10, 3),
        (0.5, 7, 4, 2),
        (0.5, 5, 2, 3),
    ]
    assert histories(a, 11) == [10, 4, 11]
    bad = {
        "time,user,new_items,candidates,extra\n0,1,2,3,4\n": "line 1: unknown column 'extra'",
        "time,user,candidates\n0,1,3\n": "line 1: missing column 'new_items'",
        "time,user,new_items,candidates\n0,1,2,3\n-1,1,2,3\n": "line 3: time=-1 is negative",
        "time,user,new_items,candidates\n0,1,2,3\n1,1,-2,3\n": (
            "line 3: user 1's history decreases (new_items=-2)"
        ),
        "time,user,new_items,candidates\n0,1,x,3\n": "line 2: new_items='x' is not an integer",
        "time,user,new_items,candidates\n2,1,2,3\n1,2,2,3\n": (
            "line 3: time=1 is before the previous line's 2"
        ),
    }
    for text, message in bad.items():
        good.write_text(text)
        with pytest.raises(TraceError) as err:
            read_trace(good)
        assert str(err.value).startswith(message), (str(err.value), message)


def test_a_requests_candidates_depend_on_its_index_alone_and_its_tokens_on_its_user():
    """UserSequences: request k's candidates are the same whatever order the indices come in
    (blocks drawn, dropped and drawn again), in the item vocabulary; a user's requests are
    prefixes of one sequence; after construction no config is read (the hot path's cost)."""

    class Model:
        reads = 0
        values = dict(
            num_context=3, max_history=64, max_candidates=40, context_vocab=5, item_vocab=50,
            action_vocab=7,
        )  # fmt: skip

        def __getattr__(self, name):
            Model.reads += 1
            return Model.values[name]

    users = UserSequences(Model(), seed=3, block=8)
    reads = Model.reads
    indices = list(range(100)) + [5, 3 * 8 + 1, 10**12 + 7]
    first = {k: users.request(k % 7, 2 * (k % 30), 40, k) for k in indices}
    assert Model.reads == reads  # nothing read of the config per request
    again = UserSequences(Model(), seed=3, block=8)
    for k in random.Random(0).sample(indices, len(indices)):  # another order: other evictions
        count = 1 + k % 40
        cands = again.request(0, 0, count, k).candidates
        assert torch.equal(cands, first[k].candidates[:count])
    every = torch.stack([first[k].candidates for k in range(96)])
    assert every.min() >= 0 and every.max() < 50 and every.unique().numel() == 50
    assert len({tuple(first[k].candidates.tolist()) for k in range(100)}) == 100
    other = UserSequences(Model(), seed=4, block=8).request(0, 0, 40, 0).candidates
    assert not torch.equal(other, first[0].candidates)
    long, short = users.request(2, 60, 1, 1), users.request(2, 10, 1, 2)
    assert long.num_context == 3 and long.seq_len == 63 and short.seq_len == 13
    assert torch.equal(long.ids[:13], short.ids) and torch.equal(long.kinds[:13], short.kinds)
    with pytest.raises(ValueError, match="41 candidates, model.max_candidates=40"):
        users.request(0, 0, 41, 0)


# -- the scheduler -----------------------------------------------------------------------------


def test_a_hand_worked_schedule():
    """max_batch 2, max_wait 5 ms, 10 ms a batch. t=0: user a waits for a fuller batch; user b
    at 1 ms fills it. a's second request (2 ms) waits for the first to finish (11 ms), then
    goes at once (its 5 ms are up). d at 40 ms waits its 5 ms for company, then goes alone."""
    times, users = [0.0, 0.001, 0.002, 0.040], ["a", "b", "a", "d"]
    s = simulate(times, users, [0] * 4, lambda idx: 0.010, max_batch=2, max_wait_s=0.005, policy="fifo")
    assert [b[2] for b in s.batches] == [[0, 1], [2], [3]]
    assert s.start == pytest.approx([0.001, 0.001, 0.011, 0.045])
    assert s.finish == pytest.approx([0.011, 0.011, 0.021, 0.055])


@pytest.mark.parametrize("policy", ["fifo", "length_aware"])
def test_random_schedules_serve_everyone_once_causally(policy):
    rng = random.Random()
    n, max_batch, wait = 300, 4, 0.004
    times = sorted(rng.uniform(0, 1.0) for _ in range(n))
    users = [rng.randrange(12) for _ in range(n)]
    buckets = [rng.randrange(4) for _ in range(n)]
    served = []

    def serve(idx):
        served.append(list(idx))
        return 0.001 + 0.002 * len(idx) * rng.random()

    s = simulate(times, users, buckets, serve, max_batch=max_batch, max_wait_s=wait, policy=policy)
    flat = [i for b in served for i in b]
    assert sorted(flat) == list(range(n))  # none lost, none twice
    prev_finish, last_of = 0.0, {}
    for k, (start, finish, idx) in enumerate(s.batches):
        assert idx == served[k] and 1 <= len(idx) <= max_batch
        assert len({users[i] for i in idx}) == len(idx)  # one request in flight per user
        assert start >= prev_finish - 1e-12  # one batch at a time
        assert all(times[i] <= start for i in idx)
        # never idle past the deadline of the oldest request in the batch
        assert start <= max(prev_finish, min(times[i] for i in idx) + wait) + 1e-12
        if policy == "length_aware":  # nothing longer than the oldest member's bucket
            assert all(buckets[i] <= buckets[idx[0]] for i in idx)
        for i in idx:
            assert s.finish[i] >= s.start[i] >= times[i]
            assert s.batch[i] == k
            if users[i] in last_of:  # a user's requests in order, never overlapping
                j = last_of[users[i]]
                assert j < i and s.start[i] >= s.finish[j]
            last_of[users[i]] = i
        prev_finish = finish


def test_length_aware_takes_the_oldest_bucket_then_smaller_ones():
    assert pick_batch([0, 1, 2, 3, 4], [2, 3, 2, 1, 2], 3, "length_aware") == [0, 2, 4]
    assert pick_batch([0, 1, 2, 3], [2, 3, 1, 2], 4, "length_aware") == [0, 3, 2]
    assert pick_batch([0, 1, 2, 3], [2, 3, 1, 2], 2, "fifo") == [0, 1]


def test_the_early_stop_only_fires_when_the_percentile_is_surely_missed():
    rng = random.Random()
    for _ in range(200):
        n, p = rng.randint(1, 60), rng.choice([50, 90, 99, 99.9, 100])
        k = violations_to_miss(n, p)
        slo = 1.0
        lat = sorted([0.5] * (n - k) + [2.0] * k)  # k over: the percentile must miss
        assert percentile(lat, p) > slo
        if k > 1:  # one fewer over can still meet it (the others fast, the over ones barely)
            lat = sorted([0.0] * (n - k + 1) + [slo + 1e-9] * (k - 1))
            assert percentile(lat, p) <= slo
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5


# -- the serving layer -------------------------------------------------------------------------


def test_apportion_sums_exactly():
    for _ in range(100):
        w = [random.randrange(0, 50) for _ in range(random.randint(1, 6))]
        total = random.randrange(0, 10_000)
        out = apportion(total, w)
        assert sum(out) == total and all(x >= 0 for x in out)
        if sum(w):
            assert all(x == 0 for x, wi in zip(out, w) if wi == 0)


@pytest.mark.parametrize("kind", ["paged", "paged_offload"])
def test_server_tiers_and_bytes_add_up_and_outputs_match_a_full_recompute(kind):
    model = make_model()
    manager = KVCacheManager(make_cache(kind, num_pages=20, host_pages=28))
    server = RequestPath(model, device="cpu", manager=manager)
    seqs, history = random_users(9), [0] * 9
    seen_tiers = set()
    for _ in range(40):
        users = random.sample(range(9), random.randint(1, 2))  # 2 x 9 pages fit the pool
        batch = []
        for u in users:
            history[u] = min(history[u] + random.randint(1, 12), 64)
            batch.append(request(seqs, u, history[u]))
        served = server.serve(batch)
        assert_matches(model, batch, served.logits)  # float64 oracle of test_e2e
        planned = manager.batches[-1]
        by_tier = {
            t: sum(c for c, x in zip(served.cached, served.tiers) if x == t)
            for t in ("gpu", "host", "miss")
        }
        assert by_tier == {
            "gpu": planned["gpu_hit_tokens"],
            "host": planned["host_hit_tokens"],
            "miss": 0,
        }
        assert all((c == 0) == (t == "miss") for c, t in zip(served.cached, served.tiers))
        assert served.computed == [
            r.seq_len - c + r.candidates.numel() for r, c in zip(batch, served.cached)
        ]
        assert sum(served.onloaded_bytes) == planned["onloaded_bytes"]
        assert sum(served.offloaded_bytes) == planned["offloaded_bytes"]
        seen_tiers.update(served.tiers)
    assert seen_tiers == ({"gpu", "host", "miss"} if kind == "paged_offload" else {"gpu", "miss"})


# -- the CLI -----------------------------------------------------------------------------------


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def check_requests(record, rows, *, qps=None, duration=None):
    """requests.csv against its record: every request once, causal times, batches consistent,
    tier counts adding up, the record's numbers recomputed from the file."""
    assert [int(r["request"]) for r in rows] == list(range(len(rows)))
    assert len(rows) == record["requests_total"]
    batches = {}
    for r in rows:
        arrival, start, finish = float(r["arrival_s"]), float(r["start_s"]), float(r["finish_s"])
        assert finish >= start >= arrival >= 0
        batches.setdefault(int(r["batch"]), []).append(r)
    for members in batches.values():
        assert len({m["start_s"] for m in members}) == 1
        assert len({m["user"] for m in members}) == len(members)
        assert all(int(m["batch_size"]) == len(members) for m in members)
    counted = [r for r in rows if r["counted"] == "1"]
    assert record["requests"] == len(counted)
    tiers = {t: sum(r["tier"] == t for r in counted) for t in ("gpu", "host", "miss")}
    assert sum(tiers.values()) == len(counted)
    assert (record["gpu_requests"], record["host_requests"], record["miss_requests"]) == (
        tiers["gpu"],
        tiers["host"],
        tiers["miss"],
    )
    lat = sorted(float(r["latency_ms"]) for r in counted)
    assert record["p99_ms"] == pytest.approx(percentile(lat, 99), rel=1e-6)
    assert record["slo_met"] == (percentile(lat, record["slo_percentile"]) <= record["slo_ms"])
    assert record["onloaded_bytes"] == sum(int(r["onloaded_bytes"]) for r in counted)
    if qps is not None:  # counted arrivals: a Poisson count of mean qps * duration
        within(len(counted), qps * duration, math.sqrt(qps * duration))
    return tiers


def test_serve_smoke_sweep_through_the_cli(tmp_path):
    out = hstu_exp(
        "-m", "experiment=serve_smoke", SIMULATED, f"hydra.sweep.dir={tmp_path}", env=ONE_THREAD
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["cache"] for r in records) == ["none", "paged", "paged_offload"]
    for r in records:
        assert r["status"] == "ok" and r["workload"] == "serve" and r["qps"] == 20.0
        assert r["mode"] == "online-fifo" and r["batch_size"] == 4
        assert r["clock"] == "simulated" and r.get("verdict") is None  # None is not written
        assert r["max_rel_error"] < 1e-4  # sampled requests vs a float32 full recompute
        tiers = check_requests(r, read_csv(Path(r["job_dir"]) / "requests.csv"), qps=20.0, duration=3.0)
        if r["cache"] == "none":
            assert tiers["gpu"] == tiers["host"] == 0 and r["onloaded_bytes"] == 0
        else:
            assert tiers["gpu"] > 0
        if r["cache"] == "paged_offload":
            assert tiers["host"] > 0 and r["onloaded_bytes"] > 0
        assert sum(r["batch_size_hist"]) == r["batches"]
        assert 0 < r["busy_fraction"] <= 1 + 1e-9
    # the close-out draws the serve figures a one-rate sweep supports
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} == {
        "serve_latency_cdf.png",
        "serve_cache.png",
    }


def test_a_trace_drives_the_arrivals_and_the_search_finds_a_rate(tmp_path):
    trace = tmp_path / "trace.csv"
    rows = ["time,user,new_items,candidates"]
    rng = random.Random(1)
    for i in range(40):
        rows.append(f"{i * 0.05:.3f},{rng.randrange(6)},{rng.randint(1, 5)},{rng.randint(1, 8)}")
    trace.write_text("\n".join(rows) + "\n")
    out = hstu_exp(
        "experiment=serve_smoke",
        SIMULATED,
        "cache=paged_offload",
        f"workload.trace={trace}",
        "workload.warmup_s=0.2",
        "workload.duration_s=1.8",
        "workload.min_requests=10",
        f"hydra.run.dir={tmp_path / 'run'}",
        env=ONE_THREAD,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text())
    got = read_csv(tmp_path / "run" / "requests.csv")
    check_requests(record, got)
    assert [(float(r["arrival_s"]), int(r["user"]), int(r["candidates"])) for r in got] == [
        (float(t), int(u), int(c)) for t, u, _, c in (x.split(",") for x in rows[1:])
    ]
    assert record["qps"] is None and record["max_rel_error"] < 1e-4
    # the trace's own candidates and its name are in the record, not the config's 8..16
    assert (record["num_candidates"], record["candidates_max"]) == (
        min(int(x.split(",")[3]) for x in rows[1:]),
        max(int(x.split(",")[3]) for x in rows[1:]),
    )
    assert record["trace"] == str(trace)

    out = hstu_exp(
        "experiment=serve_smoke",
        SIMULATED,
        "cache=paged",
        "workload.search=max_qps",
        "workload.qps=40",
        "workload.duration_s=1",  # each trial simulates its own stream: 1 s of it, not serve_smoke's 3
        "workload.search_steps=2",
        "workload.slo_ms=60",
        "verify=false",
        f"hydra.run.dir={tmp_path / 'search'}",
        env=ONE_THREAD,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "search" / "results.jsonl").read_text())
    assert record["mode"] == "max_qps-fifo" and record["slo_met"]
    tried = dict(zip(record["search_qps"], record["search_slo_met"]))
    assert record["max_qps"] == max(q for q, met in tried.items() if met)
    assert not all(tried.values())  # the search found a rate that misses, and stopped there
    assert min(q for q, met in tried.items() if not met) > record["max_qps"]


def write_trace(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return f"workload.trace={path}"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["workload.qps=0"], "workload.qps=0: must be positive"),
        (["workload.qps=-3"], "workload.qps=-3: must be positive"),
        (["workload.slo_percentile=0"], "workload.slo_percentile=0: must be in (0, 100]"),
        (["workload.slo_percentile=100.5"], "workload.slo_percentile=100.5: must be in (0, 100]"),
        (["workload.max_batch=32"], "workload.max_batch=32: more than the model's max_batch=16"),
        (
            ["graph=cudagraph", "graph.batch_buckets=[1,2]"],
            "workload.max_batch=4: more than the largest graph bucket (graph.batch_buckets=[1, 2])",
        ),
        (
            ["trace:time,user,new_items,candidates,region\n0,1,2,3,eu\n"],
            "line 1: unknown column 'region'",
        ),
        (["trace:time,user,new_items,candidates\n-0.5,1,2,3\n"], "line 2: time=-0.5 is negative"),
        (
            ["trace:time,user,new_items,candidates\n0,1,2,3\n0.1,1,-1,3\n"],
            "line 3: user 1's history decreases (new_items=-1)",
        ),
        (
            ["workload.duration_s=0.5"],
            "workload.duration_s=0.5: about 10 requests arrive in it, "
            "fewer than workload.min_requests=15",
        ),
        (
            ["trace:time,user,new_items,candidates\n0,1,2,3\ninf,1,2,3\n"],
            "line 3: time=inf is not a finite number of seconds",
        ),
        (
            ["trace:time,user,new_items,candidates\n0,1,2,3\nnan,1,2,3\n"],
            "line 3: time=nan is not a finite number of seconds",
        ),
        (["workload.trace=''"], "workload.trace='': empty: name a trace CSV"),
        (
            ["trace:time,user,new_items,candidates\n0,1,2,3\n0.5,2,2,100000\n"],
            "a request of 100000 candidates, more than the model's max_candidates=64",
        ),
        (
            ["cache.num_pages=12"],
            "cache.num_pages=12: the KV pool holds fewer pages than one batch "
            "needs (4 requests x 4 pages of 32 tokens for 128 tokens)",
        ),
        (
            ["workload.batch_size=2"],
            "workload.batch_size=2: workload=serve forms batches of up to workload.max_batch=4",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, overrides, message):
    args = [
        write_trace(tmp_path, o[len("trace:") :]) if o.startswith("trace:") else o for o in overrides
    ]
    run_dir = tmp_path / "run"
    out = hstu_exp(
        "experiment=serve_smoke", SIMULATED, "cache=paged_offload", *args, f"hydra.run.dir={run_dir}"
    )
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hstu-exp: error: "), out.stderr
    assert message in lines[0], lines[0]
    assert not run_dir.exists()  # nothing written


def test_offline_mode_serves_back_to_back_and_stop_on_miss_bounds_a_run(tmp_path):
    out = hstu_exp(
        "experiment=serve_smoke",
        SIMULATED,
        "cache=paged",
        "workload.mode=offline",
        "verify=false",
        f"hydra.run.dir={tmp_path / 'offline'}",
        env=ONE_THREAD,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "offline" / "results.jsonl").read_text())
    rows = read_csv(tmp_path / "offline" / "requests.csv")
    check_requests(record, rows)
    assert record["mode"] == "offline-fifo" and record["qps"] == 20.0
    assert all(float(r["arrival_s"]) == 0 for r in rows)  # every request there at once
    spans = sorted({(float(r["start_s"]), float(r["finish_s"])) for r in rows})
    assert spans[0][0] == 0  # the server starts at once and never idles
    assert all(b[0] == pytest.approx(a[1], abs=1e-12) for a, b in zip(spans, spans[1:]))
    assert record["busy_fraction"] == pytest.approx(1.0)
    assert record["achieved_qps"] > record["offered_qps"]  # the tiny model outruns 20 qps

    out = hstu_exp(
        "experiment=serve_smoke",
        SIMULATED,
        "cache=paged",
        "workload.stop_on_miss=true",
        "workload.slo_ms=0.01",
        "verify=false",
        f"hydra.run.dir={tmp_path / 'miss'}",
        env=ONE_THREAD,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "miss" / "results.jsonl").read_text())
    rows = read_csv(tmp_path / "miss" / "requests.csv")
    assert record["stopped_early"] and not record["slo_met"] and record["valid"] is False
    assert "stopped early" in record["invalid_reason"]
    assert any(r["finish_s"] == "" for r in rows)  # the rest was never served


@pytest.mark.parametrize(
    "experiment", ["serve_smoke", "serve_qps", "serve_slo", "dlrmv3_server", "dlrmv3_offline"]
)
def test_the_presets_compose_and_every_grid_point_is_possible(experiment):
    """Each preset's grid validates and no point is refused (device and kernel set for this
    machine: the GPU presets run on the H200)."""
    import itertools

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hstu_exp.cli import CONF_DIR
    from hstu_exp.config import point_problem, validate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = [f"experiment={experiment}", "device=cpu", "kernel=reference"]
        params = OmegaConf.select(
            compose("config", overrides=base, return_hydra_config=True), "hydra.sweeper.params"
        )
        keys = list(params or {})  # the dlrmv3 presets are single points
        for values in itertools.product(*(str(params[k]).split(",") for k in keys)):
            cfg = compose("config", overrides=base + [f"{k}={v}" for k, v in zip(keys, values)])
            validate(cfg)
            assert cfg.workload.name == "serve"
            assert point_problem(cfg) is None, (values, point_problem(cfg))


def test_first_use_work_is_kept_off_the_service_clock_and_counted_once():
    """Autotuning a new shape or capturing a new graph bucket inside a batch (here: 0.3 s of
    first-use work, nested as a tune inside a capture) is not service time; the rest is."""
    import time

    import torch

    from hstu_exp import first_use
    from hstu_exp.serving.simulated import ServePoint

    model = make_model()
    server = RequestPath(model, device="cpu")
    serve = server.serve

    def serve_with_a_first_use(requests, **kw):
        with first_use.first_use():
            time.sleep(0.2)
            with first_use.first_use():  # nested: counted once, inside the outer block
                time.sleep(0.1)
        time.sleep(0.05)  # ordinary service time stays on the clock
        return serve(requests, **kw)

    point = ServePoint.__new__(ServePoint)  # the timing method alone, without a config
    point.device, point.path = torch.device("cpu"), server
    batch = [request(random_users(2), 0, 8)]
    _, plain = point.timed_serve(batch)
    server.serve = serve_with_a_first_use
    before = first_use.seconds()
    _, seconds = point.timed_serve(batch)
    assert 0.3 <= first_use.seconds() - before < 0.3 + 0.25
    assert 0.05 <= seconds < 0.05 + plain + 0.2


def test_triton_compiles_count_as_first_use_once():
    """Triton calls its cache hook before a JIT compile and its post-compile hook after: the
    time between counts as first-use work, except inside a first-use block (a compile during
    autotuning is already counted there)."""
    import time

    from triton import knobs

    from hstu_exp import first_use

    saved = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    try:
        knobs.runtime.jit_cache_hook = knobs.runtime.jit_post_compile_hook = None
        assert first_use.count_triton_compiles()
        before = first_use.seconds()
        assert knobs.runtime.jit_cache_hook(key="k") is None  # None: Triton goes on to compile
        time.sleep(0.1)
        knobs.runtime.jit_post_compile_hook(key="k")
        assert 0.1 <= first_use.seconds() - before < 0.3
        before = first_use.seconds()
        with first_use.first_use():
            knobs.runtime.jit_cache_hook(key="k")
            time.sleep(0.1)
            knobs.runtime.jit_post_compile_hook(key="k")
        assert 0.1 <= first_use.seconds() - before < 0.3  # once, not twice
        knobs.runtime.jit_cache_hook = print  # somebody else's hook: left alone
        assert not first_use.count_triton_compiles()
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = saved


def test_the_published_h200_search_sweep_redraws_from_its_records(tmp_path):
    """serve_slo as published (search points only: no offered rate in the records) redraws its
    figures from results.csv / results.jsonl alone."""
    import shutil
    import subprocess
    import sys

    from helpers import ROOT

    src = ROOT / "outputs" / "published" / "serve_slo_h200"
    for name in ("results.csv", "results.jsonl"):
        shutil.copy(src / name, tmp_path / name)
    redraw = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot_sweep.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert redraw.returncode == 0, redraw.stderr[-2000:]
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} == {
        "serve_max_qps.png",
        "serve_latency_cdf.png",
        "serve_cache.png",
    }
