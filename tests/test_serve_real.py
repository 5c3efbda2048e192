"""workload=serve on the real clock: the batcher's timers, the worker's pipelining, LoadGen
driving the real server (no query lost or answered twice, scores equal to a full recompute,
each user's requests in order and causal), a first-use event failing the run, and bad input
and Ctrl-C through the CLI. Everything runs for real on the CPU: the tiny model, the request
path, threads on the wall clock, MLPerf LoadGen (mlcommons-loadgen)."""

import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
from helpers import ROOT, hstu_exp
from test_e2e import assert_matches, make_cache, make_model, random_users, request
from test_serve import read_csv

from hstu_exp import first_use
from hstu_exp.kvcache.manager import KVCacheManager
from hstu_exp.serving import interpreter
from hstu_exp.serving.batcher import Batcher, Pending
from hstu_exp.serving.loadgen_sut import LoadGenTest
from hstu_exp.serving.path import RequestPath
from hstu_exp.serving.server import FirstUseDuringRun, RealServer
from hstu_exp.serving.sim import eligible, pick_batch
from hstu_exp.serving.worker import WORKER_PHASES, Worker, busy_fraction
from hstu_exp.stats import early_stopping_queries

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def pending(index, user, arrival, bucket=0):
    return Pending(query_id=index, index=index, user=user, bucket=bucket, arrival=arrival)


# -- the batcher -------------------------------------------------------------------------------


def test_a_lone_request_waits_max_wait_then_goes_and_a_full_batch_goes_at_once():
    batcher = Batcher(max_batch=4, max_wait_s=0.15, policy="fifo").start()
    try:
        t = time.perf_counter()
        batcher.put([pending(0, "a", t)])
        batch = batcher.take()
        waited = time.perf_counter() - t
        assert [p.index for p in batch] == [0]
        assert 0.15 <= waited < 0.15 + 0.1  # the timer, not sooner, not much later
        batcher.release(batch)

        t = time.perf_counter()
        batcher.put([pending(i, u, t) for i, u in enumerate("bcde", start=1)])
        batch = batcher.take()
        assert [p.index for p in batch] == [1, 2, 3, 4]
        assert time.perf_counter() - t < 0.1  # max_batch eligible: no waiting for the timer
    finally:
        batcher.close()


def test_one_request_per_user_in_flight_and_length_aware_groups_buckets():
    batcher = Batcher(max_batch=3, max_wait_s=0.0, policy="length_aware").start()
    try:
        t = time.perf_counter()
        # user a twice; buckets: the oldest's bucket 2 first, then smaller ones, never larger
        batcher.put(
            [
                pending(0, "a", t, 2),
                pending(1, "a", t, 2),
                pending(2, "b", t, 3),
                pending(3, "c", t, 1),
                pending(4, "d", t, 2),
            ]
        )
        first = batcher.take()
        assert [p.index for p in first] == [0, 4, 3]
        second = batcher.take()
        assert [p.index for p in second] == [2]  # a's second request waits for its first
        assert batcher.take(block=False) is None
        batcher.release(first)
        assert [p.index for p in batcher.take()] == [1]
    finally:
        batcher.close()


def test_close_drains_what_waits_without_waiting_for_company():
    batcher = Batcher(max_batch=8, max_wait_s=60.0, policy="fifo").start()
    batcher.put([pending(0, "a", time.perf_counter())])
    closer = threading.Thread(target=batcher.close)
    closer.start()
    batch = batcher.take()
    assert [p.index for p in batch] == [0]
    batcher.release(batch)
    closer.join(5)
    assert not closer.is_alive() and batcher.take() is None


@pytest.mark.parametrize("policy", ["fifo", "length_aware"])
def test_a_deep_queue_forms_the_batches_the_simulators_rule_forms(policy):
    """Thousands waiting from a few hundred users (a saturated server): every batch is the one
    `sim.eligible` + `sim.pick_batch` choose over the whole queue, in that order. Each batch is
    released only once the next is formed (when one can be), so the users busy at each
    formation are known."""
    rng = random.Random(7)
    items = [pending(i, rng.randrange(300), 0.0, rng.randrange(4)) for i in range(3000)]
    users, buckets = [p.user for p in items], [p.bucket for p in items]
    batcher = Batcher(max_batch=8, max_wait_s=0.0, policy=policy)
    batcher.put(items)
    waiting, busy = list(range(len(items))), set()
    batcher.start()
    try:
        while waiting:
            ready = [i for i in eligible(waiting, users) if users[i] not in busy]
            expected = pick_batch(ready, buckets, 8, policy)
            batch = batcher.take(block=False, timeout=10)
            assert batch is not None and [p.index for p in batch] == expected
            taken = set(expected)
            waiting = [i for i in waiting if i not in taken]
            busy = {p.user for p in batch}
            if any(users[i] not in busy for i in waiting):  # the next forms with these busy
                deadline = time.time() + 10
                while not batcher.has_batch() and time.time() < deadline:
                    time.sleep(0.0005)
                assert batcher.has_batch()
            else:  # the next forms only after this release, with nobody busy
                busy = set()
            batcher.release(batch)
    finally:  # close() drains: whatever is left (after a failure) is taken here

        def drain():
            while (left := batcher.take(block=False, timeout=2)) is not None:
                batcher.release(left)

        closer = threading.Thread(target=batcher.close, daemon=True)
        closer.start()
        drain()
        closer.join(10)


# -- the worker --------------------------------------------------------------------------------


def test_the_worker_pipelines_answers_each_request_once_and_matches_a_recompute():
    """Batches ready before the worker starts: it launches batch i+1 (its host work) before it
    waits for batch i. Every request is answered once, with scores equal to a float64
    recompute of the user's whole sequence, through cache hits and misses."""
    model = make_model()
    path = RequestPath(
        model, device="cpu", manager=KVCacheManager(make_cache("paged", num_pages=96, host_pages=0))
    )
    seqs = random_users(12)
    specs = [(u, 8 + u) for u in range(12)] + [(u, 20 + u) for u in range(12)]  # then returns
    answers, lock = {}, threading.Lock()
    batcher = Batcher(max_batch=3, max_wait_s=0.0, policy="fifo")

    def answer(batch, scores):
        with lock:
            for p, s in zip(batch, scores):
                assert p.index not in answers  # never answered twice
                answers[p.index] = s

    requests = [request(seqs, u, h) for u, h in specs]
    # The first three batches return only once the batcher has formed the next one, as a device
    # still busy with them would give it time to: on a loaded CPU the batcher thread may
    # otherwise not have run yet, and the worker rightly waits first.
    serve, launched = path.serve, []

    def serve_with_the_next_batch_formed(batch_requests, **kw):
        served = serve(batch_requests, **kw)
        launched.append(len(batch_requests))
        deadline = time.time() + 10
        while len(launched) <= 3 and not batcher.has_batch() and time.time() < deadline:
            time.sleep(0.001)
        return served

    path.serve = serve_with_the_next_batch_formed
    worker = Worker(
        path, batcher, request=lambda p: requests[p.index], answer=answer, device="cpu", sample=range(24)
    )
    batcher.put([pending(i, u, time.perf_counter()) for i, (u, _) in enumerate(specs)])
    batcher.start()
    deadline = time.time() + 10
    while not batcher.has_batch() and time.time() < deadline:  # the first batch formed
        time.sleep(0.001)
    worker.start()
    deadline = time.time() + 60
    while len(answers) < 24 and time.time() < deadline:
        time.sleep(0.01)
    batcher.close()
    worker.join()
    assert worker.error is None
    assert sorted(answers) == list(range(24))  # none lost
    order = worker.log.order
    launches = [k for kind, k in order if kind == "launch"]
    assert launches == list(range(8))  # 24 requests, 3 a batch
    for k in range(3):  # the first pass: batch k+1 is always ready, so it goes before the wait
        assert order.index(("launch", k + 1)) < order.index(("wait", k)), order
    assert all(order.index(("launch", k)) < order.index(("wait", k)) for k in launches)
    for i, r in enumerate(requests):
        assert_matches(model, [r], answers[i])
    rows = worker.log.rows
    assert all(rows[i]["tier"] == "gpu" for i in range(12, 24)), [rows[i]["tier"] for i in rows]
    assert len(worker.log.checked) == 24  # sample=every request: all kept for verification


def test_busy_fraction_is_the_union_of_device_spans():
    assert busy_fraction([(0, 2), (1, 3), (5, 6)], 10) == pytest.approx(0.4)
    assert busy_fraction([], 10) == 0
    assert busy_fraction([(0, 1)], 0) is None


# -- LoadGen and the real server ---------------------------------------------------------------


class Cycle:
    """A population for the direct tests: users 0..n-1 in turn, histories growing."""

    def __init__(self, n, start=8, step=4):
        self.n, self.k, self.history, self.step, self.start = n, 0, {}, step, start

    def next(self):
        user = self.k % self.n
        self.k += 1
        self.history[user] = min(self.history.get(user, self.start - self.step) + self.step, 60)
        return user, self.history[user], 3


class Sequences:
    def __init__(self, n):
        self.seqs = random_users(n)

    def request(self, user, history, candidates, index):
        return request(self.seqs, user, history)


class _Node:
    pass


def _cycle():
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.mark.parametrize("freeze", [True, False])
def test_the_collector_is_frozen_during_a_run_and_every_pass_timed(freeze):
    kept = [[i] for i in range(20_000)]  # live objects made before the run
    dead = _cycle()  # garbage made before the run: only a collection frees a cycle
    gc.disable()  # no automatic pass between the lines below
    try:
        with interpreter.timed_collections(freeze) as pauses:
            # freezing collects first, so the run starts without the old garbage
            assert (dead() is None) == freeze
            assert (gc.get_freeze_count() >= len(kept)) == freeze
            gc.collect()  # a full pass inside the run is timed
            assert dead() is None
        assert gc.get_freeze_count() == 0  # thawed when the run ends
        gc.collect()  # after the run: not recorded
    finally:
        gc.enable()
    assert [gen for gen, _, _ in pauses] == [2] and pauses[0][1] > 0
    assert pauses[0][2] <= time.perf_counter()  # when it started, on the run's clock
    s = interpreter.summary(pauses + [(0, 0.5, pauses[0][2])])
    assert (s["gc_collections"], s["gc_full_collections"]) == (2, 1)
    assert s["gc_full_max_ms"] == pauses[0][1] and s["gc_max_ms"] == max(pauses[0][1], 0.5)
    assert s["gc_total_ms"] == pytest.approx(pauses[0][1] + 0.5)


def test_the_switch_interval_is_set_for_a_run_and_restored():
    before = sys.getswitchinterval()
    with interpreter.switch_interval(0.5):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sys.getswitchinterval() == before


def test_a_first_use_event_mid_run_fails_the_run_and_keeps_loadgen_logs(tmp_path):
    model = make_model()
    path = RequestPath(model, device="cpu")
    serve, calls = path.serve, [0]

    def serve_meeting_a_new_shape(requests, **kw):
        calls[0] += 1
        if calls[0] == 5:  # as a graph capture or an autotune would, mid-run
            with first_use.first_use():
                pass
        return serve(requests, **kw)

    path.serve = serve_meeting_a_new_shape
    server = RealServer(
        path,
        Sequences(8),
        max_batch=2,
        max_wait_s=0.002,
        policy="fifo",
        device="cpu",
        token_buckets=[64],
        num_context=0,
    )
    test = LoadGenTest(
        scenario="server",
        target_qps=50,
        slo_ms=500,
        slo_percentile=90,
        min_duration_s=1.0,
        min_query_count=50,
        seed=1,
    )
    with pytest.raises(FirstUseDuringRun, match="first-use work .* during the timed run, in batch 4"):
        server.run(test, Cycle(8), tmp_path / "lg")
    assert "Result is" in (tmp_path / "lg" / "mlperf_log_summary.txt").read_text()


def test_early_stopping_needs_the_queries_loadgen_says():
    # LoadGen's own summary of a 191-query p99 run: "Would need to run at least 268 more"
    assert early_stopping_queries(99) == 191 + 268
    assert early_stopping_queries(90) == 44


def check_causal(rows):
    """Each user's requests in issue order: served one at a time, in order, histories growing,
    and none ever served from more cached tokens than its own sequence (nothing from a later
    request)."""
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user"], []).append(r)
    for mine in by_user.values():
        for a, b in zip(mine, mine[1:]):
            assert float(b["start_s"]) >= float(a["finish_s"])  # after the earlier one
            assert int(b["history"]) >= int(a["history"])
        for r in mine:
            assert int(r["cached_tokens"]) <= int(r["history"])  # the tiny model: no context


def check_batches(rows, batches, record):
    """batches.csv against requests.csv and the record: every batch once, its requests' sizes,
    host work before the answer, the device's span inside the run."""
    assert len(batches) == record["batches"]
    assert sorted(int(b["batch"]) for b in batches) == list(range(len(batches)))
    sizes = {}
    for r in rows:
        sizes[int(r["batch"])] = sizes.get(int(r["batch"]), 0) + 1
    for b in batches:
        n, (start, launched, finish) = (
            int(b["batch"]),
            (float(b[k]) for k in ("start_s", "launched_s", "finish_s")),
        )
        assert sizes[n] == int(b["size"]) and int(b["first_use"]) == 0
        assert 0 <= start <= launched <= finish
        assert float(b["host_ms"]) == pytest.approx(1e3 * (launched - start), abs=1e-5)
        # its phases in order, back to back but for the calls between them
        phases = [float(b[f"host_{name}_ms"]) for name in WORKER_PHASES]
        assert min(phases) >= 0 and float(b["host_launch_ms"]) > 0
        assert sum(phases) <= float(b["host_ms"]) + 1e-5
        assert float(b["device_start_s"]) <= float(b["device_end_s"]) <= finish + 1e-6
        answered = {float(r["finish_s"]) for r in rows if int(r["batch"]) == n}
        assert answered == {finish}  # each of its requests answered when it finished


def test_serve_smoke_through_loadgen_on_the_real_clock(tmp_path):
    out = hstu_exp("-m", "experiment=serve_smoke", f"hydra.sweep.dir={tmp_path}", env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "clock: real" in out.stderr + out.stdout
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["cache"] for r in records) == ["none", "paged", "paged_offload"]
    for r in records:
        assert r["status"] == "ok" and r["clock"] == "real" and r["scenario"] == "server"
        job = Path(r["job_dir"])
        summary = (job / "loadgen" / "run" / "mlperf_log_summary.txt").read_text()
        assert f"Result is : {r['verdict']}" in summary
        assert r["verdict"] == "VALID" and r["early_stopping_met"] is True and r["slo_met"]
        assert r["valid"] is True and r["target_qps"] == 20.0
        assert 15 < r["completed_qps"] < 25 and 15 < r["scheduled_qps"] < 25
        rows = read_csv(job / "requests.csv")
        # every query LoadGen counted was answered once, by the server, in issue order
        assert len(rows) == r["loadgen_queries"] == r["requests"] >= 50
        assert [int(x["request"]) for x in rows] == list(range(len(rows)))
        assert r["p90_ms"] <= r["slo_ms"] and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        check_causal(rows)
        check_batches(rows, read_csv(job / "batches.csv"), r)
        for c in read_csv(job / "collections.csv"):
            assert int(c["generation"]) in (0, 1, 2) and float(c["pause_ms"]) >= 0
        assert len(read_csv(job / "collections.csv")) == r["gc_collections"]
        assert r["max_rel_error"] < 1e-4  # sampled scores vs a float32 full recompute
        assert 0 < r["busy_fraction"] < 1 and r["warmup_s"] > 0
        assert r["gc_freeze"] is True and r["gc_full_collections"] <= r["gc_collections"]
        assert r["switch_interval_ms"] == 5.0
        assert 0 <= r["gc_full_max_ms"] <= r["gc_max_ms"] <= r["gc_total_ms"]
        # no graphs: nothing captured at start-up, the whole warm-up is the rounds
        assert r["warm_graphs"] == 0 and r["warmup_s"] == r["warm_graphs_s"] + r["warm_rounds_s"]
        assert 0 < r["top_user_request_share"] < 0.5
        tiers = {t: sum(x["tier"] == t for x in rows) for t in ("gpu", "host", "miss")}
        assert (r["gpu_requests"], r["host_requests"], r["miss_requests"]) == (
            tiers["gpu"],
            tiers["host"],
            tiers["miss"],
        )
        if r["cache"] != "none":
            assert tiers["gpu"] > 0
        if r["cache"] == "paged_offload":
            assert tiers["host"] > 0


def test_search_reports_a_bracket_and_reruns_the_final_rate(tmp_path):
    out = hstu_exp(
        "experiment=serve_smoke",
        "cache=paged",
        "workload.search=max_qps",
        "workload.qps=20",
        "workload.search_steps=1",
        "workload.final_seeds=2",
        # each run at least serve_smoke's 50 queries (2.5 s at 20 qps, 0.5 s from 100 qps on)
        "workload.search_duration_s=0.5",
        "workload.min_duration_s=0.5",
        "verify=false",
        f"hydra.run.dir={tmp_path}",
        env=ONE_THREAD,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "results.jsonl").read_text())
    assert r["clock"] == "real" and r["mode"] == "max_qps-fifo"
    tried = list(zip(r["search_qps"], r["search_passed"]))
    assert len(r["search_verdicts"]) == len(tried)
    assert all(ok == (v == "VALID") for (_, ok), v in zip(tried, r["search_verdicts"]))
    # serve_smoke's p90 <= 250 ms: 20 qps passes even on a loaded CPU and the doubling reaches a
    # rate no CPU serves, so both ends of the bracket exist
    assert r["max_qps"] == max(q for q, ok in tried if ok)
    assert r["min_failing_qps"] == min(q for q, ok in tried if not ok)
    assert r["max_qps"] < r["min_failing_qps"]
    assert r["final_seeds"] == [1, 2] and len(r["final_passed"]) == 2
    logs = sorted(p.name for p in (tmp_path / "loadgen").iterdir())
    assert len(logs) == len(tried) + 2 and sum(n.startswith("final-") for n in logs) == 2


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["workload.qps=0"], "workload.qps=0: must be positive"),
        (["workload.qps=-5"], "workload.qps=-5: must be positive"),
        (["workload.slo_ms=0"], "workload.slo_ms=0: must be positive"),
        (
            ["workload.slo_percentile=100"],
            "workload.slo_percentile=100: LoadGen's latency percentile must be in (0, 100)",
        ),
        (["workload.slo_percentile=0"], "workload.slo_percentile=0: must be in (0, 100]"),
        (
            ["workload.min_duration_s=1", "workload.min_query_count=10"],
            "workload.min_duration_s=1: about 20 queries at 20 qps, fewer than the 44 LoadGen's early "
            "stopping needs at p90 (raise it to 2.2 s or more)",
        ),
        (
            ["workload.slo_percentile=99"],
            "workload.min_duration_s=3: about 60 queries at 20 qps, fewer than the 459",
        ),
        (
            ["graph=cudagraph", "graph.batch_buckets=[1,2]"],
            "workload.max_batch=4: more than the largest graph bucket (graph.batch_buckets=[1, 2])",
        ),
        (["workload.trace=x.csv"], "workload.trace=x.csv: LoadGen draws its own arrival times"),
        (["workload.clock=wall"], "workload.clock=wall"),
    ],
)
def test_bad_real_clock_input_is_one_line_and_exit_2(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    out = hstu_exp("experiment=serve_smoke", "cache=paged", *overrides, f"hydra.run.dir={run_dir}")
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hstu-exp: error: "), out.stderr
    assert message in lines[0], lines[0]
    assert not run_dir.exists()


def test_real_clock_without_loadgen_names_the_package(tmp_path):
    """A Python where `import mlperf_loadgen` fails (a stand-in package that raises
    ImportError, as an absent one does)."""
    shadow = tmp_path / "shadow" / "mlperf_loadgen"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named mlperf_loadgen')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{ROOT}"}
    out = hstu_exp("experiment=serve_smoke", "cache=none", f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == (
        "hstu-exp: error: workload.clock=real: needs MLPerf LoadGen: pip install mlcommons-loadgen"
    )
    ok = hstu_exp(
        "experiment=serve_smoke",
        "workload.clock=simulated",
        "cache=none",
        "verify=false",
        f"hydra.run.dir={tmp_path / 'sim'}",
        env={**env, **ONE_THREAD},
    )
    assert ok.returncode == 0, ok.stderr[-2000:]  # the simulator needs no LoadGen


def test_ctrl_c_during_a_loadgen_run_marks_the_point_and_keeps_the_logs(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "hstu_exp",
        "experiment=serve_smoke",
        "cache=paged",
        "workload.min_duration_s=4",  # LoadGen runs on after the signal, answered without the model
        "verify=false",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "LoadGen server:" in line:
            break
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, "".join(seen) + rest
    record = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert record["status"] == "failed" and record["error"] == "interrupted"
    detail = (tmp_path / "loadgen" / "run" / "mlperf_log_detail.txt").read_text()
    assert '"key": "result_validity"' in detail  # LoadGen ended and closed its logs
    assert "interrupted: answering LoadGen's remaining queries" in rest


def test_the_simulator_is_checked_against_the_real_server(tmp_path):
    """One configuration and rate on both clocks; scripts/serve_sim_check.py sets the simulated
    p50 / p99 beside LoadGen's and says where they are more than 25 % apart."""
    out = hstu_exp(
        "-m",
        "experiment=serve_smoke",
        "cache=paged",
        "verify=false",
        "workload.clock=real,simulated",
        f"hydra.sweep.dir={tmp_path}",
        env=ONE_THREAD,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = {
        r["clock"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    }
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "serve_sim_check.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    (line,) = [x for x in check.stdout.splitlines()[1:] if x.strip()]
    sim, real = records["simulated"], records["real"]
    assert f"{sim['p99_ms']:.2f}" in line and f"{real['p99_ms']:.2f}" in line
    gap = (sim["p99_ms"] - real["p99_ms"]) / real["p99_ms"]
    assert f"p99 {gap:+.0%}" in line
    assert ("p99 {:+.0%} OFF BY MORE THAN 25 %".format(gap) in line) == (abs(gap) > 0.25)
    empty = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "serve_sim_check.py"), str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert empty.returncode == 2 and "no serve point ran on both clocks" in empty.stderr
