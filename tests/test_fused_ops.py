"""Fused Triton helpers vs their PyTorch versions (Triton's interpreter on CPU)."""

import random

import pytest
import torch
import torch.nn.functional as F

from hstu_exp.core.jagged import make_batch
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.ops.fused import (
    append_kv,
    append_kv_torch,
    layernorm,
    layernorm_mul,
    layernorm_mul_torch,
    layernorm_torch,
    silu_qkv,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("heads,head_dim,page", [(1, 32, 4), (2, 16, 8), (4, 64, 16)])
def test_append_kv_matches_index_put(heads, head_dim, page):
    cache = PagedKVCache(
        num_layers=1,
        num_pages=16,
        page_size=page,
        num_heads=heads,
        head_dim=head_dim,
        dtype=torch.float32,
        device=DEVICE,
    )
    cache.plan([3], [page + 1], [0])
    table = cache.plan([3, 5], [page - 1, 2 * page + 1], [2, 0])  # crosses page boundaries
    rows = table.new_rows.numel() + 2
    # z is [rows, 4*H*D]: k and v are row-strided views, as in the layer
    z = torch.randn(rows, 4 * heads * head_dim, device=DEVICE)
    u, v, q, k = (t.reshape(-1, heads, head_dim) for t in z.split(heads * head_dim, dim=-1))
    ours, ref = cache.pool[0].clone(), cache.pool[0].clone()
    ours.fill_(float("nan"))
    ref.fill_(float("nan"))
    append_kv(ours, table.new_rows, table.new_page, table.new_slot, k, v)
    append_kv_torch(ref, table.new_rows, table.new_page, table.new_slot, k, v)
    assert torch.equal(ours.nan_to_num(7.0), ref.nan_to_num(7.0))
    assert (~ours.isnan()).sum() == 2 * table.new_rows.numel() * heads * head_dim


@pytest.mark.parametrize("rows,width", [(1, 64), (7, 96), (33, 256)])
def test_layernorm_mul_matches_torch(rows, width):
    z = torch.randn(rows, 3 * width, device=DEVICE) * 3 + 1
    a, u = z[:, :width], z[:, width : 2 * width]  # strided views, as in the layer
    w, b = torch.randn(width, device=DEVICE), torch.randn(width, device=DEVICE)
    torch.testing.assert_close(
        layernorm_mul(a, u, w, b, 1e-5), layernorm_mul_torch(a, u, w, b, 1e-5), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("rows,width", [(1, 64), (7, 96), (33, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layernorm_mul_silu_on_load(rows, width, dtype):
    """silu_u: u is the raw projection; the kernel must equal u -> SiLU (in u's dtype) -> * LN.
    In float16 the two may round SiLU(u) to neighbouring values: two units in the last place
    (float16's epsilon is 9.8e-4) are allowed, not the default one."""
    z = (torch.randn(rows, 3 * width, device=DEVICE) * 3 + 1).to(dtype)
    a, u = z[:, :width].float(), z[:, width : 2 * width]
    w, b = torch.randn(width, device=DEVICE), torch.randn(width, device=DEVICE)
    tol = {"rtol": 2e-3, "atol": 1e-3} if dtype == torch.float16 else {}
    torch.testing.assert_close(
        layernorm_mul(a, u, w, b, 1e-5, silu_u=True),
        layernorm_mul_torch(a, F.silu(u), w, b, 1e-5).to(dtype),
        **tol,
    )


@pytest.mark.parametrize("rows,width", [(1, 64), (5, 1000), (33, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layernorm_matches_torch(rows, width, dtype):
    x = (torch.randn(rows, width, device=DEVICE) * 4 + 3).to(dtype)
    w, b = torch.randn(width, device=DEVICE), torch.randn(width, device=DEVICE)
    torch.testing.assert_close(
        layernorm(x, w, b, 1e-5), layernorm_torch(x.float(), w, b, 1e-5).to(dtype)
    )


def raw_projection(rows, heads, head_dim, dtype, seed):
    """A raw [rows, 4 H D] projection and its u, v, q, k row-strided views, as in the layer."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, 4 * heads * head_dim, generator=gen) * 2).to(DEVICE, dtype)
    return z, [t.reshape(-1, heads, head_dim) for t in z.split(heads * head_dim, dim=-1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_qkv_full_mode_in_place(dtype):
    z, (u, v, q, k) = raw_projection(19, 2, 16, dtype, seed=3)
    expected = torch.cat([z[:, :32], F.silu(z[:, 32:])], dim=1)
    sums = torch.full(q.shape, float("nan"), device=DEVICE)  # the attention's split-K buffer
    silu_qkv(q, k, v, make_batch([12, 0, 5], [3, 0, 5], DEVICE), zero=sums)  # 2 dead rows
    assert torch.equal(z[:, :32], expected[:, :32]), "u must stay raw"
    torch.testing.assert_close(z, expected)
    assert (sums == 0).all(), "every row of the sum buffer cleared, dead rows too"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_qkv_paged_equals_silu_then_append(seed, dtype):
    """Random users: odd lengths, appends across page boundaries, zero-length histories, users
    without candidates, candidate-only users, empty users, dead rows past the last user. The
    pool must get post-SiLU K/V exactly where a SiLU pass + append put them, q must be SiLU'd,
    candidates' k, v SiLU'd in place."""
    rng = random.Random(seed)
    B, H, D, page = rng.randint(1, 5), rng.choice([1, 2]), rng.choice([16, 32]), rng.choice([4, 8])
    cached = [rng.choice([0, 1, page - 1, page, rng.randint(0, 30)]) for _ in range(B)]
    new = [rng.choice([0, 1, page, page + 1, rng.randint(0, 20)]) for _ in range(B)]
    cands = [rng.choice([0, 1, rng.randint(0, 6)]) for _ in range(B)]
    total = sum(-(-(c + n) // page) for c, n in zip(cached, new)) + 2
    cache = PagedKVCache(
        num_layers=1,
        num_pages=total,
        page_size=page,
        num_heads=H,
        head_dim=D,
        dtype=dtype,
        device=DEVICE,
    )
    users = list(range(B))
    cache.plan(users, cached, [0] * B)
    table = cache.plan(users, new, cands)
    rows = [n + c for n, c in zip(new, cands)]
    batch = make_batch(rows, cands, DEVICE, table)
    dead = seed % 3
    z, (u, v, q, k) = raw_projection(sum(rows) + dead, H, D, dtype, seed)
    ref_z = F.silu(z)
    _, rv, rq, rk = (t.reshape(-1, H, D) for t in ref_z.split(H * D, dim=-1))
    ours, ref = cache.pool[0].clone().fill_(float("nan")), cache.pool[0].clone().fill_(float("nan"))
    append_kv_torch(ref, table.new_rows, table.new_page, table.new_slot, rk, rv)
    silu_qkv(q, k, v, batch, ours)
    torch.testing.assert_close(ours.nan_to_num(7.0), ref.nan_to_num(7.0))
    assert ours.isnan().sum() == ref.isnan().sum(), "written exactly where the append writes"
    torch.testing.assert_close(q, rq)
    is_cand = torch.zeros(q.shape[0], dtype=torch.bool)
    at = 0
    for n, c in zip(new, cands):
        is_cand[at + n : at + n + c] = True
        at += n + c
    is_cand = is_cand.to(DEVICE)
    torch.testing.assert_close(k[is_cand], rk[is_cand])
    torch.testing.assert_close(v[is_cand], rv[is_cand])
    assert torch.equal(u, z[:, : H * D].reshape(-1, H, D)), "u must stay raw"
