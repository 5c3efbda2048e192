"""The ranking stack end to end. Central test: random request streams over many users through a
pool small enough to force evictions and host round trips; every candidate's logits equal an
independent float64 full recompute of that user's whole sequence (direct table lookups, the
block written from docs/design.md §2 with explicit per-head loops, the heads by hand)."""

import copy
import json
import math
import random

import pytest
import torch
from helpers import hstu_exp, spec_block
from hydra import compose, initialize_config_dir

from hstu_exp.bench import e2e
from hstu_exp.cli import CONF_DIR
from hstu_exp.data.synthetic import ACTION, CONTEXT, ITEM, Request, SyntheticStream, interleave
from hstu_exp.kvcache.manager import KVCacheManager
from hstu_exp.kvcache.offload import OffloadPagedKVCache
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.ranking import HSTURanker
from hstu_exp.serving.path import rank

SIZES = dict(
    num_layers=2,
    hidden=16,
    num_heads=2,
    head_dim=8,
    item_vocab=300,
    action_vocab=9,
    num_context=2,
    context_vocab=13,
    max_history=64,
    head_widths=[8, 1],
    num_tasks=3,
)
PAGE = 8


def make_model(**over):
    torch.manual_seed(random.randrange(1 << 30))
    sizes = {**SIZES, **over}
    model = HSTURanker(
        scaling_length=sizes["max_history"] + 8, kernel="reference", position_embedding=True, **sizes
    )
    with torch.no_grad():  # keep the attention away from zero so errors are relative to signal
        for p in model.block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def make_cache(kind, *, num_pages, host_pages, layers=2):
    kwargs = dict(
        num_layers=layers,
        num_pages=num_pages,
        page_size=PAGE,
        num_heads=2,
        head_dim=8,
        dtype=torch.float32,
        device="cpu",
    )
    if kind == "paged_offload":
        return OffloadPagedKVCache(host_pages=host_pages, **kwargs)
    return PagedKVCache(**kwargs)


# -- the independent reference -------------------------------------------------------------------


@torch.no_grad()
def reference_logits(model: HSTURanker, r: Request) -> torch.Tensor:
    emb = model.embeddings
    tables = {CONTEXT: "context_table", ITEM: "item_table", ACTION: "action_table"}
    weight = {
        k: emb.collection.embeddings[t].weight.double()
        for k, t in tables.items()
        if t in emb.collection.embeddings
    }
    C, T = r.num_context, r.history
    rows = [weight[int(k)][int(i)] for k, i in zip(r.kinds, r.ids)]
    rows += [weight[ITEM][int(i)] for i in r.candidates]
    pos = [emb.max_history + 1 + s for s in range(C)] + list(range(T)) + [T] * len(r.candidates)
    x = torch.stack(rows) * math.sqrt(emb.hidden) + emb.positions.weight.double()[pos]
    history = r.seq_len
    x = spec_block(model.block, x, history)
    h = x[history:]
    h = h / h.norm(dim=-1, keepdim=True)
    logits = []
    for task in model.heads.tasks:
        t = h
        for mod in task:
            t = (
                torch.relu(t)
                if isinstance(mod, torch.nn.ReLU)
                else t @ mod.weight.double().T + mod.bias.double()
            )
        logits.append(t)
    return torch.cat(logits, -1)


def assert_matches(model, batch, logits, tol=1e-4):
    for r, got in zip(batch, logits.split([r.candidates.numel() for r in batch])):
        want = reference_logits(model, r)
        err = float((got.cpu().double() - want).norm() / want.norm())
        assert err < tol, f"user {r.user}: relative error {err:.2e}"


# -- streams ---------------------------------------------------------------------------------


def random_users(n, *, num_context=2, max_history=64):
    seqs = []
    for _ in range(n):
        items = torch.randint(SIZES["item_vocab"], (max_history // 2,))
        actions = torch.randint(SIZES["action_vocab"], (max_history // 2,))
        seqs.append(interleave(torch.randint(SIZES["context_vocab"], (num_context,)), items, actions))
    return seqs


def request(seqs, user, history, num_context=2, candidates=None):
    kinds, ids = seqs[user]
    end = num_context + history
    cands = (
        candidates
        if candidates is not None
        else torch.randint(SIZES["item_vocab"], (random.randint(1, 6),))
    )
    return Request(
        user=user, kinds=kinds[:end], ids=ids[:end], candidates=cands, num_context=num_context
    )


def serve_random_stream(model, manager, *, device="cpu", ref_model=None, tol=1e-4):
    """45 batches of 1-2 of 9 users whose histories grow by 0..12 tokens (odd lengths too)."""
    seqs = random_users(9)
    history = [0] * len(seqs)
    for _ in range(45):
        users = random.sample(range(len(seqs)), random.randint(1, 2))
        batch = []
        for u in users:
            history[u] = min(history[u] + random.randint(0, 12), 64)
            batch.append(request(seqs, u, history[u]))
        logits = rank(model, batch, device=device, manager=manager)
        assert_matches(ref_model or model, batch, logits, tol)
    return manager.stats()


@pytest.mark.parametrize("kind", ["paged", "paged_offload"])
def test_random_streams_match_a_full_recompute(kind):
    model = make_model()
    # 66 tokens at most = 9 pages a user: the pool holds about two users, the host three.
    manager = KVCacheManager(make_cache(kind, num_pages=20, host_pages=28))
    stats = serve_random_stream(model, manager)
    assert stats["evictions"] > 0 and stats["hit_tokens"] > 0, stats
    if kind == "paged_offload":
        assert stats["offloaded_bytes"] > 0 and stats["onloaded_bytes"] > 0, stats
        assert stats["host_evictions"] > 0, stats  # some users recomputed from scratch


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_random_streams_match_on_cuda_with_side_stream_onloads(dtype, tol):
    model = make_model()
    gpu_model = copy.deepcopy(model).to("cuda", dtype)
    cache = OffloadPagedKVCache(
        num_layers=2,
        num_pages=20,
        page_size=PAGE,
        num_heads=2,
        head_dim=8,
        host_pages=28,
        dtype=dtype,
        device="cuda",
    )
    stats = serve_random_stream(
        gpu_model,
        KVCacheManager(cache),
        device="cuda",
        ref_model=model if dtype == torch.float32 else copy.deepcopy(gpu_model).cpu().float(),
        tol=tol,
    )
    assert stats["onloaded_bytes"] > 0, stats
    # event-timed stalls of the compute stream: 0 where a copy was done before its layer
    assert 0 <= stats["onload_wait_ms"] < 60_000, stats


def test_a_changed_or_shrunk_history_is_recomputed_never_served_stale():
    model = make_model()
    messages = []
    manager = KVCacheManager(
        make_cache("paged_offload", num_pages=20, host_pages=28), warn=messages.append
    )
    seqs = random_users(2)
    batch = [request(seqs, 0, 30), request(seqs, 1, 20)]
    assert_matches(model, batch, rank(model, batch, device="cpu", manager=manager))

    shrunk = [request(seqs, 0, 10)]  # history shrank below what is cached
    assert_matches(model, shrunk, rank(model, shrunk, device="cpu", manager=manager))
    assert messages[-1] == (
        "user 0: its sequence shrank from 32 cached tokens to 12; "
        "dropped its cached K/V, recomputing from scratch"
    )
    assert manager.last_starts == [0]

    kinds, ids = seqs[1]
    ids = ids.clone()
    assert kinds[7] == ACTION
    ids[7] = (ids[7] + 1) % SIZES["action_vocab"]  # an action in the cached prefix changed
    seqs[1] = (kinds, ids)
    changed = [request(seqs, 1, 24)]
    assert_matches(model, changed, rank(model, changed, device="cpu", manager=manager))
    assert messages[-1] == (
        "user 1: token 7 of its 22 cached tokens changed; "
        "dropped its cached K/V, recomputing from scratch"
    )
    assert manager.stats()["invalidations"] == 2 and manager.last_starts == [0]

    grown = [request(seqs, 1, 30)]  # and the new prefix is cached again
    assert_matches(model, grown, rank(model, grown, device="cpu", manager=manager))
    assert manager.last_starts == [26] and len(messages) == 2


def test_the_synthetic_stream_grows_histories_reproducibly():
    kw = dict(
        batch_size=3,
        num_batches=9,
        num_candidates=4,
        history_start=8,
        history_step=4,
        max_history=20,
        num_context=1,
        item_vocab=50,
        action_vocab=5,
        context_vocab=7,
    )
    a = SyntheticStream(num_users=5, seed=3, **kw)
    b = SyntheticStream(num_users=5, seed=3, **kw)
    served, prev = {}, {}
    for ba, bb in zip(a.batches, b.batches):
        assert len({r.user for r in ba}) == 3
        for ra, rb in zip(ba, bb):
            assert torch.equal(ra.ids, rb.ids) and torch.equal(ra.candidates, rb.candidates)
            k = served.get(ra.user, 0)
            assert ra.history == min(8 + 4 * k, 20)
            if k:  # the earlier request is a prefix: histories only grow
                assert torch.equal(ra.ids[: prev[ra.user].numel()], prev[ra.user])
            served[ra.user] = k + 1
            prev[ra.user] = ra.ids
    assert sorted(served) == list(range(5))  # rounds visit every user
    seed = SyntheticStream(num_users=2, seed=0, **{**kw, "batch_size": 2})
    assert all(sorted(r.user for r in batch) == [0, 1] for batch in seed.batches)


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "config", overrides=["workload=e2e", "model=tiny", "logger=none", "device=cpu", *overrides]
        )


def test_modes_decide_cache_and_graph_and_impossible_ones_say_so():
    """One capacity rule and one mode rule, in config.point_problem / device_problem: the same
    point is refused by a single run and skipped in a sweep, never failed inside the workload."""
    from hstu_exp.config import device_problem, e2e_ran, point_problem

    assert "workload.mode=cache needs cache=paged or cache=paged_offload" in point_problem(
        compose_cfg("cache=none")
    )
    assert "graph=cudagraph contradicts workload.mode=cache" in point_problem(
        compose_cfg("graph=cudagraph")
    )
    assert point_problem(compose_cfg("graph=cudagraph", "workload.mode=cache_graph")) is None
    assert "mode=cache_graph: CUDA graphs need a CUDA device" in device_problem(
        compose_cfg("workload.mode=cache_graph")
    )
    assert "mode=baseline_graph: CUDA graphs need a CUDA device" in device_problem(
        compose_cfg("workload.mode=baseline_graph")
    )
    # the host tier of 4 pages cannot hold one request of 512 history tokens (16 pages of 32)
    assert "cache.host_pages=4: the host tier holds fewer pages" in point_problem(
        compose_cfg("cache=paged_offload", "cache.host_pages=4")
    )
    # context tokens count: 16 users x 512 history fit the default pool, 16 x (512 + 8) do not
    assert point_problem(compose_cfg("workload.batch_size=16")) is None
    assert (
        "cache.num_pages=256: the KV pool holds fewer pages than one batch needs "
        "(16 requests x 17 pages"
        in point_problem(compose_cfg("workload.batch_size=16", "model.num_context=8"))
    )
    for mode, ran in [
        ("baseline", ("none", "none")),
        ("baseline_graph", ("none", "cudagraph")),
        ("cache", ("paged_offload", "none")),
        ("cache_graph", ("paged_offload", "cudagraph")),
    ]:
        cfg = compose_cfg(f"workload.mode={mode}", "cache=paged_offload")
        assert tuple(e2e_ran(cfg).values()) == ran


def test_a_contradicting_graph_group_is_refused_by_the_cli(tmp_path):
    proc = hstu_exp(
        "workload=e2e",
        "model=tiny",
        "graph=cudagraph",
        "workload.mode=cache",
        "logger=none",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("hstu-exp: error: graph=cudagraph contradicts workload.mode=cache")
    assert not (tmp_path / "run").exists()


def test_done_when_command(tmp_path):
    """hstu-exp workload=e2e model=tiny cache=paged_offload verify=true logger=none"""
    proc = hstu_exp(
        "workload=e2e",
        "model=tiny",
        "cache=paged_offload",
        "verify=true",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert r["status"] == "ok", r.get("error")
    assert r["workload"] == "e2e" and r["mode"] == "cache" and r["cache"] == "paged_offload"
    assert r["max_rel_error"] < 1e-4
    assert r["evictions"] > 0 and r["offloaded_bytes"] > 0 and r["onloaded_bytes"] > 0
    assert r["hit_tokens"] > 0 and r["computed_tokens"] > 0
    # CPU: the copies are synchronous, so compute waited for them, within the point's run
    assert 0 < r["onload_wait_ms"] < r["wall_s"] * 1e3
    assert r["iterations"] == len(r["samples_ms"]) >= 16 and r["passes"] >= 1
    assert r["total_ms"] > 0 and r["throughput_cps"] > 0 and r["median_ms"] > 0
    assert 0 < r["floor_fraction"] < 5


def test_four_mode_sweep_records_what_ran_and_draws_the_e2e_figures(tmp_path):
    """All four modes on the CPU: baseline and cache run, the graph modes are recorded skipped;
    each record's identity keys say what ran (not what the cache/graph groups asked for)."""
    proc = hstu_exp(
        "-m",
        "workload=e2e",
        "model=tiny",
        "cache=paged_offload",
        "device=cpu",
        "workload.mode=baseline,baseline_graph,cache,cache_graph",
        "workload.batch_size=2",
        "workload.num_users=4",
        "workload.num_batches=8",
        "workload.warmup=1",
        "workload.min_time_s=0.01",
        "workload.iters=8",
        "calibrate=false",
        "logger=none",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [
        json.loads(line)
        for p in sorted(tmp_path.rglob("results.jsonl"))
        if p.parent != tmp_path
        for line in p.read_text().splitlines()
    ]
    by_mode = {r["mode"]: r for r in recs}
    assert set(by_mode) == {"baseline", "baseline_graph", "cache", "cache_graph"}
    ran = {m: (r["status"], r["cache"], r["graph"], r["page_size"]) for m, r in by_mode.items()}
    assert ran == {
        "baseline": ("ok", "none", "none", None),
        "baseline_graph": ("skipped", "none", "cudagraph", None),
        "cache": ("ok", "paged_offload", "none", 32),
        "cache_graph": ("skipped", "paged_offload", "cudagraph", 32),
    }
    assert all(
        "CUDA graphs need a CUDA device" in by_mode[m]["reason"]
        for m in ("baseline_graph", "cache_graph")
    )
    base, cache = by_mode["baseline"], by_mode["cache"]
    assert base["hit_tokens"] == 0 and cache["hit_tokens"] > 0
    assert cache["computed_tokens"] < base["computed_tokens"]
    # The stream, built independently: 8 batches of 2 users, histories 256, 384, 512 (capped).
    stream = SyntheticStream(
        num_users=4,
        batch_size=2,
        num_batches=8,
        num_candidates=32,
        history_start=256,
        history_step=128,
        max_history=512,
        num_context=0,
        item_vocab=1000,
        action_vocab=16,
        context_vocab=1000,
        seed=0,
    )
    tokens = [sum(r.seq_len for r in b) for b in stream.batches]
    assert base["total_history"] == cache["total_history"] == 512
    for r in (base, cache):  # every history token of a batch is a GPU hit, a host hit or a miss
        hits = [
            g + h + m
            for g, h, m in zip(
                r["batch_gpu_hit_tokens"], r["batch_host_hit_tokens"], r["batch_miss_tokens"]
            )
        ]
        assert hits == tokens
        assert r["gpu_hit_tokens"] + r["host_hit_tokens"] == r["hit_tokens"]
        assert r["miss_tokens"] == sum(r["batch_miss_tokens"])
        assert len(r["batch_ms"]) == len(r["batch_host_ms"]) == 8 and r["host_ms"] > 0
        # On a CPU the compute is part of the host's step: 0 < its span <= the step, per batch.
        assert len(r["batch_device_ms"]) == 8
        assert all(0 < d <= h for d, h in zip(r["batch_device_ms"], r["batch_host_ms"]))
        assert r["cv_basis"] == "passes" and r["passes"] >= 1
    assert base["batch_miss_tokens"] == tokens
    # users are served once per round of 4: the second round hits what the first cached
    assert cache["batch_miss_tokens"][:2] == tokens[:2] and cache["gpu_hit_tokens"] > 0
    for name in ("e2e_latency", "e2e_speedup"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 5000


def test_host_tier_hits_and_bytes_moved_per_batch(tmp_path):
    """More users than the pool holds: evicted users come back from the host tier. Per batch,
    the host hits are onloaded (onloaded bytes = host-hit pages x bytes per page)."""
    cfg = compose_cfg(
        "cache=paged_offload",
        "cache.num_pages=48",
        "workload.batch_size=2",
        "workload.num_users=8",
        "workload.num_batches=16",
        "workload.min_time_s=0.01",
        "workload.iters=1",
        "workload.warmup=0",
        "calibrate=false",
    )
    measured = e2e.run(cfg, torch.device("cpu"), progress=lambda m: None)
    x = measured.extra
    page_bytes = 2 * 2 * 32 * 2 * 32 * 4  # layers x (K, V) x page x heads x head_dim x fp32
    assert x["host_hit_tokens"] > 0 and x["onloaded_bytes"] > 0 and x["offloaded_bytes"] > 0
    assert sum(x["batch_onloaded_bytes"]) == x["onloaded_bytes"]
    assert sum(x["batch_offloaded_bytes"]) == x["offloaded_bytes"]
    # every history is a multiple of the page size (256 + k x 128, no context): pages = tokens/32
    for hit, onloaded in zip(x["batch_host_hit_tokens"], x["batch_onloaded_bytes"]):
        assert onloaded == hit // 32 * page_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["cache_graph", "baseline_graph"])
def test_graph_modes_match_full_recompute_on_cuda(mode):
    """Graph replays (with host onloads before each in cache_graph) serve the stream; verify
    against fp32."""
    cfg = compose_cfg(
        f"workload.mode={mode}",
        "cache=paged_offload",
        "verify=true",
        "device=cuda",
        "workload.min_time_s=0.01",
        "workload.iters=1",
        "graph.token_buckets=[128,512,1024]",
    )
    measured = e2e.run(cfg, torch.device("cuda"), progress=lambda m: None)
    assert measured.extra["bucket"]
    assert measured.verify()["max_rel_error"] < 1e-4
    if mode == "cache_graph":
        assert measured.extra["evictions"] > 0 and measured.extra["onloaded_bytes"] > 0
    else:
        assert measured.extra["hit_tokens"] == 0 and measured.extra["kv_pool_bytes"] == 0


@torch.no_grad()
def test_a_step_padded_to_its_graph_bucket_equals_the_eager_step():
    """What GraphedRanker captures: forward_rows on the bucket's static, padded buffers (extra
    users, a padding KJT bag, dead rows, padded candidate rows) gives the eager step's logits and
    hidden states for the live candidates (eager here; the replay itself: the CUDA tests)."""
    from hstu_exp.core.jagged import make_batch, pack, unpack
    from hstu_exp.graphs import Bucket, fit_rows, pad_metadata, pad_tokens, static_batch, static_tokens
    from hstu_exp.model.ranking import forward_rows

    model = make_model()
    seqs = random_users(4)
    managers = [KVCacheManager(make_cache("paged", num_pages=40, host_pages=None)) for _ in range(2)]
    for history in ([10, 30, 5], [25, 41, 5]):  # the second batch hits the cache
        batch_req = [request(seqs, u, h) for u, h in zip([0, 2, 3], history)]
        outs = []
        for manager, padded in zip(managers, (False, True)):
            starts, table, _ = manager.plan(batch_req)
            tokens = model.embeddings.tokens(batch_req, starts, "cpu")
            batch = make_batch(tokens.rows, tokens.num_candidates, "cpu", table)
            if padded:  # batch x tokens rows, then the rows fitted to the batch (fit_rows)
                fit = fit_rows(tokens.num_rows, 32, 4 * 64)
                assert 0 < fit < 4 * 64
                for bucket in (
                    Bucket(batch=4, tokens=64, kv=64),
                    Bucket(batch=4, tokens=64, kv=64, fit=fit),
                ):
                    arrays = pad_metadata(
                        batch, bucket, pages_per_user=8, scratch_page=manager.cache.scratch_page
                    )
                    arrays.update(pad_tokens(tokens, bucket))
                    views = unpack(*pack(arrays, pin=False))
                    n = tokens.host["candidate_rows"].size
                    logits, h = forward_rows(
                        model,
                        static_tokens(views, model.embeddings.keys, bucket),
                        static_batch(bucket, views),
                        manager.cache.pool,
                    )
                    outs.append((logits[:n], h[:n]))
                    assert logits.shape[0] == bucket.rows  # heads ran on every padded row
            else:
                outs.append(forward_rows(model, tokens, batch, manager.cache.pool))
        for padded_out in outs[1:]:
            for got, want in zip(padded_out, outs[0]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_repeats_run_on_fresh_servers_and_the_record_keeps_each(tmp_path):
    """workload.repeats=2: one record holding both repeats' pass totals, values and intervals;
    the e2e record carries its own pass totals (the speedup's resampling unit)."""
    proc = hstu_exp(
        "workload=e2e",
        "model=tiny",
        "cache=paged",
        "device=cpu",
        "workload.batch_size=2",
        "workload.num_users=2",
        "workload.num_batches=4",
        "workload.warmup=1",
        "workload.min_time_s=0.01",
        "workload.iters=12",
        "workload.repeats=2",
        "calibrate=false",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("repeat 1 of 2") == 1 and "repeat 2 of 2" in proc.stdout
    (rec,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rec["repeats"] == 2 and rec["repeat_key"] == "total_ms"
    assert len(rec["repeat_ms"]) == len(rec["repeat_units_ms"]) == len(rec["repeat_ci_ms"]) == 2
    assert rec["total_ms"] in rec["repeat_ms"] and rec["pass_ms"] in rec["repeat_units_ms"]
    for units, ci in zip(rec["repeat_units_ms"], rec["repeat_ci_ms"]):
        assert len(units) >= 3 and ci[0] <= sorted(units)[len(units) // 2] <= ci[1]
    assert isinstance(rec["repeats_agree"], bool) and rec["config"]["workload"]["repeats"] == 2
