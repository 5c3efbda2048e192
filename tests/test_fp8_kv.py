"""The FP8 KV cache (cache.dtype=fp8): e4m3 K/V with a float32 scale per token per head.

The quantise / dequantise round trip against e4m3's precision; the paged attention reading e4m3
pages (reference and Triton, Triton's interpreter on CPU) against an independent float64 oracle
on the unquantised K/V, with the tolerance propagated from e4m3's precision; the host tier moving
pages and scales bit-exact; the CLI's bad inputs; and a block point gated by its accuracy gate.
"""

import copy
import json
import math

import pytest
import torch
from helpers import hstu_exp
from test_block_kernels import HIDDEN, full_and_cached, reference_block

from hstu_exp.core.jagged import make_batch
from hstu_exp.kvcache.offload import OffloadPagedKVCache
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.hstu import oracle
from hstu_exp.ops import kernels
from hstu_exp.ops.fp8 import E4M3, Fp8Pages, dequantize_tokens, quantize_tokens
from hstu_exp.ops.policy import KernelPolicy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# e4m3: 3 mantissa bits, so a normal value rounds to within 2^-4 of its magnitude; below the
# smallest normal (2^-6, times the token-head's scale) the step is 2^-9, so within 2^-10 of it.
REL, SUB = 2.0**-4, 2.0**-10


def rel(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


def round_trip_bound(x, scale):
    return REL * x.abs() + SUB * scale[..., None]


@pytest.mark.parametrize("shape", [(1, 1, 16), (37, 3, 32), (5, 2, 256)])
def test_quantise_round_trip_is_within_e4m3_precision(shape):
    x = torch.randn(*shape, dtype=torch.float64).float() * torch.rand(shape[0], 1, 1) * 50
    x[shape[0] // 2] = 0.0  # a dead token: a finite scale, zeros back
    q, scale = quantize_tokens(x)
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == shape[:2]
    torch.testing.assert_close(scale, (x.abs().amax(-1) / 448).clamp_min(1e-12), rtol=0, atol=0)
    back = dequantize_tokens(q, scale)
    assert bool(((back - x).abs() <= round_trip_bound(x, scale)).all())
    live = x.abs().amax(-1) > 0
    assert bool((q.float().abs().amax(-1)[live] == 448).all())  # each token-head uses the range
    assert bool((back[~live] == 0).all())


def attention_oracle(q, k, v, kv_hist, cached, new, cands, alpha, inv_n):
    """float64 HSTU attention, user by user, from its definition: history query i of a user sees
    history keys 0..cached+i, a candidate sees every history key and itself (its own k, v).
    kv_hist[b]: (K, V) [cached + new, H, D] of user b's history, in float64."""
    out, row = [], 0
    for b, (c, n, m) in enumerate(zip(cached, new, cands)):
        K, V = kv_hist[b]
        for i in range(n + m):
            qi = q[row + i].double()
            if i < n:
                keys, vals = K[: c + i + 1], V[: c + i + 1]
            else:  # a candidate: all history, then itself
                keys = torch.cat([K, k[row + i].double()[None]])
                vals = torch.cat([V, v[row + i].double()[None]])
            s = torch.einsum("hd,khd->kh", qi, keys) * alpha
            p = s * torch.sigmoid(s) * inv_n
            out.append(torch.einsum("kh,khd->hd", p, vals))
        row += n + m
    return torch.stack(out) if out else q.new_zeros(0, *q.shape[1:]).double()


def error_bound(q, kv_hist, cached, new, cands, alpha, inv_n, unit=0.0):
    """(bound, magnitude) per output element. bound: what e4m3 K/V may cost it, propagated from
    the round trip: a key within e_k = 2^-4 |k| + 2^-10 scale moves a score by at most
    alpha |q|.e_k, SiLU's slope is at most 1.1, so p moves by dp <= 1.1 alpha |q|.e_k / N; a
    value within e_v moves the output by |p| e_v; over the visible history keys
    |out - oracle| <= sum_k dp_k (|v_k| + e_v,k) + |p_k| e_v,k (a candidate's own key is not
    quantised). magnitude: sum_k |p_k| |v_k| over all visible keys, what the compute dtype's
    rounding is relative to. unit: the compute dtype's unit roundoff (the kernel dequantises
    K and V into it: one more rounding of each)."""
    bound, mag, row = [], [], 0
    for b, (c, n, m) in enumerate(zip(cached, new, cands)):
        K, V = kv_hist[b]
        ek = round_trip_bound(K, K.abs().amax(-1) / 448)
        ev = round_trip_bound(V, V.abs().amax(-1) / 448)
        ek, ev = ek + unit * (K.abs() + ek), ev + unit * (V.abs() + ev)
        for i in range(n + m):
            qi = q[row + i].double()
            last = c + i + 1 if i < n else c + n
            s = torch.einsum("hd,khd->kh", qi, K[:last]) * alpha
            p = (s * torch.sigmoid(s)).abs() * inv_n
            dp = 1.1 * alpha * torch.einsum("hd,khd->kh", qi.abs(), ek[:last]) * inv_n
            bound.append(
                torch.einsum("kh,khd->hd", dp, V[:last].abs() + ev[:last])
                + torch.einsum("kh,khd->hd", p, ev[:last])
            )
            mag.append(torch.einsum("kh,khd->hd", p, V[:last].abs()))
        row += n + m
    return torch.stack(bound), torch.stack(mag)


# (cached, new, candidates) per user: odd lengths, page boundaries (page 8), zero-length cached
# and new histories, users without candidates.
CASES = [
    ([13], [5], [3]),
    ([0, 8, 16], [8, 1, 0], [0, 4, 2]),
    ([7, 0, 24], [9, 3, 8], [1, 0, 5]),
    ([31, 5], [0, 0], [2, 3]),
]
# Triton on the CPU interpreter in float32 and fp16 (its bf16 dot is wrong); bf16 on a GPU.
HALF = torch.float16 if DEVICE == "cpu" else torch.bfloat16
KERNELS = [("reference", torch.float32), ("reference", torch.bfloat16)]
KERNELS += [("triton", torch.float32), ("triton", HALF)]


@pytest.mark.parametrize("kernel,dtype", KERNELS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_attention_reads_e4m3_pages(kernel, dtype, case):
    """History K/V quantised into the pool (the prefix as written, the new rows by the kernel
    set's own append), then the paged attention on e4m3 pages vs the float64 oracle on the
    unquantised K/V, within the propagated e4m3 bound (plus the compute dtype's rounding)."""
    cached, new, cands = CASES[case]
    gen = torch.Generator().manual_seed(case)
    H, D, page = 2, 32, 8
    B = len(cached)
    ops = kernels(kernel, KernelPolicy(autotune=False))
    cache = PagedKVCache(
        num_layers=1,
        num_pages=sum(-(-(c + n) // page) for c, n in zip(cached, new)) + 3,
        page_size=page,
        num_heads=H,
        head_dim=D,
        dtype=dtype,
        device=DEVICE,
        fp8=True,
    )
    users = list(range(B))
    cache.plan([99], [page + 1], [0])  # another user's pages first: ids are not 0..n
    table = cache.plan(users, cached, [0] * B)
    prefix = [torch.randn(2, c, H, D, generator=gen) * 2 for c in cached]
    flat = torch.cat(prefix, dim=1).to(DEVICE, dtype)
    prefix = [x.to(dtype).float() for x in prefix]  # what the pool was given
    layer = cache.kv[0]
    ops.append_kv(layer, table.new_rows, table.new_page, table.new_slot, flat[0], flat[1])
    table = cache.plan(users, new, cands)
    batch = make_batch([n + m for n, m in zip(new, cands)], cands, DEVICE, table)
    q, k, v = (torch.randn(sum(new) + sum(cands), H, D, generator=gen).to(DEVICE, dtype) for _ in "qkv")
    ops.append_kv(layer, table.new_rows, table.new_page, table.new_slot, k, v)
    alpha, inv_n = 1 / math.sqrt(D), 1 / 64
    got = ops.attention_paged(q, k, v, batch, layer[:, 0], layer[:, 1], alpha=alpha, inv_n=inv_n)

    stored = dequantize_tokens(cache.pool[0].cpu(), cache.scales[0].cpu()).double()
    kv_hist, row = [], 0
    for b, (c, n, m) in enumerate(zip(cached, new, cands)):
        K = torch.cat([prefix[b][0], k[row : row + n].float().cpu()]).double()
        V = torch.cat([prefix[b][1], v[row : row + n].float().cpu()]).double()
        kv_hist.append((K, V))
        pos = torch.arange(c + n)
        ids = torch.tensor(cache.users[b].pages.tolist(), dtype=torch.long)[pos // page]
        for kv, x in enumerate((K, V)):  # the pool holds each key's round trip
            held = stored[ids, kv, pos % page]
            assert bool(((held - x).abs() <= round_trip_bound(x, x.abs().amax(-1) / 448) + 1e-12).all())
        row += n + m
    qc, kc, vc = (t.float().cpu() for t in (q, k, v))
    want = attention_oracle(qc, kc, vc, kv_hist, cached, new, cands, alpha, inv_n)
    unit = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    bound, mag = error_bound(qc, kv_hist, cached, new, cands, alpha, inv_n, unit)
    # the compute dtype: a half type rounds p and the output (2^-11 each in fp16, 2^-8 in bf16)
    slack = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}[dtype] * mag + 1e-7
    err = (got.double().cpu() - want).abs()
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    assert bool((err <= bound + slack).all()), float((err - bound - slack).max())
    assert float(err.max()) > 0  # the quantised keys made a difference the oracle sees


@pytest.mark.parametrize("case,silu_on_load", [(0, True), (1, False)])
def test_block_with_e4m3_kv_against_the_float32_oracle(case, silu_on_load):
    """The whole block, cached, with K/V in e4m3 (the fused SiLU + append or the plain append
    quantising, the attention reading e4m3): within the gate of the float32 oracle, the Triton
    block close to the reference block (both quantise the same K/V), and less exact than the
    same block with a bf16 cache (the e4m3 path ran)."""
    hist, cached, cands = (
        ([37, 5, 16], [20, 0, 8], [3, 2, 0]) if case == 0 else ([9, 40], [9, 17], [4, 1])
    )
    ref = reference_block(case + 3)
    seqs = [torch.randn(t + c, HIDDEN, device=DEVICE) for t, c in zip(hist, cands)]
    with torch.no_grad():
        want = full_and_cached(oracle(ref), seqs, hist, cached, cands, torch.float32)[1]
        got = {}
        for kernel, dtype in (("reference", torch.bfloat16), ("triton", HALF)):
            block = copy.deepcopy(ref).to(dtype)
            block.kernel, block.policy = kernel, KernelPolicy(autotune=False, silu_on_load=silu_on_load)
            got[kernel, "fp8"] = full_and_cached(block, seqs, hist, cached, cands, dtype, fp8=True)[1]
            got[kernel, "bf16"] = full_and_cached(block, seqs, hist, cached, cands, dtype)[1]
    err = {key: rel(out, want) for key, out in got.items()}
    assert all(e < 2e-2 for e in err.values()), err
    assert err["triton", "fp8"] > err["triton", "bf16"], err
    assert rel(got["triton", "fp8"], got["reference", "fp8"].float()) < 2e-2


def test_offload_moves_e4m3_pages_and_scales_bit_exact():
    """Evicted users' e4m3 pages and scales go to the host tier and come back unchanged; the
    bytes moved count both and are about half of a bf16 cache's."""
    H, D, page = 2, 64, 4

    def cache(fp8):
        return OffloadPagedKVCache(
            host_pages=8,
            num_layers=2,
            num_pages=4,
            page_size=page,
            num_heads=H,
            head_dim=D,
            dtype=torch.bfloat16,
            device=DEVICE,
            fp8=fp8,
        )

    c, half = cache(True), cache(False)
    assert c.host_pool.dtype == E4M3 and c.host_scales.shape == (2, 8, 2, page, H)
    table = c.plan([0], [7], [0])
    x = torch.randn(7, 2, 2, H, D) * 3  # token, layer, K/V
    for layer in range(2):
        for kv in range(2):
            data, scale = quantize_tokens(x[:, layer, kv])
            c.pool[layer, table.new_page, kv, table.new_slot] = data.to(DEVICE)
            c.scales[layer, table.new_page, kv, table.new_slot] = scale.to(DEVICE)
    pages = c.users[0].pages.tolist()
    before = (c.pool[:, pages].clone(), c.scales[:, pages].clone())
    c.plan([1], [16], [0])  # evicts user 0 to the host tier
    assert 0 in c.host_users
    c.plan([0], [0], [0])  # back onto (other) GPU pages
    hook = c.layer_hook()  # on CUDA compute waits for each layer's onload here
    for layer in range(2 if hook else 0):
        hook(layer)
    pages = c.users[0].pages.tolist()
    assert torch.equal(c.pool[:, pages].view(torch.uint8), before[0].view(torch.uint8))
    assert torch.equal(c.scales[:, pages], before[1])
    moved = c.transfer_stats()
    # user 0's 2 pages out and back, user 1's 4 out to make room for it
    assert (moved["offloaded_bytes"], moved["onloaded_bytes"]) == (6 * c.page_bytes, 2 * c.page_bytes)
    assert c.page_bytes == 2 * 2 * page * H * (D + 4)  # layers x K/V x slots x heads x (e4m3 + scale)
    assert c.page_bytes / half.page_bytes == (D + 4) / (2 * D)
    assert c.token_bytes == c.page_bytes // page and c.nbytes / half.nbytes == (D + 4) / (2 * D)


BLOCK = [
    "logger=none",
    "device=cpu",
    "calibrate=false",
    "workload=block",
    "workload.total_history=48",
    "workload.new_history=9",
    "workload.num_candidates=5",
    "workload.batch_size=2",
    "workload.min_time_s=0.01",
    "workload.iters=3",
    "workload.warmup=1",
    "workload.cv_max=10",
]


def test_cli_block_point_with_an_fp8_cache_passes_its_gate(tmp_path):
    """A bf16 tiny model, cached block, K/V in bf16 and in e4m3: the fp8 point is verified and
    gated, within the gate, and its record says the pool's bytes per token and users held (its
    bytes about half of bf16's)."""
    proc = hstu_exp(
        "-m", *BLOCK, "model=tiny", "model.dtype=bfloat16", "cache.dtype=bf16,fp8", "verify=true",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    recs = {
        r["cache_dtype"]: r
        for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    }
    bf16, fp8 = recs["bf16"], recs["fp8"]
    assert bf16["status"] == fp8["status"] == "ok", (bf16.get("error"), fp8.get("error"))
    assert fp8["accuracy_gate"] == "passed" and "accuracy_gate" not in bf16
    # e4m3 K/V change the outputs (another computation than bf16's), within the gate: at this
    # size the block's bf16 rounding is as large as what e4m3 keys and values add
    assert fp8["max_rel_error"] < 2e-2 and fp8["max_rel_error"] != bf16["max_rel_error"]
    assert (fp8["kv_dtype"], bf16["kv_dtype"]) == ("fp8", "bfloat16")
    assert fp8["kv_token_bytes"] == 2 * 2 * 2 * (32 + 4)  # layers x K/V x heads x (e4m3 + scale)
    assert bf16["kv_token_bytes"] == 2 * 2 * 2 * 32 * 2
    assert fp8["kv_pool_users"] == bf16["kv_pool_users"] > 0
    assert fp8["kv_pool_bytes"] / bf16["kv_pool_bytes"] == (32 + 4) / 64


def test_cli_serve_with_an_fp8_cache_passes_its_gate_and_moves_half_the_bytes(tmp_path):
    """The serving smoke scenario (simulated clock, real server, host tier) with K/V in bf16
    and in e4m3, same arrivals: the fp8 point passes its gate on the sampled requests (serve
    verifies scores, it has no top-k; sampled with verify=false too, for the gate), serves the
    same requests from the host tier and moves (D + 4) / 2D of bf16's bytes each way (D = 32:
    e4m3 plus a float32 scale a token-head)."""
    proc = hstu_exp(
        "-m", "experiment=serve_smoke", "workload.clock=simulated", "model.dtype=bfloat16",
        "cache=paged_offload", "cache.dtype=bf16,fp8", "verify=false", f"hydra.sweep.dir={tmp_path}",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    recs = {
        r["cache_dtype"]: r
        for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    }
    bf16, fp8 = recs["bf16"], recs["fp8"]
    assert bf16["status"] == fp8["status"] == "ok", (bf16.get("error"), fp8.get("error"))
    assert fp8["verify"] is False and fp8["accuracy_gate"] == "passed" and fp8["max_rel_error"] < 2e-2
    assert bf16.get("max_rel_error") is None  # verify=false: a bf16 point is not verified
    assert fp8["host_requests"] == bf16["host_requests"] > 0
    for key in ("onloaded_bytes", "offloaded_bytes", "kv_token_bytes", "kv_pool_bytes"):
        assert fp8[key] * 64 == bf16[key] * 36 > 0, key
    assert fp8["kv_pool_users"] == bf16["kv_pool_users"]


def test_real_server_gates_an_fp8_cache_with_verify_off(tmp_path):
    """verify=false does not switch a reduced-precision point's gate off: the real server
    gates it on the warm-up's answers before LoadGen's run, and samples the scores LoadGen
    received for the gate after it (the simulated clock: the test above). Before, the real
    server sampled only with verify=true, so the gate met no scores and failed an fp8 goal
    search after its whole run ("max relative error nan")."""
    proc = hstu_exp(
        "-m", "experiment=serve_smoke", "model.dtype=bfloat16", "cache=paged", "cache.dtype=fp8",
        "verify=false", f"hydra.sweep.dir={tmp_path}", env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (r,) = map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    assert r["clock"] == "real" and r["status"] == "ok", r.get("error")
    assert "accuracy gate before the runs:" in proc.stdout + proc.stderr
    assert r["verify"] is False and r["accuracy_gate"] == "passed"
    assert 0 <= r["max_rel_error"] < 2e-2


@pytest.mark.parametrize("clock", ["real", "simulated"])
def test_serve_fails_an_fp8_point_that_misses_its_gate_before_any_run(tmp_path, monkeypatch, clock):
    """Both clocks gate a reduced-precision point on its warm-up's answers (a warm cache's hits
    among them): a point that misses fails before LoadGen's first run (real) or the first trial
    (simulated), untimed, and the failure keeps the error and the pool's capacity. A gate of 0
    makes any fp8 error miss it."""
    from hydra import compose, initialize_config_dir

    from hstu_exp.bench import serve
    from hstu_exp.bench.measure import AccuracyGateError
    from hstu_exp.cli import CONF_DIR
    from hstu_exp.config import ACCURACY_GATE

    overrides = ["experiment=serve_smoke", "model.dtype=bfloat16", "cache=paged"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=overrides + ["cache.dtype=fp8", "verify=false", f"workload.clock={clock}"],
        )
    monkeypatch.setitem(ACCURACY_GATE, "max_rel_error", 0.0)
    said = []
    torch.manual_seed(cfg.seed)
    with pytest.raises(AccuracyGateError, match=r"cache.dtype=fp8 failed: max relative error") as exc:
        serve.run(cfg, torch.device("cpu"), progress=said.append, job_dir=tmp_path)
    assert not (tmp_path / "loadgen").exists()  # no LoadGen run started
    gate = [s for s in said if s.startswith("accuracy gate before the runs:")]
    assert len(gate) == 1 and "warm-up requests" in gate[0], said
    assert not any(s.startswith(("LoadGen", "clock: simulated", "max_qps")) for s in said), said
    kept = exc.value.record_fields
    assert 0 < kept["max_rel_error"] < 2e-2 and kept["kv_pool_users"] > 0


def test_cli_e2e_applies_the_top_k_gate_to_an_fp8_cache(tmp_path):
    """e2e ranks with the e4m3 cache and compares the top-10 with the bf16 path. The tiny
    model's random weights give near-tied scores (the bf16 path itself shares well under 0.99 of
    its top-10 with the float32 recompute), so the gate counts a rank the bf16 path cannot
    resolve as agreeing; the record keeps the strict agreement, the tolerant one and how many
    candidates lie inside the bf16 path's error band."""
    proc = hstu_exp(
        "workload=e2e", "device=cpu", "model=tiny", "model.dtype=bfloat16", "cache.dtype=fp8",
        "logger=none", "calibrate=false", "workload.min_time_s=0.01", "workload.iters=3",
        "workload.warmup=1", "workload.num_batches=8", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    (r,) = map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    assert r["status"] == "ok" and r["accuracy_gate"] == "passed", proc.stdout[-2000:]
    assert r["max_rel_error"] < 2e-2
    assert 0.99 <= r["topk_agreement_within_bf16_error"] <= 1.0
    assert r["topk_agreement"] <= r["topk_agreement_within_bf16_error"]
    assert r["bf16_topk_agreement"] < 0.99  # the reason for the tolerance, measured
    assert 0 < r["topk_near_kth_share"] < 1
    assert r["kv_dtype"] == "fp8" and r["kv_token_bytes"] == 2 * 2 * 2 * (32 + 4)


def test_cli_triton_block_with_an_fp8_cache_says_which_kernel_ran(tmp_path):
    """kernel=triton on e4m3 pages (Triton's interpreter on CPU in fp16; bf16 on a GPU): gated,
    and the record names the attention kernel that ran (the portable one: the Hopper kernel
    reads half-precision pages only)."""
    small = [a for a in BLOCK if not a.startswith(("workload.b", "workload.total", "device"))]
    device, dtype = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float16")
    proc = hstu_exp(
        *small, f"device={device}", "workload.batch_size=1", "workload.total_history=24",
        "model=tiny", "model.num_layers=1", f"model.dtype={dtype}", "kernel=triton",
        "kernel.autotune=false", "cache.dtype=fp8", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (r,) = map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    assert r["status"] == "ok", r.get("error")
    assert r["accuracy_gate"] == "passed" and r["max_rel_error"] < 2e-2
    assert r["attention_kernel"] == "triton" and r["kv_dtype"] == "fp8"


@pytest.mark.parametrize(
    "args,message",
    [
        (["model=tiny"], "cache.dtype=fp8 needs a half-precision model (model.dtype=bfloat16"),
        (["model=tiny", "model.dtype=bfloat16", "cache=none", "workload.new_history=48"],
         "cache.dtype=fp8: cache=none keeps no KV cache"),
        (["model=tiny", "model.dtype=bfloat16", "cache.dtype=fp16"],
         "cache.dtype=fp16: must be one of bf16, fp8"),
    ],
)  # fmt: skip
def test_cli_rejects_an_fp8_cache_it_cannot_serve(tmp_path, args, message):
    proc = hstu_exp(*BLOCK, "cache.dtype=fp8", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("hstu-exp: error: ") and message in line, line
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_e2e_baseline_with_an_fp8_cache_is_named():
    from omegaconf import OmegaConf

    from hstu_exp.config import point_problem

    cfg = OmegaConf.create(
        {
            "model": {"dtype": "bfloat16"},
            "cache": {"mode": "paged", "dtype": "fp8"},
            "kernel": {"name": "reference", "gemm_dtype": "bf16"},
            "workload": {"name": "e2e", "mode": "baseline"},
        }
    )
    assert "workload.mode=baseline keeps no KV cache" in point_problem(cfg)


def test_fp8_pages_index_together():
    pool = PagedKVCache(
        num_layers=2, num_pages=3, page_size=4, num_heads=2, head_dim=16,
        dtype=torch.bfloat16, device="cpu", fp8=True,
    )  # fmt: skip
    kv = pool.kv
    assert isinstance(kv, Fp8Pages) and kv.data is pool.pool and kv.scales is pool.scales
    k_pages = kv[1][:, 0]
    assert k_pages.shape == (4, 4, 2, 16) and k_pages.scales.shape == (4, 4, 2)
    assert k_pages.data.data_ptr() == pool.pool[1][:, 0].data_ptr()


@pytest.mark.gpu
@torch.no_grad()
def test_fp8_cache_block_replays_in_a_cuda_graph():
    """The e4m3 cache under CUDA graphs (the fused SiLU + append quantising into the pool, padded
    rows into the scratch page, the attention reading e4m3): replays equal the eager block on
    its own e4m3 cache, batch after batch (the pools must hold the same K/V)."""
    from hstu_exp.graphs import BucketGraphs, GraphedBlock
    from hstu_exp.model.hstu import HSTUBlock

    torch.manual_seed(0)
    block = HSTUBlock(
        num_layers=2, hidden=64, num_heads=2, head_dim=32, scaling_length=600, kernel="triton"
    )
    block = block.cuda().to(torch.bfloat16).eval()

    def cache():
        return PagedKVCache(
            num_layers=2, num_pages=256, page_size=16, num_heads=2, head_dim=32,
            dtype=torch.bfloat16, device="cuda", fp8=True,
        )  # fmt: skip

    graphed, eager = cache(), cache()
    core = BucketGraphs(
        device="cuda", batch_buckets=[2, 4], token_buckets=[64, 128], pool=graphed.kv,
        page_size=16, max_history=512, scratch_page=graphed.scratch_page, fit_rows=True,
    )  # fmt: skip
    graphs = GraphedBlock(block, core, hidden=64, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    for users, new, cands in [([1, 2, 3], [30, 7, 50], [4, 9, 1]), ([2, 9], [1, 40], [20, 3])]:
        rows = [n + c for n, c in zip(new, cands)]
        x = torch.randn(sum(rows), 64, generator=gen).to("cuda", torch.bfloat16)
        batch = make_batch(rows, cands, "cuda", graphed.plan(users, new, cands))
        eager_batch = make_batch(rows, cands, "cuda", eager.plan(users, new, cands))
        out = graphs.replay(x, graphs.stage(batch, sum(rows))).clone()
        torch.testing.assert_close(out, block(x, eager_batch, eager.kv), rtol=2e-2, atol=2e-2)
