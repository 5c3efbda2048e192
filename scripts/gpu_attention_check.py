"""Check and time the Triton HSTU attention on a CUDA GPU (docs/design.md §5, §6 goal shapes).

    PYTHONPATH=$PWD python3 scripts/gpu_attention_check.py            # checks + goal-shape table
    PYTHONPATH=$PWD python3 scripts/gpu_attention_check.py --sweep    # also try other tile configs
    PYTHONPATH=$PWD python3 scripts/gpu_attention_check.py --block    # the whole 8-layer block

Needs only torch and triton (no hydra/wandb). Correctness: bf16 kernels against the reference run
in float32 on the same inputs. Timing, medians: triton.testing.do_bench (L2 flushed between calls),
back-to-back eager calls under CUDA events (as the project's timer), and replay from a CUDA graph
(which also proves the op is capturable: a host sync inside would fail the capture). At batch 1 the
eager numbers measure the host's launch cost, not the kernel: the graph column is the kernel.
TFLOP/s = 4 H D x visible (query, key) pairs, candidate self pairs included.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import statistics
import sys
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from hstu_exp.core.jagged import make_batch
from hstu_exp.graphs import capture
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.hstu import append_kv
from hstu_exp.ops import reference
from hstu_exp.ops import triton_attention as tri
from hstu_exp.ops.policy import KernelPolicy

H, D, PAGE = 4, 256, 32
DT = torch.bfloat16


def pairs(history, new, cands):
    """Visible pairs of one user (as hstu_exp.bench.roofline.attention_pairs)."""
    cached = history - new
    return new * cached + new * (new + 1) // 2 + cands * (history + 1)


def make_case(B, history, new, cands, *, heads=H, dim=D, page=PAGE, seed=0, jagged=False):
    """Full mode when new == history, else paged with history - new tokens cached."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):  # post-SiLU-like magnitudes
        return (torch.randn(*shape, generator=g, device="cuda") * 0.5).to(DT)

    paged = new < history
    news, cand, cached = [new] * B, [cands] * B, [history - new] * B
    if jagged:  # uneven users: 1 is empty, 2 candidate-only, 3 without candidates
        news = [new, 0, 0, new // 2][:B]
        cand = [cands, 0, cands // 2, 0][:B]
        cached = [history - new, (history - new) // 2, (history - new) // 3, history - new + 7][:B]
        cached = cached if paged else [0] * B
    hist = [c + n for c, n in zip(cached, news)]
    rows = [n + c for n, c in zip(news, cand)]
    q, k, v = (randn(sum(rows), heads, dim) for _ in range(3))
    if not paged:
        return dict(
            paged=False,
            batch=make_batch(rows, cand, "cuda"),
            q=q,
            k=k,
            v=v,
            pairs=sum(pairs(h, n, c) for h, n, c in zip(hist, news, cand)),
        )
    pages = sum(-(-h // page) for h in hist) + 1
    cache = PagedKVCache(
        num_layers=1,
        num_pages=pages,
        page_size=page,
        num_heads=heads,
        head_dim=dim,
        dtype=DT,
        device="cuda",
    )
    users = list(range(B))
    cache.plan(users, cached, [0] * B)
    cache.pool.copy_(randn(*cache.pool.shape))
    batch = make_batch(rows, cand, "cuda", cache.plan(users, news, cand))
    pool = cache.pool[0]
    append_kv(pool, batch, k, v)
    return dict(
        paged=True,
        batch=batch,
        q=q,
        k=k,
        v=v,
        kp=pool[:, 0],
        vp=pool[:, 1],
        pairs=sum(pairs(h, n, c) for h, n, c in zip(hist, news, cand)),
    )


def call(op, case, upcast=False, **kw):
    """op: a module with attention_full/attention_paged (reference, tri) or a tri.Attention."""
    q, k, v = case["q"], case["k"], case["v"]
    alpha, inv_n = 1 / math.sqrt(q.shape[-1]), 1 / 4352
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    full, paged = (
        (op.full, op.paged) if isinstance(op, tri.Attention) else (op.attention_full, op.attention_paged)
    )
    if case["paged"]:
        kp, vp = (case["kp"].float(), case["vp"].float()) if upcast else (case["kp"], case["vp"])
        return paged(q, k, v, case["batch"], kp, vp, alpha=alpha, inv_n=inv_n, **kw)
    return full(q, k, v, case["batch"], alpha=alpha, inv_n=inv_n, **kw)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| and max |out - ref| / max |ref| (the cases have no dead rows)."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm()), float((o - r).abs().max() / r.abs().max())


def reference_fp32(case):
    with torch.no_grad():
        return call(reference, case, upcast=True)


def kernel_info(att: tri.Attention) -> str:
    last = att.last_launch
    k = last.get("kernel")
    regs, spills = getattr(k, "n_regs", "?"), getattr(k, "n_spills", "?")
    smem = getattr(getattr(k, "metadata", None), "shared", "?")
    cfg = last.get("config")
    tiles = f"{cfg.kernel} {cfg.block_m}x{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}" if cfg else "?"
    tma = " tma" if last.get("tma") else ""
    return f"{tiles}{tma} grid {last.get('grid')} regs {regs} spills {spills} smem {smem}"


def time_it(fn):
    """(do_bench median ms with L2 flushed, back-to-back eager ms, CUDA-graph replay ms, host us
    per call). Back-to-back is how the project's timer sees it: host launch cost shows there when
    it exceeds the kernel's time."""
    fn()
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(50)
    ]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for a, b in events:
        a.record()
        fn()
        b.record()
    host_us = (time.perf_counter() - t0) / len(events) * 1e6
    torch.cuda.synchronize()
    loop_ms = sorted(a.elapsed_time(b) for a, b in events)[len(events) // 2]
    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            graph_ms = do_bench_cudagraph(fn, rep=30, return_mode="median")
    except Exception as e:  # noqa: BLE001 - report, keep going
        print(f"    graph capture failed: {type(e).__name__}: {e}", flush=True)
        graph_ms = float("nan")
    return ms, loop_ms, graph_ms, host_us


def check_correctness():
    print("== correctness (bf16 vs float32 reference) ==", flush=True)
    worst = 0.0
    shapes = [  # (B, history, new, candidates, heads, dim, page, jagged)
        (3, 900, 900, 128, 4, 128, 32, True),
        (4, 1000, 1000, 64, 2, 256, 32, True),
        (4, 1500, 200, 128, 4, 256, 32, True),
        (2, 700, 50, 100, 3, 64, 16, True),
        (1, 4096, 128, 256, 4, 256, 32, False),
        (2, 2048, 2048, 256, 4, 128, 32, False),
    ]
    for B, T, n, c, h, d, p, jag in shapes:
        case = make_case(B, T, n, c, heads=h, dim=d, page=p, jagged=jag, seed=B + T)
        ref = reference_fp32(case)
        for split in (None, 1, 6):
            out = call(tri, case, split_k=split)
            torch.cuda.synchronize()
            rel, mx = rel_err(out, ref)
            worst = max(worst, rel)
            mode = "paged" if case["paged"] else "full"
            ok = "ok" if rel < 1e-2 and torch.isfinite(out).all() else "FAIL"
            print(
                f"  {mode:5} B={B} T={T} n={n} c={c} H={h} D={d} page={p} jagged={jag} "
                f"split={split}: rel {rel:.2e} max {mx:.2e} {ok}",
                flush=True,
            )
    return worst


C = tri.Config
GOALS = [  # name, B, history, new, candidates, heads, dim, goal TFLOP/s (None: no stated goal)
    ("full  B=1", 1, 4096, 4096, 256, H, D, None),
    ("full  B=8", 8, 4096, 4096, 256, H, D, 400),
    ("paged B=1", 1, 4096, 128, 256, H, D, 120),
    ("paged B=2", 2, 4096, 128, 256, H, D, None),
    ("paged B=4", 4, 4096, 128, 256, H, D, None),
    ("paged B=8", 8, 4096, 128, 256, H, D, None),
]
EXTRA = [  # --sweep only: the D=128 table entries
    ("full  B=8 H8 D128", 8, 4096, 4096, 256, 8, 128, None),
    ("paged B=1 H8 D128", 1, 4096, 128, 256, 8, 128, None),
]
SWEEP = {  # case -> [(config, split_k)] tried with --sweep
    "full  B=1": [(C(128, 64, 8, 2), s) for s in (2, 3)],
    "paged B=1": [(C(128, 64, 8, 2), s) for s in (6, 8, 16, 22)]
    + [(C(64, 32, 4, 3), s) for s in (None, 6, 11)]
    + [(C(128, 32, 8, 3), s) for s in (None, 11)]
    + [(C(64, 64, 4, 2), 11)],
    "paged B=8": [(C(128, 64, 8, 2), s) for s in (2, 3, 6)] + [(C(64, 32, 4, 3), s) for s in (1, 2)],
    "full  B=8 H8 D128": [
        (c, None)
        for c in (
            C(128, 64, 8, 3),
            C(128, 128, 8, 2),
            C(128, 64, 4, 3),
            C(64, 64, 4, 3),
            C(128, 32, 4, 3),
        )
    ],
    "paged B=1 H8 D128": [(C(128, 64, 8, 3), s) for s in (None, 1, 4)]
    + [(C(64, 64, 4, 3), s) for s in (None, 6)],
}


# --- the whole seed block (issue 11 levers) ---------------------------------------------------
# Variants of kernel=triton, timed as CUDA-graph replays (as graph=cudagraph runs the block),
# interleaved so that clock drift hits them alike:
#   old:  torch LayerNorm, a SiLU pass over the projection, then the K/V append (before 60e8baa)
#   ln:   the one-pass Triton LayerNorm, otherwise old
#   silu: Triton LayerNorm, SiLU on load (silu_qkv: q, k, v in place + append; u in LN*U)
#   zero: silu, and silu_qkv clears the attention's split-K sum buffer (no memset launch)
#   new:  zero, and the residual added in place past layer 0 (no device copy of x a layer)
#   notma: new, with full-mode attention tiles on per-thread async copies (policy tma off)
#   nohopper: new, with full mode on the portable Triton kernel (policy hopper off; TMA on)
SEED = dict(num_layers=8, hidden=1024, num_heads=H, head_dim=D, scaling_length=4352)
BLOCK_CASES = [  # name, B, history, new, candidates
    ("B=1 cached T=4096", 1, 4096, 128, 256),
    ("B=8 cached T=4096", 8, 4096, 128, 256),
    ("B=1 full T=4096", 1, 4096, 4096, 256),
    ("B=8 full T=4096", 8, 4096, 4096, 256),
    ("B=1 cached T=1024", 1, 1024, 128, 256),
    ("B=1 cached T=2048", 1, 2048, 128, 256),
]


def variant_policy(variant) -> KernelPolicy:
    """The policy a variant runs under (each policy has its own tuned table)."""
    return KernelPolicy(
        silu_on_load=variant in ("silu", "zero", "new", "notma", "nohopper"),
        tma=variant != "notma",
        hopper=variant not in ("notma", "nohopper"),
    )


def variant_kernels(variant, policy):
    """The ops of a variant: the policy's, with the older code paths swapped back in."""
    from hstu_exp.ops import fused, kernels

    k = kernels("triton", policy)
    if variant == "old":
        k = dataclasses.replace(k, layernorm=fused.layernorm_torch)
    if variant == "silu":
        k = dataclasses.replace(k, attention_splits=lambda *a: False)
    if variant not in ("new", "notma", "nohopper"):
        k = dataclasses.replace(k, residual_in_place=False)
    return k


def block_case(B, T, n, c, seed=0):
    """x, batch, pool (None in full mode) for B users: T history tokens (T - n of them cached,
    random post-SiLU-like K/V) and c candidates each."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = [n + c] * B
    x = torch.randn(sum(rows), SEED["hidden"], generator=g, device="cuda").to(DT)
    if n == T:
        return x, make_batch(rows, [c] * B, "cuda"), None
    cache = PagedKVCache(
        num_layers=SEED["num_layers"],
        num_pages=B * -(-T // PAGE) + 2,
        page_size=PAGE,
        num_heads=H,
        head_dim=D,
        dtype=DT,
        device="cuda",
    )
    users = list(range(B))
    cache.plan(users, [T - n] * B, [0] * B)
    for layer in cache.pool:
        layer.copy_(torch.randn(layer.shape, generator=g, device="cuda") * 0.5)
    return x, make_batch(rows, [c] * B, "cuda", cache.plan(users, [n] * B, [c] * B)), cache.pool


def replay_ms(graph, reps):
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def block_verify(blk, x, batch, pool):
    """Relative error (max abs err / max abs ref) of the bf16 triton block against the float32
    reference block on the same inputs (the CLI's verify measure)."""
    ref = copy.deepcopy(blk).float()
    ref.kernel = "reference"
    with torch.no_grad():
        want = ref(x.float(), batch, None if pool is None else pool.float())
        got = blk(x, batch, None if pool is None else pool.clone())
    return float((got.float() - want).abs().max() / want.abs().max())


def profile_block(blk, x, batch, pool, iters=3):
    """Per-kernel device time a block call (eager: the kernels are those the graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        blk(x, batch, pool)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                blk(x, batch, pool)
            torch.cuda.synchronize()
    rows = [
        (e.key, e.device_time_total / iters, e.count / iters)
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    rows.sort(key=lambda r: -r[1])
    launches = sum(r[2] for r in rows)
    print(
        f"    {launches:.0f} kernels a call ({launches / SEED['num_layers']:.1f} a layer), "
        f"{sum(r[1] for r in rows) / 1e3:.3f} ms of kernel time",
        flush=True,
    )
    for key, us, count in rows[:10]:
        print(f"      {us:8.1f} us  x{count:4.0f}  {key[:90]}", flush=True)


def block_main(variants, reps, profile_cases, only=()):
    from hstu_exp.model import hstu
    from hstu_exp.model.hstu import HSTUBlock

    torch.manual_seed(0)
    blk = HSTUBlock(**SEED, kernel="triton").cuda().to(DT).eval()
    current = {"v": "new"}
    # The block looks its ops up by (name, policy); the older code paths (old, ln, silu, zero)
    # are no policy of the library, so this script swaps them in at that lookup.
    original = hstu.kernels
    hstu.kernels = lambda name, policy: (
        variant_kernels(current["v"], policy) if name == "triton" else original(name, policy)
    )
    table = []
    for name, B, T, n, c in BLOCK_CASES:
        if only and name not in only:
            continue
        t0 = time.time()
        x, batch, pool = block_case(B, T, n, c)
        if B == 1:
            print(f"  {name}: verify rel err {block_verify(blk, x, batch, pool):.2e}", flush=True)
        captured = {}
        for v in variants:
            current["v"] = v
            # read at launch and baked into the capture; a fresh policy tunes its own launches
            blk.policy = variant_policy(v)
            with torch.no_grad():
                captured[v], _ = capture(lambda x=x, batch=batch, pool=pool: blk(x, batch, pool))
        blk.policy = variant_policy("new")
        ms = {v: [] for v in variants}
        for _ in range(2):  # interleaved rounds
            for v in variants:
                ms[v].append(replay_ms(captured[v], reps))
        best = {v: min(t) for v, t in ms.items()}
        table.append((name, best))
        print(
            f"  {name}: "
            + "  ".join(
                f"{v} {best[v]:.3f} ms ({'/'.join(f'{t:.3f}' for t in ms[v])})" for v in variants
            )
            + f"  [{time.time() - t0:.0f}s]",
            flush=True,
        )
        if name in profile_cases:
            for v in ("old", "new"):
                current["v"] = v
                blk.policy = variant_policy(v)
                print(f"  profile {name} {v}:", flush=True)
                profile_block(blk, x, batch, pool)
        del captured, x, batch, pool
        torch.cuda.empty_cache()
    print("\n| block case (graph replay, median ms, best of 2 rounds) | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for name, best in table:
        print(f"| {name} | " + " | ".join(f"{best[v]:.3f}" for v in variants) + " |")


def inversion_main():
    """Attention alone at B=1 cached for several T: rule, autotune and fixed splits, with the
    launch each picks (the T=1024 vs T=4096 block inversion)."""
    print("== attention alone, B=1, 128 new + 256 candidates, graph ms ==", flush=True)
    for T in (1024, 4096):
        case = make_case(1, T, 128, 256)
        flops = 4 * H * D * case["pairs"]
        for label, kw in [
            ("rule", {}),
            ("tuned-evt", {"autotune": True, "timing": "events"}),
            ("tuned-grf", {"autotune": True, "timing": "graph"}),
            ("split=1", {"split_k": 1}),
            ("split=4", {"split_k": 4}),
            ("split=8", {"split_k": 8}),
            ("split=16", {"split_k": 16}),
        ]:
            att = tri.Attention(
                KernelPolicy(autotune=kw.pop("autotune", False), tune_timing=kw.pop("timing", "graph"))
            )
            call(att, case, **kw)
            torch.cuda.synchronize()
            info = f"{att.last_launch.get('config')} splits {att.last_launch.get('splits')}"
            with torch.cuda.stream(torch.cuda.Stream()):
                gms = do_bench_cudagraph(
                    lambda att=att, case=case, kw=kw: call(att, case, **kw), rep=30, return_mode="median"
                )
            print(
                f"  T={T:5} {label:9} {gms * 1e3:7.1f} us  {flops / gms / 1e9:4.0f} TF/s  {info}",
                flush=True,
            )
        del case


def one_main(name):
    """One launch of a goal case by the rule (no tuning): a target for ncu."""
    att = tri.Attention(KernelPolicy(autotune=False, tma=os.environ.get("TMA", "1") == "1"))
    _, B, T, n, c, heads, dim, _ = next(g for g in GOALS if g[0].replace(" ", "") == name)
    case = make_case(B, T, n, c, heads=heads, dim=dim)
    torch.cuda.synchronize()
    call(att, case)
    torch.cuda.synchronize()
    print(f"{name}: {kernel_info(att)} config {att.last_launch.get('config')}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also time other tile configs / splits")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-ref", action="store_true", help="skip timing the reference")
    ap.add_argument("--block", action="store_true", help="time the whole block's variants")
    ap.add_argument("--variants", default="old,ln,silu,zero,new")
    ap.add_argument("--cases", default="", help="comma-separated block case names (all: empty)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--profile", default="B=1 cached T=4096,B=8 full T=4096")
    ap.add_argument("--inversion", action="store_true", help="attention alone at B=1 vs T")
    ap.add_argument(
        "--only",
        default="",
        help="goal cases whose name holds one of these, comma-separated (e.g. full)",
    )
    ap.add_argument("--labels", default="", help="timed variants, comma-separated (all: empty)")
    ap.add_argument("--one", default="", help="one launch of a goal case, e.g. pagedB=1 (ncu)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if args.one:
        return one_main(args.one)
    if args.block or args.inversion:
        print(
            f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}",
            flush=True,
        )
        if args.inversion:
            inversion_main()
        if args.block:
            block_main(
                args.variants.split(","),
                args.reps,
                args.profile.split(","),
                [c for c in args.cases.split(",") if c],
            )
        return
    t0 = time.time()
    print(
        f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}"
        f"  SMs {torch.cuda.get_device_properties(0).multi_processor_count}",
        flush=True,
    )
    worst = 0.0 if args.no_check else check_correctness()
    print(
        f"[{time.time() - t0:.0f}s] == timing (bf16, page {PAGE}); ms: do_bench (L2 flushed) / "
        f"back-to-back eager / CUDA graph ==",
        flush=True,
    )
    rows = []
    for name, B, T, n, c, heads, dim, goal in GOALS + (EXTRA if args.sweep else []):
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        case = make_case(B, T, n, c, heads=heads, dim=dim)
        flops = 4 * heads * dim * case["pairs"]
        ref = reference_fp32(case)
        variants = [("triton auto", {"hopper": False}), ("hopper", {"config": tri.HOPPER_CONFIG})]
        if args.sweep:  # the Hopper kernel's knobs
            variants += [
                ("triton split=1", {"split_k": 1, "hopper": False}),
                ("hopper split=1", {"config": tri.HOPPER_CONFIG, "split_k": 1}),
            ]
            if case["paged"]:
                variants += [
                    (f"hopper split={n}", {"config": tri.HOPPER_CONFIG, "split_k": n})
                    for n in (4, 8, 16)
                ]
            else:
                variants += [
                    ("hopper all pairs", {"config": tri.HOPPER_CONFIG, "group": 10**6}),
                    ("hopper ks3", {"config": C(128, 64, 4, 3, "hopper")}),
                    ("triton auto no-tma", {"tma": False, "hopper": False}),
                ]
            if dim <= 128:  # D=128 candidates: half the head dim frees the registers and shared
                # memory for 128-key boxes (the S tile grows as the O accumulator shrinks)
                variants += [
                    ("hopper n128", {"config": C(128, 128, 4, 2, "hopper")}),
                    ("hopper n128 ks3", {"config": C(128, 128, 4, 3, "hopper")}),
                ]
        if not case["paged"]:
            variants.append(("hopper pairs in turn", {"config": tri.HOPPER_CONFIG, "group": 1}))
        variants += [("tuned", {"autotune": True})]
        if args.sweep:
            variants.append(("triton exact-silu", {"exact": True}))
            variants += [
                (
                    f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} split={split}",
                    {"config": cfg, "split_k": split},
                )
                for cfg, split in SWEEP.get(name, [])
            ]
        for label, kw in variants:
            if args.labels and label not in args.labels.split(","):
                continue
            kw = dict(kw)
            att = tri.Attention(
                KernelPolicy(
                    autotune=kw.pop("autotune", False),
                    fast_silu=not kw.pop("exact", False),
                    tma=kw.pop("tma", True),
                    hopper=kw.pop("hopper", True),
                    hopper_group=kw.pop("group", KernelPolicy.hopper_group),
                )
            )
            try:
                out = call(att, case, **kw)
                rel, _ = rel_err(out, ref)
                times = time_it(lambda att=att, case=case, kw=kw: call(att, case, **kw))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory; keep going
                print(f"  {name} {label}: {type(e).__name__} {e}"[:300], flush=True)
                continue
            rows.append((name, label, *times, flops, rel, goal))
            print(
                f"  {name} {label:28} {times[0]:.3f} / {times[1]:.3f} / {times[2]:.3f} ms  "
                f"{flops / times[2] / 1e9:4.0f} TFLOP/s (graph)  host {times[3]:.0f} us  "
                f"rel {rel:.1e}  {kernel_info(att)}",
                flush=True,
            )
        if not args.no_ref:
            with torch.no_grad():
                times = time_it(lambda case=case: call(reference, case))
            rows.append((name, "reference (bf16)", *times, flops, float("nan"), goal))
        del case, ref
        torch.cuda.empty_cache()
        print(f"[{time.time() - t0:.0f}s] {name} done", flush=True)

    print(
        "\n| case | variant | do_bench ms | eager ms | graph ms | TFLOP/s do_bench / eager / "
        "graph | rel err | goal |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, label, ms, loop_ms, gms, _host, flops, rel, goal in rows:
        tf = " / ".join(f"{flops / t / 1e9:.0f}" for t in (ms, loop_ms, gms))
        print(
            f"| {name} | {label} | {ms:.3f} | {loop_ms:.3f} | {gms:.3f} | {tf} | {rel:.1e} | "
            f"{goal or ''} |"
        )
    print(f"worst correctness rel error {worst:.2e}; total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
