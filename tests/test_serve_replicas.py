"""workload.replicas=N on the real clock: N replicas (request path, KV pool, batcher, worker)
behind the one LoadGen SUT, users pinned by serving.routing.Router. On the CPU here: the
replicas are threads on one device; what is checked is the bookkeeping (each query answered
once, by one replica, a user's queries in order on its replica), the per-replica record and
the scores; the scaling on N GPUs needs a multi-GPU machine."""

import json
import zlib
from pathlib import Path

import pytest
from helpers import hstu_exp
from hydra import compose, initialize_config_dir
from test_serve import read_csv
from test_serve_real import ONE_THREAD, check_causal

from hstu_exp.cli import CONF_DIR
from hstu_exp.config import ConfigError, validate

TIERS = ("gpu", "host", "miss")


def serve(tmp_path, *overrides):
    out = hstu_exp(
        "experiment=serve_smoke",
        "cache=paged_offload",
        "workload.replicas=2",
        f"hydra.run.dir={tmp_path}",
        *overrides,
        env=ONE_THREAD,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "results.jsonl").read_text())
    return record, read_csv(Path(record["job_dir"]) / "requests.csv"), out


def replicas_of_each_user(rows) -> dict:
    """user -> the replicas of its queries, in issue order."""
    seen: dict = {}
    for r in rows:
        seen.setdefault(r["user"], []).append(int(r["replica"]))
    return seen


def check_record(r, rows):
    assert r["status"] == "ok" and r["clock"] == "real" and r["verdict"] == "VALID"
    summary = (Path(r["job_dir"]) / "loadgen" / "run" / "mlperf_log_summary.txt").read_text()
    assert f"Result is : {r['verdict']}" in summary
    # every query LoadGen issued answered once, with its scores checked against a recompute
    assert len(rows) == r["loadgen_queries"] == r["requests"] >= 50
    assert [int(x["request"]) for x in rows] == list(range(len(rows)))
    assert r["max_rel_error"] < 1e-4
    check_causal(rows)  # each user's queries one at a time, in issue order
    assert r["replicas"] == 2
    per = [[x for x in rows if int(x["replica"]) == k] for k in range(2)]
    assert r["replica_requests"] == r["replica_queries"] == [len(p) for p in per]
    assert all(len(p) > 0 for p in per), "both replicas served"
    for k, mine in enumerate(per):
        assert 0 < r["replica_busy_fraction"][k] < 1 and r["replica_host_ms_per_batch"][k] > 0
        for t in TIERS:
            key = f"replica_{t}_hit_rate" if t != "miss" else "replica_miss_rate"
            assert r[key][k] == pytest.approx(sum(x["tier"] == t for x in mine) / len(mine))
    assert r["busy_fraction"] == pytest.approx(sum(r["replica_busy_fraction"]) / 2)
    assert sum(r["replica_moved_in"]) == sum(r["replica_moved_out"]) == r["moves"]


def test_two_replicas_hash_routing_pins_each_user_to_its_replica(tmp_path):
    r, rows, out = serve(tmp_path, "workload.routing=hash")
    assert "2 replicas" in out.stdout + out.stderr
    check_record(r, rows)
    assert r["routing"] == "hash" and r["moves"] == 0
    for user, replicas in replicas_of_each_user(rows).items():
        # the router's fixed hash: the same replica for every query of the user
        assert replicas == [zlib.crc32(repr(int(user)).encode()) % 2] * len(replicas)


def test_least_loaded_without_slack_moves_users_and_counts_each_move(tmp_path):
    # no slack and no imbalance allowed: a user whose replica has work queued moves (once its
    # own queries are answered), so moves happen at this load and each is counted
    r, rows, _ = serve(
        tmp_path,
        "workload.max_imbalance=0",
        "workload.route_slack_rows=0",
        "workload.qps=40",
        "workload.num_users=12",
    )
    check_record(r, rows)
    assert r["routing"] == "least_loaded" and r["route_slack_rows"] == 0
    switches = sum(
        sum(a != b for a, b in zip(seq, seq[1:])) for seq in replicas_of_each_user(rows).values()
    )
    # a switch between two of a user's queries is a move; a move from where the warm-up left
    # the user is one too
    assert 0 < switches <= r["moves"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["workload.replicas=0"], "workload.replicas=0: must be positive"),
        (
            ["workload.replicas=2", "workload.clock=simulated"],
            "workload.replicas=2: replicas serve on the real clock only (workload.clock=real); the "
            "simulator models one server",
        ),
    ],
)
def test_bad_replicas_one_line(tmp_path, overrides, message):
    out = hstu_exp("experiment=serve_smoke", "cache=paged", f"hydra.run.dir={tmp_path}", *overrides)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"hstu-exp: error: {message}"]
    assert not (tmp_path / "results.jsonl").exists()


def test_more_replicas_than_gpus_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["workload=serve", "device=cuda", "workload.replicas=3"])
        with pytest.raises(ConfigError, match=r"workload.replicas=3: more than the 2 visible"):
            validate(cfg)
        validate(compose("config", overrides=["workload=serve", "device=cuda", "workload.replicas=2"]))


def test_a_sure_miss_stops_every_replica_and_every_query_is_answered(tmp_path):
    from test_e2e import make_cache, make_model
    from test_serve_real import Cycle, Sequences

    from hstu_exp.kvcache.manager import KVCacheManager
    from hstu_exp.serving.loadgen_sut import LoadGenTest
    from hstu_exp.serving.path import RequestPath
    from hstu_exp.serving.server import RealServer

    model = make_model()
    paths = [
        RequestPath(
            model, device="cpu", manager=KVCacheManager(make_cache("paged", num_pages=64, host_pages=0))
        )
        for _ in range(2)
    ]
    server = RealServer(
        paths,
        Sequences(8),
        max_batch=2,
        max_wait_s=0.002,
        policy="fifo",
        device="cpu",
        token_buckets=[64],
        num_context=0,
        routing="hash",
    )
    # every answer is late for a 1 us bound: the first answered batch stops both replicas
    test = LoadGenTest(
        scenario="server",
        target_qps=50,
        slo_ms=1e-3,
        slo_percentile=90,
        min_duration_s=1.0,
        min_query_count=50,
        seed=1,
    )
    served = server.run(test, Cycle(8), tmp_path / "lg", give_up_after=1)
    assert served.stopped_early
    issued = served.loadgen["loadgen_queries"]
    assert issued >= 50 and len(served.specs) == issued  # each query admitted once
    assert "Result is" in (tmp_path / "lg" / "mlperf_log_summary.txt").read_text()
    # every routed query was answered on its replica (the router's outstanding work is back
    # to zero); after the stop only what both replicas had in flight or handed off (2 batches
    # of 2 each) ran the model, the rest of the ~25 each were answered without it
    assert server.router.load == [0, 0] and sum(served.routing["replica_queries"]) == issued
    assert 0 < len(served.log.rows) <= 8


def test_a_point_that_sees_fewer_gpus_than_replicas_fails_naming_them(monkeypatch):
    # a launcher giving each worker one GPU (hydra/launcher=gpus) after the sweep saw them all
    import torch

    from hstu_exp.bench.serve import replica_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(
        ValueError,
        match=r"workload.replicas=2: this point sees 1 GPU\(s\) "
        r"\(CUDA_VISIBLE_DEVICES=3\)",
    ):
        replica_devices(torch.device("cuda"), 2)
    assert replica_devices(torch.device("cpu"), 2) == [torch.device("cpu")] * 2
