"""The whole block with kernel=triton (attention + fused ops) equals kernel=reference,
full and paged, on fresh random inputs (Triton's interpreter on CPU, a GPU where there is one).
kernel=triton hands the raw UVQK projection over (SiLU where U, Q, K, V are read) unless
silu_on_load is off; the reference applies the design's SiLU pass."""

import copy
import random

import pytest
import torch

from hstu_exp.core.jagged import make_batch
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.hstu import HSTUBlock
from hstu_exp.ops import triton_attention
from hstu_exp.ops.policy import KernelPolicy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN, HEADS, DIM, PAGE = 32, 2, 16, 8


def reference_block(seed):
    torch.manual_seed(seed)
    ref = HSTUBlock(num_layers=2, hidden=HIDDEN, num_heads=HEADS, head_dim=DIM, scaling_length=200).to(
        DEVICE
    )
    with torch.no_grad():  # LayerNorm weights away from (1, 0)
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return ref


def full_and_cached(block, seqs, hist, cached, cands, dtype, fp8=False):
    """The block's output on the whole sequences (full mode), and on the new rows after the
    cached prefix went through the block into a fresh paged cache (fp8: e4m3 K/V)."""
    B = len(hist)
    rows = [t + c for t, c in zip(hist, cands)]
    x = torch.cat(seqs).to(dtype)
    full = block(x, make_batch(rows, cands, DEVICE))
    cache = PagedKVCache(
        num_layers=2,
        num_pages=64,
        page_size=PAGE,
        num_heads=HEADS,
        head_dim=DIM,
        dtype=dtype,
        device=DEVICE,
        fp8=fp8,
    )
    users = list(range(B))
    table = cache.plan(users, cached, [0] * B)
    block(
        torch.cat([s[:c] for s, c in zip(seqs, cached)]).to(dtype),
        make_batch(cached, [0] * B, DEVICE, table),
        cache.kv,
    )
    new = [t - c for t, c in zip(hist, cached)]
    table = cache.plan(users, new, cands)
    out = block(
        torch.cat([s[c:] for s, c in zip(seqs, cached)]).to(dtype),
        make_batch([n + k for n, k in zip(new, cands)], cands, DEVICE, table),
        cache.kv,
    )
    return full, out


@pytest.mark.parametrize("silu_on_load", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triton_block_equals_reference(seed, silu_on_load):
    rng = random.Random(seed)
    ref = reference_block(seed)
    tri = copy.deepcopy(ref)
    tri.kernel, tri.policy = "triton", KernelPolicy(silu_on_load=silu_on_load)
    B = rng.randint(1, 3)
    hist = [rng.randint(1, 40) for _ in range(B)]
    cached = [rng.randint(0, h) for h in hist]
    cands = [rng.randint(0, 5) for _ in range(B)]
    seqs = [torch.randn(t + c, HIDDEN, device=DEVICE) for t, c in zip(hist, cands)]
    with torch.no_grad():
        want = full_and_cached(ref, seqs, hist, cached, cands, torch.float32)
        got = full_and_cached(tri, seqs, hist, cached, cands, torch.float32)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [3, 4])
def test_triton_block_split_sums_cleared_by_silu_qkv(seed):
    """Key splits forced: the attention sums into a buffer that silu_qkv cleared (no memset)."""
    policy = KernelPolicy(split_k=3)
    rng = random.Random(seed)
    ref = reference_block(seed)
    tri = copy.deepcopy(ref)
    tri.kernel, tri.policy = "triton", policy
    hist = [rng.randint(20, 40) for _ in range(2)]
    cached = [rng.randint(0, h - 1) for h in hist]
    cands = [rng.randint(0, 5) for _ in range(2)]
    seqs = [torch.randn(t + c, HIDDEN, device=DEVICE) for t, c in zip(hist, cands)]
    batch = make_batch([t + c for t, c in zip(hist, cands)], cands, DEVICE)
    assert triton_attention.Attention(policy).will_split(
        torch.zeros(sum(hist) + sum(cands), HEADS, DIM), batch, False
    )
    with torch.no_grad():
        want = full_and_cached(ref, seqs, hist, cached, cands, torch.float32)
        got = full_and_cached(tri, seqs, hist, cached, cands, torch.float32)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_triton_block_leaves_its_input_alone():
    """Past layer 0 the residual is summed in place, into the block's own intermediate only."""
    tri = reference_block(5)
    tri.kernel = "triton"
    x = torch.randn(30, HIDDEN, device=DEVICE)
    before = x.clone()
    with torch.no_grad():
        out = tri(x, make_batch([20, 10], [4, 0], DEVICE))
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()


# (history, cached, candidates) per user: nothing new after the cache (zero-length new history),
# no candidates, appends that end on and cross page boundaries, a first request (nothing cached).
EDGE_CASES = [
    ([8, 17, 3], [8, 9, 0], [4, 0, 2]),
    ([16, 1], [7, 0], [0, 3]),
    ([23], [16], [5]),
]


@pytest.mark.parametrize("hist,cached,cands", EDGE_CASES)
def test_triton_block_fp16_edge_cases(hist, cached, cands):
    """fp16 (the interpreter's bf16 dot is wrong) against the float32 reference."""
    ref = reference_block(len(hist))
    tri = copy.deepcopy(ref).half()
    tri.kernel = "triton"
    seqs = [torch.randn(t + c, HIDDEN, device=DEVICE) for t, c in zip(hist, cands)]
    with torch.no_grad():
        want = full_and_cached(ref, seqs, hist, cached, cands, torch.float32)
        got = full_and_cached(tri, seqs, hist, cached, cands, torch.float16)
    for g, w in zip(got, want):
        assert g.dtype == torch.float16
        err = ((g.float() - w).norm() / w.norm()).item()
        assert err < 5e-3, err
