"""Triton HSTU attention against the PyTorch oracle (hstu_exp.ops.reference) on fresh random inputs.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), in float32
with tiny shapes and 16 x 16 tiles, so every path (causal diagonal, kv end, candidates, split-K
chunks, page gathers) is crossed by a few blocks. On a CUDA machine the same float32 tests run on
the GPU, and the `gpu` tests add bf16 at real sizes and a CUDA-graph capture.
Rows past the last user (CUDA-graph padding) are dead: the kernel writes zeros there, the oracle
whatever falls out of its gathers, so comparisons cover live rows and dead rows are checked apart.
"""

import math
import random

import pytest
import torch

from hstu_exp.core.jagged import make_batch
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.hstu import append_kv
from hstu_exp.ops import reference
from hstu_exp.ops import triton_attention as tri
from hstu_exp.ops.policy import KernelPolicy

CPU_CFG = tri.Config(16, 16, 4, 1)
NO_TUNE = KernelPolicy(autotune=False)
# The small float32 tests run on the GPU where there is one (the interpreter is off there).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check(out, ref, live: int, tol=1e-4):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    o, r = out[:live].float(), ref[:live].float()
    assert rel_err(o, r) < tol, rel_err(o, r)
    assert (o - r).abs().max().item() <= tol * max(r.abs().max().item(), 1e-3)
    assert (out[live:] == 0).all(), "dead rows past the last user must be zero"


def poisoned(rows, H, D, dtype, device):
    return torch.full((rows, H, D), float("nan"), dtype=dtype, device=device)


def full_case(rows, cands, H, D, *, dead=0, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(rows, cands, device)
    n = sum(rows) + dead
    q, k, v = ((torch.randn(n, H, D, generator=gen) * 0.5).to(device, dtype) for _ in range(3))
    return batch, q, k, v


def paged_case(
    cached,
    new,
    cands,
    H,
    D,
    page_size,
    *,
    dead=0,
    dtype=torch.float32,
    device=DEVICE,
    seed=0,
    num_pages=None,
):
    """A real PagedKVCache: prefixes written in a few interleaved rounds (so page ids are not in
    order and pages of different users interleave), then the request's new history appended
    through the block's own append_kv."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B = len(cached)
    total = sum(-(-(c + n) // page_size) for c, n in zip(cached, new))
    cache = PagedKVCache(
        num_layers=1,
        num_pages=num_pages or total + 4,
        page_size=page_size,
        num_heads=H,
        head_dim=D,
        dtype=dtype,
        device=device,
    )
    users = list(range(B))
    done = [0] * B
    for _ in range(3):  # prefixes in rounds: user pages interleave in the pool
        step = [rng.randint(0, c - d) if c > d else 0 for c, d in zip(cached, done)]
        cache.plan(users, step, [0] * B)
        done = [d + s for d, s in zip(done, step)]
    cache.plan(users, [c - d for c, d in zip(cached, done)], [0] * B)
    cache.pool.copy_(torch.randn(cache.pool.shape, generator=gen) * 0.5)
    table = cache.plan(users, new, cands)
    batch = make_batch([n + c for n, c in zip(new, cands)], cands, device, table)
    rows = sum(new) + sum(cands) + dead
    q, k, v = ((torch.randn(rows, H, D, generator=gen) * 0.5).to(device, dtype) for _ in range(3))
    pool = cache.pool[0]
    append_kv(pool, batch, k, v)
    return batch, q, k, v, pool[:, 0], pool[:, 1]


def run_full(batch, q, k, v, att=None, **kw):
    """att: the tri.Attention to call (default: one of its own, nothing tuned)."""
    D = q.shape[-1]
    out = poisoned(*q.shape, q.dtype, q.device)
    att = att or tri.Attention(NO_TUNE)
    got = att.full(q, k, v, batch, alpha=1 / math.sqrt(D), inv_n=1 / 64, out=out, **kw)
    assert got is out
    ref = reference.attention_full(
        q.float(), k.float(), v.float(), batch, alpha=1 / math.sqrt(D), inv_n=1 / 64
    )
    assert got.dtype == q.dtype
    return got, ref


def run_paged(batch, q, k, v, kp, vp, att=None, **kw):
    D = q.shape[-1]
    out = poisoned(*q.shape, q.dtype, q.device)
    att = att or tri.Attention(NO_TUNE)
    got = att.paged(q, k, v, batch, kp, vp, alpha=1 / math.sqrt(D), inv_n=1 / 64, out=out, **kw)
    assert got is out
    ref = reference.attention_paged(
        q.float(),
        k.float(),
        v.float(),
        batch,
        kp.float(),
        vp.float(),
        alpha=1 / math.sqrt(D),
        inv_n=1 / 64,
    )
    assert got.dtype == q.dtype
    return got, ref


# --- full mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,cands",
    [
        ([37], [5]),  # one user: diagonal blocks, a block holding history and candidates
        ([20, 0, 9, 33], [4, 0, 9, 0]),  # empty user, candidate-only user, no-candidate user
        ([1, 16, 17], [1, 0, 16]),  # block-edge lengths
    ],
)
@pytest.mark.parametrize("split_k", [1, 3])
def test_full_matches_reference(rows, cands, split_k):
    batch, q, k, v = full_case(rows, cands, H=2, D=32, dead=3)
    out, ref = run_full(batch, q, k, v, split_k=split_k, config=CPU_CFG)
    check(out, ref, sum(rows))


@pytest.mark.parametrize("D", [32, 64, 128, 256])
def test_full_head_dims(D):
    batch, q, k, v = full_case([19, 6], [3, 2], H=1, D=D, seed=D)
    out, ref = run_full(batch, q, k, v, config=CPU_CFG)
    check(out, ref, 25)


def test_full_non_contiguous_qkv_and_default_rule():
    """q, k, v as the block hands them over: column slices of one [rows, 4 H D] projection."""
    H, D = 3, 16
    batch = make_batch([21, 12], [6, 12], DEVICE)
    z = torch.randn(33, 4 * H * D, device=DEVICE)
    u, v, q, k = (t.reshape(-1, H, D) for t in z.split(H * D, dim=-1))
    assert not q.is_contiguous()
    out, ref = run_full(batch, q, k, v)  # default config and split rule
    check(out, ref, 33)


def test_policy_forces_splits():
    """KernelPolicy.split_k forces the splits of every launch that names none: 2 splits, then
    none, each checked against the reference and against what ran. The longer user spans two
    key blocks of every default tile (will_split judges the default; the run takes CPU_CFG)."""
    batch, q, k, v = full_case([200, 7], [8, 3], H=1, D=16)
    for forced, splits in ((2, 2), (1, 1)):
        att = tri.Attention(KernelPolicy(autotune=False, split_k=forced))
        assert att.will_split(q, batch, False) == (splits > 1)
        out, ref = run_full(batch, q, k, v, att=att, config=CPU_CFG)
        check(out, ref, 207)
        assert att.last_launch["splits"] == splits


def test_split_rule():
    # (query blocks, batch x heads, key blocks, query rows per key block), 132 resident programs
    assert tri.split_chunk(34, 32, 68, 2.0, 132, None) == 0  # batch 8 full: the grid fills the GPU
    assert tri.split_chunk(3, 32, 64, 2.0, 132, None) == 0  # batch 8 paged: 96 programs, one wave
    assert tri.split_chunk(3, 4, 64, 2.0, 132, None) == 6  # batch 1 paged: 11 splits, one wave
    # batch 1 full: 136 programs, the longest (68 key blocks) would run in a second wave alone
    assert 0 < tri.split_chunk(34, 4, 68, 2.0, 132, None) < 68
    assert tri.split_chunk(3, 4, 64, 2.0, 132, 1) == 0
    assert tri.split_chunk(3, 4, 64, 2.0, 132, 4) == 16
    assert tri.split_chunk(3, 4, 1, 2.0, 132, 4) == 0  # one key block: nothing to split
    assert tri.program_work(3, 64, 2.0) == [60, 62, 64]  # paged: queries after 58 cached blocks
    assert tri.program_work(3, 6, 2.0) == [2, 4, 6]  # full: causal
    seed = tri.Config(128, 64, 8, 2)
    assert tri.resident_slots(seed, 256, 132) == 132
    # the model: no split is one wave of the longest program; 11 splits, one wave of 6 + overheads
    work = tri.program_work(3, 64, 2.0)
    assert tri.modelled_time(0, work, 4, 132) == 64 + tri.PROGRAM_OVERHEAD_BLOCKS
    assert tri.modelled_time(6, work, 4, 132) < 20


def test_empty_and_dead_only():
    H, D = 2, 16
    batch = make_batch([0, 0], [0, 0], DEVICE)
    q = torch.randn(5, H, D, device=DEVICE)
    out = tri.attention_full(q, q, q, batch, alpha=0.25, inv_n=0.5)
    assert (out == 0).all()
    empty = torch.zeros(0, H, D, device=DEVICE)
    assert tri.attention_full(empty, empty, empty, batch, alpha=0.25, inv_n=0.5).shape == (0, H, D)


def test_rejects_bad_head_dim():
    batch, q, k, v = full_case([4], [1], H=1, D=24)
    with pytest.raises(ValueError, match="power of two"):
        tri.attention_full(q, k, v, batch, alpha=1.0, inv_n=1.0)


# --- paged mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("split_k", [1, 4])
def test_paged_matches_reference(page_size, split_k):
    # last pages after the append: 1 token (user 0), a full page (user 1), partial (user 3);
    # user 2 is candidate-only with a cached prefix, user 4 is empty.
    P = page_size
    cached = [2 * P, P - 5, 3 * P - 2, 7, 0]
    new = [1, 5, 0, 9, 0]
    cands = [6, 0, 4, 3, 0]
    batch, q, k, v, kp, vp = paged_case(
        cached, new, cands, H=2, D=32, page_size=P, dead=2, seed=P + split_k
    )
    assert not kp.is_contiguous()
    out, ref = run_paged(batch, q, k, v, kp, vp, split_k=split_k, config=CPU_CFG)
    check(out, ref, sum(new) + sum(cands))


@pytest.mark.parametrize("D", [32, 64, 128, 256])
def test_paged_head_dims(D):
    batch, q, k, v, kp, vp = paged_case([21], [11], [4], H=1, D=D, page_size=8, seed=D)
    out, ref = run_paged(batch, q, k, v, kp, vp, config=CPU_CFG)
    check(out, ref, 15)


@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_paged_batch_sizes_default_rule(B):
    rng = random.Random(B)
    cached = [rng.randint(0, 40) for _ in range(B)]
    new = [rng.randint(0, 20) for _ in range(B)]
    cands = [rng.randint(0, 6) for _ in range(B)]
    batch, q, k, v, kp, vp = paged_case(cached, new, cands, H=2, D=16, page_size=16, seed=B)
    out, ref = run_paged(batch, q, k, v, kp, vp)  # default config and split rule
    check(out, ref, sum(new) + sum(cands))


def test_paged_no_cache_equals_full():
    """Nothing cached: the paged path must give full mode's answer."""
    rows, cands = [23, 10], [5, 10]
    batch, q, k, v, kp, vp = paged_case([0, 0], [18, 0], cands, H=1, D=16, page_size=8)
    full = tri.attention_full(
        q, k, v, make_batch(rows, cands, DEVICE), alpha=0.25, inv_n=1 / 64, config=CPU_CFG
    )
    paged = tri.attention_paged(q, k, v, batch, kp, vp, alpha=0.25, inv_n=1 / 64, config=CPU_CFG)
    assert rel_err(paged, full) < 1e-5


# --- random shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(16))
def test_fuzz(seed):
    """Random users, lengths, cached prefixes, page sizes, tiles and splits, both modes."""
    rng = random.Random(seed)
    B, H, D = rng.randint(1, 4), rng.randint(1, 3), rng.choice([16, 32])
    cfg = tri.Config(rng.choice([16, 32]), rng.choice([16, 32]), 4, 1)
    split_k = rng.choice([1, 2, 3, 5])
    edges = [0, 1, 14, 15, 16, 17, 30, 31, 33]  # around 16- and 32-key tile edges
    new = [rng.choice(edges + [rng.randint(0, 40)]) for _ in range(B)]
    cands = [rng.choice([0, 1, rng.randint(0, 12)]) for _ in range(B)]
    cached = [rng.choice(edges + [rng.randint(0, 70)]) for _ in range(B)]
    live = sum(new) + sum(cands)
    batch, q, k, v = full_case(
        [n + c for n, c in zip(new, cands)], cands, H, D, dead=seed % 3, seed=seed
    )
    out, ref = run_full(batch, q, k, v, split_k=split_k, config=cfg)
    check(out, ref, live)
    batch, q, k, v, kp, vp = paged_case(
        cached, new, cands, H, D, rng.choice([4, 8, 16, 32, 64]), dead=seed % 3, seed=seed
    )
    out, ref = run_paged(batch, q, k, v, kp, vp, split_k=split_k, config=cfg)
    check(out, ref, live)


# --- GPU (bf16, real sizes) --------------------------------------------------------------------

GPU_TOL = 2e-2


@pytest.fixture(params=[False, True], ids=["portable", "hopper-if-sm90"])
def hopper(request):
    """GPU tests run this file's kernel, and the Hopper kernel where the GPU has it: an
    Attention whose policy says which."""
    return tri.Attention(KernelPolicy(autotune=False, hopper=request.param))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("split_k", [None, 1, 8])
def test_gpu_full_bf16(D, split_k, hopper):
    batch, q, k, v = full_case(
        [700, 0, 1290, 300],
        [256, 0, 256, 300],
        H=4,
        D=D,
        dead=5,
        dtype=torch.bfloat16,
        device="cuda",
        seed=D,
    )
    out, ref = run_full(batch, q, k, v, att=hopper, split_k=split_k)
    check(out, ref, 2290, tol=GPU_TOL)
    expect_hopper(hopper, split_k != 8)  # a forced split keeps the portable kernel


@pytest.mark.parametrize("split_k", [1, 3])
def test_full_nan_in_dead_rows_stays_out(split_k):
    """Rows past the last user hold NaN (graph padding may hold anything). Tiles that reach past a
    user (on the GPU, TMA boxes of whole key blocks) must not let them into live rows."""
    gpu = DEVICE == "cuda"
    batch, q, k, v = full_case(
        [45, 70],
        [5, 9],
        H=2,
        D=256 if gpu else 16,
        dead=61,
        dtype=torch.bfloat16 if gpu else torch.float32,
    )
    for t in (q, k, v):
        t[115:] = float("nan")
    out, ref = run_full(batch, q, k, v, split_k=split_k, config=None if gpu else CPU_CFG)
    check(out, ref, 115, tol=GPU_TOL if gpu else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("D,page_size", [(64, 16), (128, 64), (256, 32), (256, 16)])
@pytest.mark.parametrize("split_k", [None, 1, 8])
def test_gpu_paged_bf16(D, page_size, split_k, hopper):
    batch, q, k, v, kp, vp = paged_case(
        [1500, 97, 0, 640],
        [128, 31, 200, 0],
        [256, 0, 64, 256],
        H=4,
        D=D,
        page_size=page_size,
        dead=3,
        dtype=torch.bfloat16,
        device="cuda",
        seed=D + page_size,
    )
    out, ref = run_paged(batch, q, k, v, kp, vp, att=hopper, split_k=split_k)
    check(out, ref, 128 + 256 + 31 + 264 + 256, tol=GPU_TOL)
    expect_hopper(hopper)


def expect_hopper(att, possible: bool = True):
    """On an sm_90 GPU with the Hopper kernel on (and `possible` for this launch), it is the one
    that ran."""
    sm90 = torch.cuda.get_device_capability()[0] == 9
    assert (att.last_launch["config"].kernel == "hopper") == (att.policy.hopper and possible and sm90)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """No host sync inside: the op captures into a CUDA graph and replays to the same answer."""
    batch, q, k, v, kp, vp = paged_case(
        [300, 40], [16, 8], [32, 4], H=2, D=128, page_size=32, dtype=torch.bfloat16, device="cuda"
    )
    for split_k in (1, 4):
        run = lambda split_k=split_k: tri.attention_paged(  # noqa: E731 - one Attention a call
            q, k, v, batch, kp, vp, alpha=0.1, inv_n=0.01, split_k=split_k
        )
        expected = run().clone()  # warm-up (compiles) outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-3)


def test_partial_fp32_hands_over_the_split_sums():
    """Split: the float32 sum buffer comes back as it is; unsplit: q's dtype. fp16 inputs (a
    float64 `tl.dot` compiles only in the interpreter), checked against a float64 reference."""
    batch, q, k, v = full_case([40, 7], [8, 3], H=1, D=16, dtype=torch.float16)
    alpha, inv_n = 0.25, 1 / 64
    ref = reference.attention_full(q.double(), k.double(), v.double(), batch, alpha=alpha, inv_n=inv_n)
    split = tri.attention_full(
        q, k, v, batch, alpha=alpha, inv_n=inv_n, split_k=3, config=CPU_CFG, partial_fp32=True
    )
    whole = tri.attention_full(
        q, k, v, batch, alpha=alpha, inv_n=inv_n, split_k=1, config=CPU_CFG, partial_fp32=True
    )
    assert split.dtype == torch.float32 and whole.dtype == torch.float16
    check(split, ref, 47, tol=2e-3)
    check(whole, ref, 47, tol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_autotune_picks_a_candidate_and_matches(paged):
    """autotune times the candidates once per shape bucket, outside captures, and the chosen
    launch still equals the reference; a capture afterwards reuses the choice."""
    att = tri.Attention(KernelPolicy(autotune=True))
    if paged:
        batch, q, k, v, kp, vp = paged_case(
            [2000], [128], [256], H=4, D=256, page_size=32, dtype=torch.bfloat16, device="cuda", seed=5
        )
        out, ref = run_paged(batch, q, k, v, kp, vp, att=att)
        rows = 384
    else:
        batch, q, k, v = full_case(
            [1500, 300], [256, 44], H=4, D=256, dtype=torch.bfloat16, device="cuda", seed=6
        )
        out, ref = run_full(batch, q, k, v, att=att)
        rows = 2100
    check(out, ref, rows, tol=GPU_TOL)
    assert len(att.tuned) == 1
    ((cfg, split),) = att.tuned.values()
    assert (cfg in tri.TUNE_CONFIGS[256] or cfg == tri.HOPPER_CONFIG) and split >= 1
